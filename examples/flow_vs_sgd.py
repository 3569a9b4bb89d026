"""Plain SGD, projected SGD (symmetry and Euclidean) and the gradient flow on a small ReLU MLP.

Full-batch steps of size τ on 64 digits images, compared at T = 0.4 with the flow integrated by
dopri5 (torchdiffeq). Run: python examples/flow_vs_sgd.py
"""

import torch
import torch.nn.functional as F

import consopt
from consopt.flow import compare, format_comparison
from consopt.models import MLP
from consopt.profiler import load_digits_data

torch.manual_seed(0)
x, y = load_digits_data("flat", "cpu")
x, y = x[:64].double(), y[:64]
model = MLP([64, 16, 10]).double().train()
laws = consopt.find_laws(model, (x,), loss="cross_entropy")
print(laws.summary(), "\n")
result = compare(model, x, y, F.cross_entropy, T=0.4, lrs=[0.1, 0.05, 0.025], laws=laws, checkpoints=2)
print(format_comparison(result))
