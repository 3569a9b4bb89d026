"""consopt.native: torch's SGD update and the law statistics in one C++ pass
(tracking_backend="native"). The kernel against torch and float64 references on odd shapes, the
optimizer bitwise against torch.optim.SGD with exact deviations, and the fallbacks."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
from torch.optim.sgd import sgd as torch_sgd

import consopt
import consopt.native as N
from consopt.functional import LawEvaluator
from consopt.laws import Family, Term

from _models import MLP, build, fill_grads, lawset, mlp_laws, rows
from _sgd_pairs import CONFIGS, _assert_same, _bits, _grads, _pair, _seed_of

pytestmark = pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                                reason="no C++ compiler to build the native kernel")


def _same(a, b) -> bool:
    return torch.equal(_bits(a), _bits(b))


def _maxabs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


SHAPES = [(7, 13), (1,), (13,), (3, 5, 2, 2), (0, 4), (4, 0), (), (97, 1), (1000,), (33, 257), (1, 1)]
HYPER = [  # momentum, dampening, nesterov, weight decay, maximize
    (0.9, 0.1, False, 0.01, False),
    (0.9, 0.0, True, 0.0, False),  # nesterov writes the gradients (torch's foreach path)
    (0.9, 0.0, True, 0.01, True),
    (0.0, 0.0, False, 0.0, True),
    (0.0, 0.0, False, 0.02, False),
]


def _flags(mom, damp, nest, wd, maximize):
    f = (N.MAXIMIZE if maximize else 0) | (N.WEIGHT_DECAY if wd else 0) | (N.MOMENTUM if mom else 0)
    f |= N.NESTEROV if nest and mom else 0
    if nest and mom and not maximize and wd == 0:
        f |= N.WRITES_GRAD
    return f


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(map(str, h)))
def test_kernel_update_and_stats(dtype, hyper):
    """The update is torch's foreach SGD bit for bit; row and column sums (of x and x²) equal a
    float64 evaluation of the updated tensor, for odd shapes (1 element, primes, empty, 0-dim)."""
    mom, damp, nest, wd, maximize = hyper
    g = torch.Generator().manual_seed(_seed_of(hyper, str(dtype)))
    ps = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    gs = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    ms = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    stats = [i % 3 != 2 for i in range(len(SHAPES))]
    layout = N.Layout([p.shape for p in ps], stats)
    rp, rg, rm = ([x.clone() for x in xs] for xs in (ps, gs, ms))
    torch_sgd(rp, rg, rm if mom else [None] * len(rp), weight_decay=wd, momentum=mom, lr=0.05, dampening=damp,
              nesterov=nest, maximize=maximize, foreach=True)
    versions = [p._version for p in ps]
    layout.run(dtype, _flags(*hyper), ps, gs, ms if mom else None, -0.05, mom, 1 - damp, wd)
    for i in range(len(SHAPES)):
        assert _same(ps[i], rp[i]) and _same(gs[i], rg[i]), SHAPES[i]
        if mom:
            assert _same(ms[i], rm[i]), SHAPES[i]
        assert ps[i]._version > versions[i]  # autograd sees the in-place update
        if not stats[i]:
            continue
        p = ps[i]
        x = p.double().reshape(p.shape[0] if p.ndim else 1, math.prod(p.shape[1:]))
        (rs, rq), (cs, cq) = layout.rows[i], layout.cols[i]
        scale = float((x * x).sum()) + 1e-300
        for got, ref in ((rs, x.sum(1)), (rq, (x * x).sum(1)), (cs, x.sum(0)), (cq, (x * x).sum(0))):
            assert got.shape == ref.shape, SHAPES[i]
            assert _maxabs(got - ref) <= 1e-14 * scale, SHAPES[i]


def _assert_grams(got: torch.Tensor, m: torch.Tensor) -> None:
    """got = m mᵀ per batch, within 1e-14 × Σ|terms| elementwise (float64 reference)."""
    ref, scale = m @ m.transpose(1, 2), m.abs() @ m.abs().transpose(1, 2)
    assert got.shape == ref.shape
    assert bool(((got - ref).abs() <= 1e-14 * scale).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernel_grams(dtype):
    """Gram matrices of aligned row groups (U = 32, 8, 3, 1-D outer products) and column groups
    (U = 32 register-blocked, U = 5 and 3 plain) against float64 matmuls of the updated values;
    also written through an offset table into a shared output, skipping groups marked −1."""
    g = torch.Generator().manual_seed(_seed_of("grams", str(dtype)))
    shapes = [(64, 37), (96,), (16, 96), (9, 15), (7, 5), (130, 64)]
    ps = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    gs = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    out = torch.full((3 * 3 * 3 + 9,), float("nan"), dtype=torch.float64)
    offsets = torch.tensor([9, -1, 18], dtype=torch.int64)  # rows of (9, 15) in groups of 3; group 1 unused
    layout = N.Layout(shapes, [True] * len(shapes), row_gram=[32, 32, 8, (3, out, offsets), 0, 65],
                      col_gram=[0, 0, 32, 5, 5, 32])
    layout.run(dtype, 0, ps, gs, None, -0.1)
    for i, p in enumerate(ps):
        x = p.double().reshape(p.shape[0], -1)
        if layout.row_grams[i] is not None:
            u = layout.row_grams[i].shape[1]
            _assert_grams(layout.row_grams[i], x.reshape(-1, u, x.shape[1]))
        if layout.col_grams[i] is not None:
            u = layout.col_grams[i].shape[1]
            _assert_grams(layout.col_grams[i], x.t().reshape(-1, u, x.shape[0]))
    x = ps[3].double().reshape(3, 3, 15)
    _assert_grams(out[9:18].view(1, 3, 3), x[0:1])
    _assert_grams(out[18:27].view(1, 3, 3), x[2:3])
    assert torch.isnan(out[:9]).all() and torch.isnan(out[27:]).all()  # nothing else written


def test_kernel_squares_only():
    """sums=False: only the sums of squares are formed (rescale laws); the plain sums stay 0."""
    g = torch.Generator().manual_seed(_seed_of("squares"))
    shapes = [(31, 9), (17,), (2, 3, 5)]
    ps = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    layout = N.Layout(shapes, [True] * 3, sums=[False, False, True])
    layout.run(torch.float64, N.STATS_ONLY, ps, None, None)
    for i, p in enumerate(ps):
        x = p.reshape(p.shape[0], -1)
        (rs, rq), (cs, cq) = layout.rows[i], layout.cols[i]
        assert _maxabs(rq - (x * x).sum(1)) <= 1e-14 * float((x * x).sum())
        assert _maxabs(cq - (x * x).sum(0)) <= 1e-14 * float((x * x).sum())
        if i < 2:
            assert not rs.any() and not cs.any()
        else:
            assert _maxabs(rs - x.sum(1)) <= 1e-14 * float(x.abs().sum())


def test_kernel_stats_only_and_threads():
    """STATS_ONLY reads without writing; the statistics are bitwise the same with 1 and 2 threads."""
    g = torch.Generator().manual_seed(_seed_of("threads"))
    shapes = [(257, 33), (1031,), (64, 64)]
    ps = [torch.randn(s, generator=g) for s in shapes]
    before = [p.clone() for p in ps]
    versions = [p._version for p in ps]
    layouts = [N.Layout(shapes, [True] * 3, [0, 0, 32], [3, 0, 32]) for _ in range(2)]
    n = torch.get_num_threads()
    try:
        for layout, threads in zip(layouts, (1, 2)):
            torch.set_num_threads(threads)
            layout.run(torch.float32, N.STATS_ONLY, ps, None, None)
    finally:
        torch.set_num_threads(n)
    assert all(_same(a, b) for a, b in zip(ps, before)) and [p._version for p in ps] == versions
    a, b = layouts
    for i in range(3):
        for x, y in zip(a.rows[i] + a.cols[i], b.rows[i] + b.cols[i]):
            assert _same(x, y)
    assert _same(a.row_grams[2], b.row_grams[2]) and _same(a.col_grams[0], b.col_grams[0])


# -- the optimizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_native_sgd_bitwise_and_exact(cfg):
    """30 steps (fc3.bias without gradient every 7th step): params, momentum and grads are
    torch.optim.SGD's bit for bit, the native step ran every step after the first, and every
    deviation equals a float64 re-evaluation (SPEC §6)."""
    *hp, dtype = cfg
    ref, mod, o_ref, o_mod = _pair(*hp, dtype, _seed_of(cfg), backend="native")
    laws = o_mod.laws
    h0, s0 = laws.evaluate(mod), laws.scale(mod)
    g = torch.Generator().manual_seed(_seed_of(cfg, "grads"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="consopt", category=RuntimeWarning)  # no silent fallback
        for step in range(30):
            _grads(ref, mod, g, dtype, drop_bias=step % 7 == 3)  # then a law parameter without gradient
            o_ref.step()
            o_mod.step()
    _assert_same(ref, mod, o_ref, o_mod)
    assert o_mod._native is not None and o_mod._native.disabled is None
    assert o_mod.tracking_backend == "native" and o_mod.tracked_steps == 30
    h, s1 = laws.evaluate(mod), laws.scale(mod)
    for k, d in o_mod.deviation().items():
        scale = torch.maximum(s0[k], s1[k]).clamp_min(1e-300)
        assert float(((d - (h[k] - h0[k])).abs() / scale).max()) <= 1e-12, k


def _train_pair(model, ref, opt, o_ref, g, steps):
    """`steps` steps of consopt (on `model`) and torch (on `ref`) with the gradients of a real loss."""
    for _ in range(steps):
        inputs, target = model.example_inputs(generator=g)
        fill_grads(model, inputs, target)
        for a, b in zip(ref.parameters(), model.parameters()):
            a.grad = None if b.grad is None else b.grad.clone()
        opt.step()
        o_ref.step()


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "attention", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_deviation_exact_models(name, dtype):
    """MLP, CNN with BatchNorm, attention (head dim 4: the plain column-Gram path) and Llama-style
    (GQA) models trained on real losses: deviation() = float64 re-evaluation within 1e-12 × scale,
    and the parameters are torch.optim.SGD's bit for bit."""
    model, laws = build(name, dtype=dtype, seed=_seed_of(name))
    ref = copy.deepcopy(model)
    h0, s0 = laws.evaluate(model), laws.scale(model)
    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, laws=laws)
    opt.tracking_backend = "native"
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    _train_pair(model, ref, opt, o_ref, torch.Generator().manual_seed(_seed_of(name, "data")), 6)
    assert opt._native is not None and opt._native.disabled is None
    for (n, a), b in zip(ref.named_parameters(), model.parameters()):
        assert _same(a, b), n
    h, s1 = laws.evaluate(model), laws.scale(model)
    for k, d in opt.deviation().items():
        scale = torch.maximum(s0[k], s1[k]).clamp_min(1e-300)
        assert float(((d - (h[k] - h0[k])).abs() / scale).max()) <= 1e-12, k


def test_evaluator_native_backend_matches_eager():
    """LawEvaluator(backend="native") (statistics-only kernel + arena Grams) equals the eager
    plan to float64 rounding, on a family whose Gram group is shared (kept on the batched path)."""
    torch.manual_seed(_seed_of("ev"))
    model, laws = build("attention", dtype=torch.float64, seed=3)
    extra = Family("shared", "linear", "matrix", 2, [Term("attn.in_proj_weight", 0, rows(4, 0), +1),
                                                      Term("out.weight", 1, rows(4, 0), -1)])
    laws = lawset(model, list(laws.families) + [extra])
    tensors = {n: model.get_parameter(n) for n in laws.param_names}
    eager = LawEvaluator(laws, tensors)()
    ev = LawEvaluator(laws, tensors, backend="native")
    assert "shared" in [n for plan in ev._mat_rest_plans for n in plan["fams"]]  # its group is QK h0's
    got = ev()
    assert ev.backend == "native"
    scale = laws.scale(model)
    for k in eager:
        assert float(((got[k] - eager[k]).abs() / scale[k].clamp_min(1e-300)).max()) <= 1e-14, k


def test_native_resume_continues_bitwise(tmp_path):
    """A run saved at step 4 and resumed (fresh model + optimizer, native) continues its
    deviations bit for bit."""
    def run(n, state=None, model_state=None):
        torch.manual_seed(_seed_of("resume-init"))
        model = MLP()
        if model_state is not None:
            model.load_state_dict(model_state)
        opt = consopt.SGD(model.parameters(), lr=0.1, momentum=0.9, laws=mlp_laws(model))
        opt.tracking_backend = "native"
        if state is not None:
            opt.load_state_dict(state)
        g = torch.Generator().manual_seed(_seed_of("resume-data"))
        for i in range(n):
            gg = [torch.randn(p.shape, generator=g) for p in model.parameters()]
            if state is None or i >= 4:
                for p, x in zip(model.parameters(), gg):
                    p.grad = x
                opt.step()
        return model, opt

    m_full, o_full = run(8)
    m_half, o_half = run(4)
    torch.save({"opt": o_half.state_dict(), "model": m_half.state_dict()}, tmp_path / "ckpt.pt")
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    m_res, o_res = run(8, ck["opt"], ck["model"])
    for k, d in o_full.deviation().items():
        assert _same(d, o_res.deviation()[k]), k
    assert all(_same(a, b) for a, b in zip(m_full.parameters(), m_res.parameters()))


# -- fallbacks -------------------------------------------------------------------------------
def _mlp_pair(seed):
    torch.manual_seed(seed)
    ref = MLP()
    mod = copy.deepcopy(ref)
    laws = mlp_laws(mod)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    o_mod = consopt.SGD(mod.parameters(), lr=0.1, momentum=0.9, laws=laws)
    o_mod.tracking_backend = "native"
    return ref, mod, laws, o_ref, o_mod


def _step_both(ref, mod, o_ref, o_mod, g, n):
    for _ in range(n):
        for a, b in zip(ref.parameters(), mod.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        o_ref.step()
        o_mod.step()


def test_no_compiler_falls_back(monkeypatch):
    """Without a C++ compiler: one warning, torch's update, eager statistics; still exact."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(N, "_lib", None)
    monkeypatch.setattr(N, "_error", None)
    ref, mod, laws, o_ref, o_mod = _mlp_pair(_seed_of("nocxx"))
    h0 = laws.evaluate(mod)
    g = torch.Generator().manual_seed(1)
    with pytest.warns(RuntimeWarning, match="native"):
        _step_both(ref, mod, o_ref, o_mod, g, 4)
    assert all(_same(a, b) for a, b in zip(ref.parameters(), mod.parameters()))
    assert o_mod.tracking_backend == "eager"
    h, sc = laws.evaluate(mod), laws.scale(mod)
    for k, d in o_mod.deviation().items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k


def test_mismatching_first_call_is_undone(monkeypatch):
    """A kernel whose first result differs from torch's (simulated: wrong flags) is undone, torch's
    update applied instead, a warning raised, and the native step switched off."""
    ref, mod, laws, o_ref, o_mod = _mlp_pair(_seed_of("mismatch"))
    g = torch.Generator().manual_seed(2)
    _step_both(ref, mod, o_ref, o_mod, g, 1)  # first momentum step: torch's
    monkeypatch.setattr(N, "kernel_flags", lambda seg: N.MOMENTUM | N.MAXIMIZE)
    with pytest.warns(RuntimeWarning, match="differs from torch"):
        _step_both(ref, mod, o_ref, o_mod, g, 1)
    assert o_mod._native.disabled is not None
    _step_both(ref, mod, o_ref, o_mod, g, 2)
    for (n, a), b in zip(ref.named_parameters(), mod.parameters()):
        assert _same(a, b), n
        assert _same(o_ref.state[a]["momentum_buffer"], o_mod.state[b]["momentum_buffer"]), n


def test_non_contiguous_takes_torch_path():
    """A channels_last conv weight (not contiguous) keeps torch's update and eager statistics for
    that step; the result is still torch's and the deviations exact."""
    model, laws = build("cnn_bn", seed=_seed_of("cl"))
    model = model.to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    h0 = laws.evaluate(model)
    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, laws=laws)
    opt.tracking_backend = "native"
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _train_pair(model, ref, opt, o_ref, torch.Generator().manual_seed(4), 3)
    assert all(_same(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    h, sc = laws.evaluate(model), laws.scale(model)
    for k, d in opt.deviation().items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k


@pytest.mark.parametrize("change", ["moved", "grad", "buffer", "shape"])
def test_changes_between_native_steps_are_seen(change):
    """Once the native step has run (its layouts checked and kept), a change to what it reads is
    seen at the next step: a parameter moved to new memory (new pointers), a non-contiguous
    gradient or momentum buffer (torch's update for its group), a parameter of another shape
    (the error that names it). Parameters stay torch's bit for bit, deviations exact."""
    model, laws = build("mlp", torch.float32, seed=_seed_of("changes", change))
    ref = copy.deepcopy(model)
    h0 = laws.evaluate(model)
    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, laws=laws)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(_seed_of("changes-data", change))
    _train_pair(model, ref, opt, o_ref, g, 3)
    assert opt._native is not None and opt._native._layouts
    fill_grads(model, *model.example_inputs(generator=g))
    w = model.fc2.weight
    with torch.no_grad():
        if change == "moved":
            w.data = w.data.clone()
        elif change == "grad":
            w.grad = w.grad.t().contiguous().t()
        elif change == "buffer":
            opt.state[w]["momentum_buffer"] = opt.state[w]["momentum_buffer"].t().contiguous().t()
        else:
            w.data = torch.zeros(w.shape[0] + 1, w.shape[1])
            w.grad = torch.zeros_like(w.data)
            with pytest.raises(ValueError, match=r"'fc2\.weight' has shape \(12, 13\)"):
                opt.step()
            return
    assert w.grad.is_contiguous() == (change != "grad")
    for a, b in zip(ref.parameters(), model.parameters()):
        a.grad = b.grad.clone()
    opt.step()
    o_ref.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert _same(a, b) and _same(o_ref.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"])
    h, sc = laws.evaluate(model), laws.scale(model)
    for k, d in opt.deviation().items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k


def test_native_is_the_cpu_default():
    """On the CPU with a compiler the optimizer takes the native step by default: h(θ_t) comes
    from the step itself (the evaluator runs once, for h(θ_0)), and reads cost no evaluation."""
    model, laws = build("mlp", torch.float64, seed=_seed_of("default"))
    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, laws=laws)
    assert opt.tracking_backend == "native"
    calls = []
    ev = opt._tracker.evaluator
    real = type(ev).flat_values  # (what the optimizer evaluates with; evaluator() too)
    h0 = laws.evaluate(model)
    g = torch.Generator().manual_seed(_seed_of("default-data"))
    type(ev).flat_values = lambda self: (calls.append(1), real(self))[1]
    try:
        for _ in range(4):
            fill_grads(model, *model.example_inputs(generator=g))
            opt.step()
        dev = opt.deviation()
        opt.deviation_stats()
    finally:
        type(ev).flat_values = real
    assert len(calls) == 1 and opt._native is not None and opt._native.disabled is None
    h, sc = laws.evaluate(model), laws.scale(model)
    for k, d in dev.items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k


def test_native_pickle_round_trip():
    """A pickled optimizer (and its model) keeps native tracking exact: the Gram arena the kernel
    writes and the views the families read are rebuilt together."""
    import pickle

    model, laws = build("attention", dtype=torch.float64, seed=_seed_of("pickle"))
    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, laws=laws)
    g = torch.Generator().manual_seed(_seed_of("pickle-data"))
    m2, o2 = pickle.loads(pickle.dumps((model, opt)))
    h0 = o2.laws.evaluate(m2)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="consopt", category=RuntimeWarning)
        for _ in range(3):
            fill_grads(m2, *m2.example_inputs(generator=g))
            o2.step()
    assert o2.tracking_backend == "native" and o2._native.disabled is None
    h, sc = o2.laws.evaluate(m2), o2.laws.scale(m2)
    for k, d in o2.deviation().items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k


def _counting_first_calls(monkeypatch):
    calls = []
    real = N.NativeStep._first_call
    monkeypatch.setattr(N.NativeStep, "_first_call", lambda self, work: (calls.append(len(work)), real(self, work))[1])
    return calls


def test_groups_it_cannot_take_use_torch_alone(monkeypatch):
    """A bfloat16 group and a group of overlapping views take torch's update; the other groups keep
    the native step. Everything is torch.optim.SGD's bit for bit and the deviations are exact."""
    torch.manual_seed(_seed_of("mixed"))
    model = MLP()
    laws = mlp_laws(model)
    base = torch.randn(10)
    ref_model = copy.deepcopy(model)
    extra = torch.nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    ref_extra = torch.nn.Parameter(extra.detach().clone())
    views = [torch.nn.Parameter(base[0:6]), torch.nn.Parameter(base[4:10])]  # overlapping
    ref_base = base.clone()
    ref_views = [torch.nn.Parameter(ref_base[0:6]), torch.nn.Parameter(ref_base[4:10])]
    calls = _counting_first_calls(monkeypatch)
    groups = lambda m, e, v: [{"params": list(m.parameters())}, {"params": [e]}, {"params": v, "lr": 0.01}]  # noqa
    opt = consopt.SGD(groups(model, extra, views), lr=0.1, momentum=0.9, laws=laws)
    o_ref = torch.optim.SGD(groups(ref_model, ref_extra, ref_views), lr=0.1, momentum=0.9)
    h0 = laws.evaluate(model)
    g = torch.Generator().manual_seed(_seed_of("mixed-data"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="consopt", category=RuntimeWarning)
        for _ in range(4):
            for ps in ((model.parameters(), ref_model.parameters()), ([extra], [ref_extra]), (views, ref_views)):
                for a, b in zip(*ps):
                    a.grad = torch.randn(a.shape, generator=g).to(a.dtype)
                    b.grad = a.grad.clone()
            opt.step()
            o_ref.step()
    for a, b in zip(list(model.parameters()) + [extra], list(ref_model.parameters()) + [ref_extra]):
        assert _same(a, b)
    for a, b in zip(views, ref_views):  # torch updates overlapping views one after the other
        assert _same(a, b)
    assert opt._native is not None and opt._native.disabled is None and calls == [1]
    h, sc = laws.evaluate(model), laws.scale(model)
    for k, d in opt.deviation().items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k


def test_many_groups_and_flag_changes_check_once_each(monkeypatch):
    """20 param groups: each layout's first call is checked once, not at every step; changing
    weight decay (another kernel) checks again; all bitwise torch's."""
    torch.manual_seed(_seed_of("groups"))
    layers = [torch.nn.Linear(6, 6) for _ in range(20)]
    ref_layers = copy.deepcopy(layers)
    fams = [Family(f"r{i}", "rescale", "diag", 2, [Term(f"{i}.weight", 0, rows(6), +1),
                                                  Term(f"{i}.bias", 0, rows(6), +1),
                                                  Term(f"{i + 1}.weight", 1, rows(6), -1)]) for i in range(19)]
    net = torch.nn.Sequential(*layers)
    laws = lawset(net, fams)
    calls = _counting_first_calls(monkeypatch)
    opt = consopt.SGD([{"params": l.parameters()} for l in layers], lr=0.1, momentum=0.9, laws=laws)
    o_ref = torch.optim.SGD([{"params": l.parameters()} for l in ref_layers], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(_seed_of("groups-data"))
    for step in range(8):
        if step == 5:
            for o in (opt, o_ref):
                o.param_groups[3]["weight_decay"] = 0.01
        for a, b in zip(net.parameters(), (p for l in ref_layers for p in l.parameters())):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        o_ref.step()
    assert all(_same(a, b) for a, b in zip(net.parameters(), (p for l in ref_layers for p in l.parameters())))
    assert calls == [20, 20]  # step 2 (the first with momentum buffers) and step 6 (new weight decay)
    assert len(opt._native._stats._views) <= 2


def test_build_into_another_cache_when_unwritable(monkeypatch, tmp_path):
    """A cache directory that cannot be created (here: below a plain file): the library is built
    under the temporary directory instead."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CONSOPT_CACHE_DIR", str(blocker / "sub"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(N.tempfile, "tempdir", str(tmp_path / "tmp"))
    path = N._build(N._compiler())
    assert path.parent.parent == tmp_path / "tmp" and path.exists()


def test_build_refuses_a_shared_temporary_directory(monkeypatch, tmp_path):
    """The temporary-directory fallback is used only if private to this user (mode 0700): a
    directory others can write (where a library could have been planted) is refused."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CONSOPT_CACHE_DIR", str(blocker / "sub"))
    (tmp_path / "tmp").mkdir()
    shared = tmp_path / "tmp" / f"consopt-{N._uid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setattr(N.tempfile, "tempdir", str(tmp_path / "tmp"))
    with pytest.raises(N.NativeUnavailable, match="private"):
        N._build(N._compiler())


@pytest.mark.parametrize("seed", range(6))  # (whether the order shows in the bits depends on the data)
def test_groups_sharing_memory_keep_torch_order(seed):
    """A non-contiguous parameter (torch's update) overlapping a later group's parameter that the
    native step could take: the step keeps torch's order, so both are torch.optim.SGD's bits."""
    torch.manual_seed(_seed_of("order", seed))
    model = MLP()
    laws = mlp_laws(model)
    ref_model = copy.deepcopy(model)
    buf = torch.randn(12)
    ref_buf = buf.clone()
    p1, p2 = torch.nn.Parameter(buf[0:12:2]), torch.nn.Parameter(buf[0:6])
    r1, r2 = torch.nn.Parameter(ref_buf[0:12:2]), torch.nn.Parameter(ref_buf[0:6])
    opt = consopt.SGD([{"params": [p1]}, {"params": [p2] + list(model.parameters())}], lr=0.1, momentum=0.9,
                      laws=laws)
    o_ref = torch.optim.SGD([{"params": [r1]}, {"params": [r2] + list(ref_model.parameters())}], lr=0.1,
                            momentum=0.9)
    g = torch.Generator().manual_seed(_seed_of("order-data", seed))
    for _ in range(4):
        for a, b in zip([p1, p2] + list(model.parameters()), [r1, r2] + list(ref_model.parameters())):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt.step()
        o_ref.step()
    assert _same(buf, ref_buf)
    assert all(_same(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))


def test_statistics_only_layouts_are_bounded():
    """Law parameters without gradients in changing subsets: the statistics-only layouts stay
    bounded, and the deviations exact."""
    model, laws = build("llama", seed=_seed_of("subsets"))
    h0 = laws.evaluate(model)
    opt = consopt.SGD(model.parameters(), lr=0.01, momentum=0.9, laws=laws)
    g = torch.Generator().manual_seed(_seed_of("subsets-data"))
    params = list(model.parameters())
    for _ in range(40):
        keep = torch.rand(len(params), generator=g) > 0.3
        for p, k in zip(params, keep):
            p.grad = torch.randn(p.shape, generator=g) if k else None
        opt.step()
    assert len(opt._native._stats._stats_only) <= N._MAX_LAYOUTS
    h, sc = laws.evaluate(model), laws.scale(model)
    for k, d in opt.deviation().items():
        assert float(((d - (h[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12, k
