"""Time find_laws on torchvision-sized models (CPU). Prints a table; --json writes the numbers.

Each model is traced once to warm torch.export up (first-call import costs), then timed.
"""

import argparse
import json
import time

import torch
import torch.nn as nn

import consopt
from consopt import models as M


def cases():
    yield "ResNet-18 (CIFAR stem, 2x3x32x32)", lambda: M.resnet18(), (torch.randn(2, 3, 32, 32),)
    yield "ResNet-50 (ImageNet stem, 1x3x64x64)", lambda: M.resnet50(), (torch.randn(1, 3, 64, 64),)
    yield "Transformer encoder 12x768 (1x16 tokens)", lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(768, 12, 3072, activation="relu", batch_first=True), 12,
        enable_nested_tensor=False), (torch.randn(1, 16, 768),)
    yield "Llama-style 4 blocks d=512 (1x16 tokens)", lambda: M.LlamaClassifier(
        vocab=1000, d=512, n_heads=8, n_kv_heads=2, hidden=1376, layers=4), (torch.randint(0, 1000, (1, 16)),)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    consopt.find_laws(nn.Linear(2, 2), (torch.randn(1, 2),))  # warm-up
    rows = []
    for name, make, inputs in cases():
        model = make().train()
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            laws = consopt.find_laws(model, inputs, loss="cross_entropy")
            times.append(time.perf_counter() - t)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append(dict(model=name, params=n_params, families=len(laws), functions=laws.num_functions,
                         seconds=min(times)))
        print(f"{name:45s} {n_params / 1e6:7.1f} M params {len(laws):4d} families "
              f"{laws.num_functions:8d} functions {min(times):6.2f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
