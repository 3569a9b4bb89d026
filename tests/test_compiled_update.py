"""consopt.compiled_update: torch.optim.SGD's update as one compiled CPU graph
(tracking_backend="compile"), bitwise against torch.optim.SGD, and its safety nets."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch

import consopt
import consopt.compiled_update as CU

from _models import MLP, mlp_laws
from _sgd_pairs import CONFIGS, _assert_same, _bits, _grads, _pair, _seed_of, _steps

# torch.compile's CPU backend builds C++: without a compiler the optimizer falls back to torch's
# update (tested below with a simulated failure), and there is nothing compiled to check.
pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="no C++ compiler for torch.compile's CPU backend")


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_compiled_update_bitwise(cfg):
    """30 steps, a parameter without gradient every 7th step: params, momentum and grads are
    torch.optim.SGD's bit for bit, and the compiled graphs ran (not torch's fallback)."""
    *hp, dtype = cfg
    seed = _seed_of(cfg)
    ref, mod, o_ref, o_mod = _pair(*hp, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="consopt", category=RuntimeWarning)  # no silent fallback
        for step in range(30):
            _grads(ref, mod, g, dtype, drop_bias=step % 7 == 3)
            o_ref.step()
            o_mod.step()
    _assert_same(ref, mod, o_ref, o_mod)
    cu = o_mod._cpu_update
    assert cu is not None and cu.disabled is None
    assert 1 <= cu.builds <= 2  # all parameters with grads, and the steps without fc3.bias's
    assert o_mod.tracked_steps == 30


def test_compiled_update_deviation_exact():
    """Deviations after compiled updates equal a float64 re-evaluation (SPEC §6)."""
    torch.manual_seed(_seed_of("dev"))
    model = MLP()
    laws = mlp_laws(model)
    h0, s0 = laws.evaluate(model), laws.scale(model)
    opt = consopt.SGD(model.parameters(), lr=0.1, momentum=0.9, laws=laws)
    opt.tracking_backend = "compile"
    g = torch.Generator().manual_seed(_seed_of("dev-data"))
    for _ in range(5):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert opt._cpu_update.builds == 1 and opt._cpu_update.disabled is None
    h, s1 = laws.evaluate(model), laws.scale(model)
    for k, d in opt.deviation().items():
        scale = torch.maximum(s0[k], s1[k])
        assert float(((d - (h[k] - h0[k])).abs() / scale).max()) <= 1e-12, k


def test_lr_schedule_does_not_rebuild():
    """Hyperparameters are graph inputs: a scheduler changing lr every step builds one graph."""
    ref, mod, o_ref, o_mod = _pair(0.9, 0.0, False, 1e-3, False, "float", 1, False, torch.float32, 1)
    s_ref = torch.optim.lr_scheduler.OneCycleLR(o_ref, max_lr=0.1, total_steps=12)  # cycles momentum too
    s_mod = torch.optim.lr_scheduler.OneCycleLR(o_mod, max_lr=0.1, total_steps=12)
    g = torch.Generator().manual_seed(_seed_of("sched"))
    for _ in range(12):
        _grads(ref, mod, g, torch.float32)
        o_ref.step()
        o_mod.step()
        s_ref.step()
        s_mod.step()
    _assert_same(ref, mod, o_ref, o_mod)
    assert o_mod._cpu_update.builds == 1


def test_layout_change_rebuilds():
    """A gradient with other strides fails the graph's guards: a new graph is built and checked
    (never an eager re-run of the traced function)."""
    ref, mod, o_ref, o_mod = _pair(0.9, 0.0, False, 0.0, False, "float", 1, False, torch.float32, 2)
    g = torch.Generator().manual_seed(_seed_of("layout"))
    for step in range(4):
        _grads(ref, mod, g, torch.float32)
        if step == 3:  # fc1.weight's gradient as a transposed (column-major) tensor
            mod.fc1.weight.grad = mod.fc1.weight.grad.t().contiguous().t()
            assert not mod.fc1.weight.grad.is_contiguous()
        o_ref.step()
        o_mod.step()
    _assert_same(ref, mod, o_ref, o_mod)
    assert o_mod._cpu_update.builds == 2 and o_mod._cpu_update.disabled is None


def _eager_two_roundings(flags):
    """An update with torch's formula but p + (−lr · d) rounded twice: differs in the last bit."""

    def run(tensors, hypers):
        for (n, mom, nest, maximize, wd, _), (ps, gs, bs), (neg_lr, mu, damp1, lam) in zip(flags, tensors, hypers):
            for i in range(n):
                d = -gs[i] if maximize else gs[i]
                if wd:
                    d = d + lam * ps[i]
                if mom:
                    bs[i].mul_(mu).add_(d * damp1)
                    d = d + mu * bs[i] if nest else bs[i]
                ps[i].add_(neg_lr * d)

    return run


def test_mismatch_keeps_torch_result(monkeypatch):
    """A graph whose bits differ from torch's: that step is undone and torch's update applied, a warning says
    so, and torch's update runs from then on."""
    monkeypatch.setattr(CU, "update_graph", _eager_two_roundings)
    ref, mod, o_ref, o_mod = _pair(0.9, 0.0, False, 1e-2, False, "float", 1, False, torch.float32, 3)
    with pytest.warns(RuntimeWarning, match="differs from torch's"):
        _steps(ref, mod, o_ref, o_mod, "mismatch", 4)
    _assert_same(ref, mod, o_ref, o_mod)
    assert "differs" in o_mod._cpu_update.disabled


def test_compile_failure_falls_back(monkeypatch):
    """torch.compile failing (e.g. no C++ compiler): nothing is half-applied, torch's update runs."""

    def broken(flags):
        def run(tensors, hypers):
            tensors[0][0][0].add_(1.0)  # partly applied, then the failure
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(CU, "update_graph", broken)
    ref, mod, o_ref, o_mod = _pair(0.9, 0.0, True, 0.0, True, "float", 1, True, torch.float32, 4)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        _steps(ref, mod, o_ref, o_mod, "broken", 3)
    _assert_same(ref, mod, o_ref, o_mod)


def test_alternating_layouts_keep_their_graphs():
    """Two param groups stepped in turn (GAN-style): one graph per layout, kept and reused."""
    torch.manual_seed(5)
    ref = MLP(d_in=7, h1=13, h2=1, d_out=3)
    mod = copy.deepcopy(ref)
    grp = lambda m: [{"params": [m.fc1.weight, m.fc1.bias, m.fc2.weight]},  # noqa: E731
                     {"params": [m.fc2.bias, m.fc3.weight, m.fc3.bias]}]
    o_ref = torch.optim.SGD(grp(ref), lr=0.1, momentum=0.9)
    o_mod = consopt.SGD(grp(mod), lr=0.1, momentum=0.9, laws=mlp_laws(mod))
    o_mod.tracking_backend = "compile"
    g = torch.Generator().manual_seed(_seed_of("alternate"))
    for step in range(10):
        for gi, (gr, gm) in enumerate(zip(o_ref.param_groups, o_mod.param_groups)):
            for pr, pm in zip(gr["params"], gm["params"]):
                if step < 2 or gi == step % 2:
                    pr.grad = torch.randn(pr.shape, generator=g)
                    pm.grad = pr.grad.clone()
                else:
                    pr.grad = pm.grad = None
        o_ref.step()
        o_mod.step()
    _assert_same(ref, mod, o_ref, o_mod)
    cu = o_mod._cpu_update
    assert cu.disabled is None and cu.builds == 3  # both groups, then each group alone


def test_shared_gradient_takes_torchs_path():
    """Two parameters sharing one .grad tensor (nesterov + foreach adds into it in place):
    torch's update runs, with torch's result."""
    torch.manual_seed(6)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    mod = copy.deepcopy(ref)
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, foreach=True)
    o_ref = torch.optim.SGD(ref.parameters(), **kw)
    o_mod = consopt.SGD(mod.parameters(), laws=consopt.find_laws(mod, (torch.randn(2, 3),)), **kw)
    o_mod.tracking_backend = "compile"
    g = torch.Generator().manual_seed(_seed_of("shared"))
    for step in range(4):
        for pr, pm in zip(ref.parameters(), mod.parameters()):
            pr.grad = torch.randn(pr.shape, generator=g)
            pm.grad = pr.grad.clone()
        if step >= 2:  # the two biases share one gradient object
            ref[2].bias.grad = ref[0].bias.grad
            mod[2].bias.grad = mod[0].bias.grad
        o_ref.step()
        o_mod.step()
    for p, q in zip(ref.parameters(), mod.parameters()):
        assert torch.equal(_bits(p), _bits(q)) and torch.equal(_bits(p.grad), _bits(q.grad))
    assert o_mod._cpu_update.builds == 1 and o_mod._cpu_update.disabled is None
