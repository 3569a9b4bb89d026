"""An MLP stepped by torch.optim.SGD and by consopt.SGD side by side, for the bitwise tests of
the CPU update backends (tracking_backend "compile" and "native")."""

from __future__ import annotations

import copy
import zlib

import torch

import consopt

from _models import MLP, mlp_laws


def _seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def _bits(a: torch.Tensor) -> torch.Tensor:
    return a.detach().contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()])


def _groups(model, n_groups, lr, wd):
    ps = list(model.parameters())
    if n_groups == 1:
        return [{"params": ps}]
    lr2 = lr * 0.5 if not torch.is_tensor(lr) else torch.tensor(float(lr) * 0.5)
    return [{"params": ps[0:2]}, {"params": ps[2:4], "lr": lr2, "weight_decay": wd * 3},
            {"params": ps[4:], "weight_decay": 0.0}]


def _pair(mom, damp, nesterov, wd, maximize, lr_kind, n_groups, foreach, dtype, seed, backend="compile"):
    torch.manual_seed(seed)
    ref = MLP(d_in=7, h1=13, h2=1, d_out=3).to(dtype)  # h2 = 1: a 1-element bias, a 1-wide layer
    mod = copy.deepcopy(ref)
    lr = 0.05 if lr_kind == "float" else torch.tensor(0.05)

    def make(cls, model, **extra):
        lr_ = lr.clone() if torch.is_tensor(lr) else lr
        return cls(_groups(model, n_groups, lr_, wd), lr=lr_, momentum=mom, dampening=damp, weight_decay=wd,
                   nesterov=nesterov, maximize=maximize, foreach=foreach, **extra)

    o_ref = make(torch.optim.SGD, ref)
    o_mod = make(consopt.SGD, mod, laws=mlp_laws(mod))
    o_mod.tracking_backend = backend
    return ref, mod, o_ref, o_mod


def _grads(ref, mod, g, dtype, drop_bias=False):
    for p_ref, p_mod in zip(ref.parameters(), mod.parameters()):
        gr = torch.randn(p_ref.shape, generator=g).to(dtype)
        p_ref.grad, p_mod.grad = gr, gr.clone()
    if drop_bias:  # a parameter without gradient this step (torch skips it)
        ref.fc3.bias.grad = mod.fc3.bias.grad = None


def _steps(ref, mod, o_ref, o_mod, tag, n):
    """`n` steps of both optimizers on the same fresh random gradients."""
    g = torch.Generator().manual_seed(_seed_of(tag))
    for _ in range(n):
        _grads(ref, mod, g, ref.fc1.weight.dtype)
        o_ref.step()
        o_mod.step()


def _assert_same(ref, mod, o_ref, o_mod):
    for (n, p_ref), p_mod in zip(ref.named_parameters(), mod.parameters()):
        assert torch.equal(_bits(p_ref), _bits(p_mod)), n
        assert (p_ref.grad is None) == (p_mod.grad is None), n
        if p_ref.grad is not None:  # torch's foreach nesterov path adds into the gradients
            assert torch.equal(_bits(p_ref.grad), _bits(p_mod.grad)), n
        b_ref, b_mod = (o.state[p].get("momentum_buffer") for o, p in ((o_ref, p_ref), (o_mod, p_mod)))
        assert (b_ref is None) == (b_mod is None), n
        if b_ref is not None:
            assert torch.equal(_bits(b_ref), _bits(b_mod)), n


CONFIGS = [  # (momentum, dampening, nesterov, wd, maximize, lr kind, groups, foreach, dtype)
    (0.9, 0.0, True, 1e-2, False, "tensor", 3, True, torch.float32),  # group 3: nesterov writes grads
    (0.9, 0.3, False, 0.0, True, "float", 1, False, torch.float32),
    (0.0, 0.0, False, 1e-2, False, "float", 1, True, torch.float32),
    (0.9, 0.0, True, 0.0, False, "float", 1, True, torch.float32),
    (0.9, 0.0, False, 1e-2, True, "tensor", 3, False, torch.float64),
]
