"""consopt.projection.TensorProjector: the symmetry projection on the parameter tensors (the CPU
path of ``consopt.SGD(projection="symmetry")``), against `project` and float64 re-evaluation,
and the native apply kernel (`consopt.native.ScaleApply`) against its torch formula."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

import consopt
import consopt.native as N
from consopt.laws import LawSet
from consopt.projection import TensorProjector, _lyapunov, project

from test_projection import CASES, DEV_TOL, dead_unit_mlp, rel_dev, setup

HAVE_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
BACKENDS = ["eager"] + (["native"] if HAVE_CXX else [])


def _step(m, opt, x, y, loss_fn):
    opt.zero_grad()
    loss_fn(m(x), y).backward()
    opt.step()


def _stepped(name, lr=0.1):
    """`setup(name)` after one plain SGD step, and h0 before it: (m, x, y, loss_fn, laws, fmap, h0)."""
    m, x, y, loss_fn, laws, fmap = setup(name)
    h0 = laws.evaluate(m)
    _step(m, torch.optim.SGD(m.parameters(), lr=lr), x, y, loss_fn)
    return m, x, y, loss_fn, laws, fmap, h0


def _projected_copy(m, laws, h0, **attrs):
    """A copy of m projected by a TensorProjector with `attrs` set (tables rebuilt): (copy, stats)."""
    mm = copy.deepcopy(m)
    proj = TensorProjector(laws, dict(mm.named_parameters()), backend=BACKENDS[-1])
    for k, v in attrs.items():
        setattr(proj, k, v)
    proj._build()
    return mm, proj(h0)


def _buffers(opt, params):
    return {n: opt.state[p]["momentum_buffer"] for n, p in params.items() if "momentum_buffer" in opt.state[p]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_reaches_the_level_set_keeps_the_function_and_reports_h(name, backend):
    m, x, y, loss_fn, laws, fmap = setup(name)
    h0 = laws.evaluate(m)
    params = dict(m.named_parameters())
    proj = TensorProjector(laws, params, backend=backend)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        _step(m, opt, x, y, loss_fn)
        assert rel_dev(laws, m, h0) > 1e-7  # the step really left the level set
        torch.manual_seed(7)
        before = fmap(m(x)).detach()
        stats = proj(h0, buffers=_buffers(opt, params))
        assert stats.converged and stats.skipped == 0 and stats.rounds >= 1
        assert rel_dev(laws, m, h0) <= DEV_TOL
        torch.manual_seed(7)
        after = fmap(m(x)).detach()
        assert float((after - before).norm() / before.norm()) <= 1e-10
        # the values it reports are h at the result (float64 re-evaluation)
        vals, sc = laws.evaluate(m), laws.scale(m)
        for k, v in vals.items():
            assert float(((proj.values[k] - v).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["mlp", "cnn-bn", "attention", "llama", "residual"])
def test_momentum_takes_exactly_the_parameters_action(name, backend):
    """A buffer equal to its parameter stays equal to it: every factor and matrix acts on both
    (translations, which leave velocities alone, are left out)."""
    m, x, y, loss_fn, laws, _ = setup(name)
    laws = laws.subset([f.name for f in laws if f.order == 2])
    h0 = laws.evaluate(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    _step(m, opt, x, y, loss_fn)
    params = dict(m.named_parameters())
    bufs = {n: params[n].detach().clone() for n in laws.param_names}
    before = {n: b.clone() for n, b in bufs.items()}
    stats = TensorProjector(laws, params, backend=backend)(h0, buffers=bufs)
    assert stats.converged and stats.rounds >= 1
    for n, b in bufs.items():
        assert torch.equal(b, params[n].detach()), n
    assert max(float((bufs[n] - before[n]).abs().max()) for n in bufs) > 1e-9  # they did move


def test_agrees_with_project_on_diagonal_laws():
    """Diagonal laws of an MLP have one point of each orbit on the level set: both reach it."""
    m, x, y, loss_fn, laws, _, h0 = _stepped("mlp", lr=0.2)
    a = copy.deepcopy(m)
    project(laws, dict(a.named_parameters()), h0, "symmetry")
    b, _ = _projected_copy(m, laws, h0)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-10, atol=1e-13, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_model_stops_at_its_storage_precision(backend):
    m, x, y, loss_fn, laws, _ = setup("attention")
    m = m.float()
    laws = consopt.find_laws(m, (x,), loss="cross_entropy")
    h0 = laws.evaluate(m)
    params = dict(m.named_parameters())
    proj = TensorProjector(laws, params, backend=backend)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        _step(m, opt, x, y, loss_fn)
        stats = proj(h0, buffers=_buffers(opt, params))
        assert stats.converged and stats.max_residual <= 2 * torch.finfo(torch.float32).eps
        assert rel_dev(laws, m, h0) <= 4 * torch.finfo(torch.float32).eps
        assert all(torch.isfinite(p).all() for p in m.parameters())


def test_dead_unit_is_skipped_and_counted_never_nan():
    m, laws, h0, check = dead_unit_mlp()
    stats = TensorProjector(laws, dict(m.named_parameters()), backend=BACKENDS[-1])(h0)
    assert stats.skipped >= 1 and stats.converged
    check(m)


def test_over_relaxation_cuts_the_rounds_and_lands_on_the_same_set():
    """Residual MLP: Gauss–Seidel contracts slowly there (ρ ≈ 0.8); SOR with the measured ρ
    reaches the same tolerance in fewer rounds."""
    m, x, y, loss_fn, laws, _, h0 = _stepped("residual")
    rounds = {}
    for relax in (False, True):
        mm, stats = _projected_copy(m, laws, h0, relax=relax)
        assert stats.converged and rel_dev(laws, mm, h0) <= DEV_TOL
        assert (stats.relaxation > 1.0) == relax
        rounds[relax] = stats.rounds
    assert rounds[True] < rounds[False]


def test_a_step_already_on_the_level_set_reads_nothing():
    m, x, y, loss_fn, laws, _, h0 = _stepped("mlp")
    params = dict(m.named_parameters())
    proj = TensorProjector(laws, params, backend="eager")
    assert proj(h0).rounds >= 1
    snap = {n: p.detach().clone() for n, p in params.items()}
    stats = proj(h0, values=laws.evaluate(m))
    assert stats.rounds == 0 and stats.converged
    assert all(torch.equal(p.detach(), snap[n]) for n, p in params.items())


def test_non_contiguous_parameters_take_the_torch_apply():
    m, x, y, loss_fn, laws, _, h0 = _stepped("cnn-bn")
    a = copy.deepcopy(m)
    b = copy.deepcopy(m).to(memory_format=torch.channels_last)
    assert any(not p.is_contiguous() for p in b.parameters())
    for model in (a, b):
        stats = TensorProjector(laws, dict(model.named_parameters()), backend=BACKENDS[-1])(h0)
        assert stats.converged and rel_dev(laws, model, h0) <= DEV_TOL
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-12, atol=1e-15, msg=n)


def test_sgd_symmetry_projection_uses_it_and_reports_the_projected_values():
    m, x, y, loss_fn, laws, _ = setup("attention")
    h0 = laws.evaluate(m)
    opt = consopt.SGD(m.parameters(), lr=0.05, momentum=0.9, laws=laws, projection="symmetry")
    for _ in range(3):
        _step(m, opt, x, y, loss_fn)
        assert isinstance(opt._tensor_projector, TensorProjector)
        assert opt.projection_stats.converged
        sc = laws.scale(m)
        vals = laws.evaluate(m)
        for k, d in opt.deviation().items():  # deviation() = h(θ_t) − h(θ_0), re-evaluated in float64
            assert float(((d - (vals[k] - h0[k])).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12
    state = copy.deepcopy(opt)  # a copy rebuilds its own projector on its own tensors
    assert state._tensor_projector is None


def test_lyapunov_cache_preconditions_nearby_solves_and_redecomposes_far_ones(monkeypatch):
    g = torch.Generator().manual_seed(3)
    B = torch.randn(5, 7, 11, generator=g, dtype=torch.float64)
    S = B @ B.mT
    R = torch.randn(5, 7, 7, generator=g, dtype=torch.float64)
    R = R + R.mT
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda A: (calls.append(1), eigh(A))[1])
    cache = {}

    def check(S_, X, tol):
        err = (X @ S_ + S_ @ X - R).abs().max() / R.abs().max()
        assert float(err) <= tol
        torch.testing.assert_close(X, X.mT, rtol=0, atol=1e-14 * float(X.abs().max()))

    X, _ = _lyapunov(S, R, cache, 7)
    check(S, X, 1e-12)
    assert len(calls) == 1
    E = torch.randn(5, 7, 11, generator=g, dtype=torch.float64) * 0.02
    S2 = (B + E) @ (B + E).mT  # a few per cent away: refined from the cached basis, no eigh
    X2, _ = _lyapunov(S2, R, cache, 7)
    assert len(calls) == 1
    check(S2, X2, 3e-3)
    # conjugate gradients from that basis reach a tight tolerance too, without decomposing ...
    X2, _ = _lyapunov(S2, R, cache, 7, inexact=1e-9)
    assert len(calls) == 1
    check(S2, X2, 1e-8)
    # ... but that took more than _PCG_REFRESH iterations: the next solve decomposes S2
    assert 7 not in cache
    X2, _ = _lyapunov(S2, R, cache, 7)
    assert len(calls) == 2
    check(S2, X2, 1e-12)
    B3 = torch.randn(5, 7, 11, generator=g, dtype=torch.float64)
    S3 = B3 @ B3.mT  # unrelated: decomposed again, exact
    X3, _ = _lyapunov(S3, R, cache, 7)
    assert len(calls) == 3
    check(S3, X3, 1e-12)


# -- the native apply kernel -------------------------------------------------------------------
SCALE_CASES = [((7,), (0,)), ((1,), (0,)), ((5, 3), (0, 1)), ((5, 3), (1,)), ((13, 2, 3, 3), (0, 1)),
               ((4, 3, 5), (0, 2)), ((4, 3, 5), (2,)), ((97, 257), (0, 1)), ((3, 4, 5, 6), (1, 3)), ((0, 4), (0, 1)),
               ((6, 1), (1,)), ((31, 7), ())]


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler to build the native kernel")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_apply_is_the_float64_product_rounded_once(dtype):
    g = torch.Generator().manual_seed(11)
    ps, ms, refs, specs, parts = [], [], [], [], [torch.ones(1, dtype=torch.float64)]
    off = 1
    for i, (shape, axes) in enumerate(SCALE_CASES):
        p = torch.randn(shape, generator=g, dtype=dtype)
        m = torch.randn(shape, generator=g, dtype=dtype) if i % 3 else None  # some without momentum
        slots, rp, rm = [], p.double(), (m.double() if m is not None else None)
        for a in axes:
            f = torch.rand(shape[a], generator=g, dtype=torch.float64) + 0.5
            parts.append(f)
            slots.append((a, off))
            off += shape[a]
            view = [1] * len(shape)
            view[a] = -1
            rp = rp * f.view(view)
            rm = rm * f.view(view) if rm is not None else None
        ps.append(p)
        ms.append(m)
        specs.append((shape, slots))
        refs.append((rp.to(dtype), rm.to(dtype) if rm is not None else None))
    F = torch.cat(parts)
    N.ScaleApply(specs).run(ps, ms, F)
    for (shape, axes), p, m, (rp, rm) in zip(SCALE_CASES, ps, ms, refs):
        assert torch.equal(p, rp), (shape, axes)
        if m is not None:
            assert torch.equal(m, rm), (shape, axes)


# -- review fixes: relaxation carried across calls, stale bases, changed tensors ----------------
def test_relaxation_estimates_carries_and_drops_omega():
    from consopt.projection import _Relaxation

    sor = _Relaxation(True, None)
    assert sor.next([1e-2]) == 1.0 and sor.next([1e-2, 5e-3]) == 1.0
    omega = sor.next([1e-2, 5e-3, 2.5e-3])  # steady rate 0.5: Young's ω
    assert abs(omega - 2 / (1 + 0.5 ** 0.5)) < 1e-12 and sor.mode == "estimated"
    assert sor.next([1e-2, 5e-3, 2.5e-3, 3e-3]) == omega  # one growth is tolerated
    assert sor.next([1e-2, 5e-3, 2.5e-3, 3e-3, 4e-3]) == 1.0 and sor.mode == "off"  # two: plain to the end
    carried = _Relaxation(True, (1.5, 0.3))
    assert carried.next([1e-3]) == 1.5
    assert carried.next([1e-3, 2e-3]) == 1.0 and carried.mode == "plain"  # it grew: estimate afresh
    assert carried.next([1e-3, 2e-3, 1e-3, 5e-4]) == 1.0
    assert carried.next([1e-3, 2e-3, 1e-3, 5e-4, 2.5e-4]) > 1.0 and carried.mode == "estimated"
    slow = _Relaxation(True, (1.5, 0.3))
    slow.next([1e-3])
    slow.next([1e-3, 8e-4])
    assert slow.next([1e-3, 8e-4, 7e-4]) == 1.0  # contracting worse than the carried ρ: dropped
    assert _Relaxation(False, (1.5, 0.3)).next([1e-3]) == 1.0


@pytest.mark.parametrize("name", ["residual", "mlp"])
def test_large_steps_with_momentum_stay_on_the_level_set(name):
    """Large steps change the rate between calls: the carried ω is dropped, never a crash."""
    m, x, y, loss_fn, laws, _ = setup(name)
    h0 = laws.evaluate(m)
    opt = consopt.SGD(m.parameters(), lr=0.3, momentum=0.9, laws=laws, projection="symmetry")
    for _ in range(6):
        _step(m, opt, x, y, loss_fn)
        assert opt.projection_stats.converged
        assert rel_dev(laws, m, h0) <= DEV_TOL


def test_lyapunov_never_refines_from_a_basis_with_dropped_directions():
    g = torch.Generator().manual_seed(5)
    B = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    S_low = B @ B.mT  # rank 3 of 6: directions dropped
    R = torch.randn(2, 6, 6, generator=g, dtype=torch.float64)
    R = R + R.mT
    cache = {}
    _, tiny = _lyapunov(S_low, R, cache, 6)
    assert bool(tiny.any())
    B2 = torch.randn(2, 6, 9, generator=g, dtype=torch.float64)
    S = S_low + 1e-3 * (B2 @ B2.mT)  # nearby, but every direction back
    X, tiny = _lyapunov(S, R, cache, 6)
    assert not bool(tiny.any())
    err = (X @ S + S @ X - R).abs().max() / R.abs().max()
    assert float(err) <= 1e-8


def test_a_law_parameter_of_another_shape_is_an_error_before_the_step():
    m, x, y, loss_fn, laws, _ = setup("mlp")
    h0 = laws.evaluate(m)
    opt = consopt.SGD(m.parameters(), lr=0.1, momentum=0.9, laws=laws, projection="symmetry")
    for _ in range(2):
        _step(m, opt, x, y, loss_fn)
    proj = TensorProjector(laws, dict(m.named_parameters()), backend=BACKENDS[-1])
    m[0].weight.data = m[0].weight.data[:, :2].contiguous()
    m[0].weight.grad = None
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    bufs = {n: opt.state[p]["momentum_buffer"].clone() for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="0.weight"):
        opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), before[n]) and torch.equal(opt.state[p]["momentum_buffer"], bufs[n])
    with pytest.raises(ValueError, match="0.weight"):  # the projector alone checks too
        proj(h0)


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler to build the native kernel")
def test_scale_apply_checks_its_tensors_and_bumps_versions():
    p = torch.randn(5, 3)
    F = torch.rand(9, dtype=torch.float64) + 0.5
    sa = N.ScaleApply([((5, 3), [(0, 1), (1, 6)])])
    v = p._version
    sa.run([p], [None], F)
    assert p._version > v
    for bad in ([torch.randn(3, 5)], [torch.randn(3, 5).t()], [torch.randn(5, 3, dtype=torch.float16)]):
        with pytest.raises(ValueError):
            sa.run(bad, [None], F)
    with pytest.raises(ValueError):
        sa.run([p], [torch.randn(5, 4)], F)  # a momentum buffer of another shape
    with pytest.raises(ValueError):
        sa.run([p], [None], F[:8])  # F without every slot


# -- coupled diagonal families solved together ---------------------------------------------------
def test_joint_rescale_solves_a_coupled_chain_exactly():
    """Two layers' units coupled through one weight matrix: the joint Newton solution, applied to
    the tensors explicitly, meets every h₀ (float64 re-evaluation)."""
    from consopt.projection import _joint_rescale

    g = torch.Generator().manual_seed(8)
    W1, b1 = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    W2 = torch.randn(4, 5, generator=g, dtype=torch.float64)  # rows: layer-2 units, columns: layer-1 units
    W3 = torch.randn(2, 4, generator=g, dtype=torch.float64)

    def h(W1, b1, W2, W3):  # unit j of layer 1: ‖W1[j]‖² + b1[j]² − ‖W2[:, j]‖²; layer 2: ‖W2[k]‖² − ‖W3[:, k]‖²
        return torch.cat([(W1 ** 2).sum(1) + b1 ** 2 - (W2 ** 2).sum(0), (W2 ** 2).sum(1) - (W3 ** 2).sum(0)])

    h0 = h(W1, b1, W2, W3) + 0.05 * torch.randn(9, generator=g, dtype=torch.float64)
    p = torch.cat([(W1 ** 2).sum(1) + b1 ** 2, (W2 ** 2).sum(1)])
    c = torch.cat([(W2 ** 2).sum(0), (W3 ** 2).sum(0)])
    coupling = ((W2 ** 2)[None], torch.arange(5, 9)[None], torch.ones(1, 4, dtype=torch.float64),
                torch.arange(0, 5)[None], -torch.ones(1, 5, dtype=torch.float64))
    a, ok = _joint_rescale(p, c, h0, [coupling], tol=1e-14)
    assert bool(ok.all())
    a1, a2 = a[:5], a[5:]
    got = h(W1 * a1[:, None], b1 * a1, W2 * a2[:, None] / a1[None, :], W3 / a2[None, :])
    torch.testing.assert_close(got, h0, rtol=0, atol=1e-12 * float((p + c).max()))
    # the per-unit closed form (no coupling) does not: the test is not vacuous
    from consopt.projection import _rescale

    a_sep, _ = _rescale(p, c, h0)
    sep = h(W1 * a_sep[:5, None], b1 * a_sep[:5], W2 * a_sep[5:, None] / a_sep[None, :5], W3 / a_sep[None, 5:])
    assert float((sep - h0).abs().max()) > 1e-4


def test_mlp_chain_lands_in_one_round_and_the_parameters_are_not_touched_by_the_solve():
    m, x, y, loss_fn, laws, fmap, h0 = _stepped("mlp")
    torch.manual_seed(7)
    before = fmap(m(x)).detach()
    rounds = {}
    for joint in (False, True):
        mm, stats = _projected_copy(m, laws, h0, joint_diag=joint)
        torch.manual_seed(7)
        assert float((fmap(mm(x)).detach() - before).norm() / before.norm()) <= 1e-10
        assert stats.converged and rel_dev(laws, mm, h0) <= DEV_TOL
        rounds[joint] = stats.rounds
    assert rounds[True] == 1 < rounds[False]


@pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler to build the native kernel")
@pytest.mark.parametrize("name", ["mlp", "attention", "cnn-bn"])
def test_the_first_measurement_reuses_the_native_steps_statistics(name, monkeypatch):
    """The native step's statistics of the updated parameters are the projection's first
    measurement (no statistics pass), with bitwise the same result as measuring again."""
    import consopt.projection as PP

    m, x, y, loss_fn, laws, _ = setup(name)
    m = m.float()
    x = x.float() if x.is_floating_point() else x
    y = y.float() if y.is_floating_point() else y
    laws = consopt.find_laws(m, (x,), loss=CASES[name][5])
    given = []
    values = PP._Stats.values

    def spy(self, stats=None):
        given.append(stats is not None)
        return values(self, stats)

    monkeypatch.setattr(PP._Stats, "values", spy)
    runs = []
    for reuse in (True, False):
        mm = copy.deepcopy(m)
        opt = consopt.SGD(mm.parameters(), lr=0.05, momentum=0.9, laws=copy.deepcopy(laws).bind(mm),
                          projection="symmetry")
        assert opt.tracking_backend == "native"
        if not reuse:
            project = opt._project

            def measured_again(values=None, project=project, opt=opt):
                opt._step_stats = None
                return project(values)

            opt._project = measured_again
        given.clear()
        for _ in range(3):
            _step(mm, opt, x, y, loss_fn)
        assert any(given) == reuse  # (the first step has no momentum: torch's update, no statistics)
        runs.append([p.detach().clone() for p in mm.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_rescale_root_is_accurate_for_a_small_producer_against_a_large_consumer():
    """u = a² solves p u² − h₀ u − c = 0 to the last digits also when 4pc ≪ h₀² with h₀ < 0 (a
    BatchNorm's affine feeding a wide conv), against the root in 60-digit decimal arithmetic."""
    from decimal import Decimal, getcontext

    from consopt.projection import _rescale

    getcontext().prec = 60
    g = torch.Generator().manual_seed(8)
    n = 200
    p = 10 ** (-8 * torch.rand(n, generator=g, dtype=torch.float64))  # 1 .. 1e-8
    c = 1 + 100 * torch.rand(n, generator=g, dtype=torch.float64)
    h0 = -c * (1 + 0.02 * (torch.rand(n, generator=g, dtype=torch.float64) - 0.5))  # mostly negative, near −c
    h0[::7] = c[::7] * 0.3  # and some positive
    a, ok = _rescale(p, c, h0)
    assert ok.all()
    for i in range(n):
        P, C, H = Decimal(float(p[i])), Decimal(float(c[i])), Decimal(float(h0[i]))
        u = (H + (H * H + 4 * P * C).sqrt()) / (2 * P)
        assert abs(Decimal(float(a[i])) ** 2 / u - 1) < Decimal("1e-14"), (float(p[i]), float(c[i]), float(h0[i]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_translations_of_a_later_colour_fold_into_the_closed_form(backend):
    """A CNN with BatchNorm and the cross-entropy translation of its classifier: the stream law reads
    fc's columns, the translation shifts its rows (another colour). With the translation folded
    into colour 0's closed form (`_plan_elimination`) one round lands on both level sets, where
    Gauss–Seidel between the colours took 7; the same level set, the same function."""
    m, x, y, loss_fn, laws, fmap, h0 = _stepped("cnn-bn")
    ce = [f.name for f in laws if f.kind == "translation"]
    assert ce
    runs = []
    for eliminate in (True, False):
        mm = copy.deepcopy(m)
        proj = TensorProjector(laws, dict(mm.named_parameters()), backend=backend)
        proj.eliminate = eliminate
        proj._build()
        assert (proj._plans[0]["elim"] is not None) == eliminate
        assert any(set(c) & set(ce) for c in proj.colours[1:])  # the translation is a later colour
        st = proj(h0)
        assert st.converged and rel_dev(laws, mm, h0) <= DEV_TOL
        runs.append((mm, st.rounds))
    (m1, r1), (m2, r2) = runs
    assert r1 == 1 and r2 > 2
    with torch.no_grad():
        o, o1 = m(x).softmax(-1), m1(x).softmax(-1)  # (the translation's symmetry: softmax unchanged)
    assert float((o1 - o).norm() / o.norm()) <= 1e-10


@pytest.mark.parametrize("xshape", [(2, 6), (4, 2)])
def test_translation_elimination_counts_each_terms_own_width(xshape):
    """A translation whose first term shifts X along axis 1 (K = numel / shape[1] entries per slice)
    and whose second shifts W's rows, W's columns being consumer slices of a rescale law: the
    second term's entries sit after the first's whole width; folded in, one round lands."""
    from consopt.laws import Family, LawSet, Term

    g = torch.Generator().manual_seed(0)
    shapes = dict(X=xshape, W=(3, 4), V=(4, 5))
    start = {k: torch.randn(*v, generator=g, dtype=torch.float64) for k, v in shapes.items()}
    unit = torch.arange(4).view(4, 1)
    rescale = Family("D", "rescale", "diag", 2, [Term("V", 0, unit, 1), Term("W", 1, unit, -1)])
    shift = Family("T", "translation", "vector", 1, [Term("X", 1, torch.arange(xshape[1]).view(-1, 1), 1),
                                                     Term("W", 0, torch.arange(3).view(3, 1), 1)])
    laws = LawSet([rescale, shift], {k: torch.Size(v) for k, v in shapes.items()})
    h0 = laws.evaluate(start)
    moved = {k: v * torch.exp(0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64))
             + 0.2 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in start.items()}
    rounds = []
    for eliminate in (True, False):
        ps = {k: v.clone() for k, v in moved.items()}
        proj = TensorProjector(laws, ps, backend="eager")
        proj.eliminate = eliminate
        proj._build()
        if eliminate:  # W's entries of T: after X's S·K entries (S = 1, K = numel(X) / shape[1])
            el = proj._plans[0]["elim"]
            off = proj._meas_off["T"] + xshape[0]
            assert el["h0"].tolist() == list(range(off, off + 4))
        st = proj(h0, max_rounds=200)
        assert st.converged and rel_dev(laws, ps, h0) <= DEV_TOL
        rounds.append(st.rounds)
    assert rounds[0] == 1 and rounds[1] > 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_families_take_two_newton_steps_on_their_grams_in_one_round(backend):
    """Attention-style matrix laws alone (QK per head): the Grams move exactly with the action, so
    a second Newton step needs no measurement; composed, one round lands a float32 model within
    2·eps (one step per round leaves ~res² and takes a second round). After a call that needed
    more rounds (couplings decide them) the next call takes one step per round again."""
    from consopt.laws import Family, LawSet, Term

    heads, r, d = 2, 4, 6
    fams = [Family(f"qk{h}", "attention_qk", "matrix", 2,
                   [Term("q", 0, torch.arange(h * r, (h + 1) * r).view(r, 1), 1),
                    Term("k", 0, torch.arange(h * r, (h + 1) * r).view(r, 1), -1)]) for h in range(heads)]
    laws = LawSet(fams, {"q": torch.Size((heads * r, d)), "k": torch.Size((heads * r, d))})
    g = torch.Generator().manual_seed(3)
    start = {n: torch.randn(heads * r, d, generator=g) for n in ("q", "k")}
    h0 = laws.evaluate(start)
    for newton, want in ((2, 1), (1, 2)):
        ps = {n: v.clone() for n, v in start.items()}
        proj = TensorProjector(laws, ps, backend=backend)
        proj.matrix_newton = newton
        for _ in range(3):  # drift of ~1e-3 per call, as a small SGD step leaves
            for v in ps.values():
                v.add_(1e-3 * torch.randn(v.shape, generator=g))
            st = proj(h0)
            assert st.converged and st.rounds == want
            vals, sc = laws.evaluate(ps), laws.scale(ps)
            assert max(float(((vals[k] - h0[k]).abs() / sc[k]).max()) for k in vals) <= 2.5 * torch.finfo(torch.float32).eps
    proj._prev_rounds = 3  # a coupled call: one step per round in the next
    proj.matrix_newton = 2
    for v in ps.values():
        v.add_(1e-3 * torch.randn(v.shape, generator=g))
    assert proj(h0).rounds == 2 and proj._newton == 1


def _chain_laws(params, spec):
    from consopt.laws import Family, LawSet, Term

    def rows(n):
        return torch.arange(n).view(n, 1)

    fams = [Family(name, "rescale", "diag", 2, [Term(p, a, rows(n), 1) for p, a in prod]
                   + [Term(p, a, rows(n), -1) for p, a in cons]) for name, prod, cons, n in spec]
    return LawSet(fams, {k: v.shape for k, v in params.items()})


class _Separate(TensorProjector):
    joint_diag = False


def test_a_chain_with_a_large_drift_lands_where_gauss_seidel_crawls():
    """Three rescale families chained through W and W2, every entry moved by up to e^±4: the joint
    Newton solve lands in a round or two, the separate colours need dozens."""
    g = torch.Generator().manual_seed(14)
    params = {k: torch.randn(*s, generator=g, dtype=torch.float64)
              for k, s in dict(W0=(6, 3), b0=(6,), W=(7, 6), W2=(5, 7), W3=(2, 5)).items()}
    laws = _chain_laws(params, [("A", [("W", 0)], [("W2", 1)], 7), ("B", [("W0", 0), ("b0", 0)], [("W", 1)], 6),
                                ("C", [("W2", 0)], [("W3", 1)], 5)])
    h0 = {f.name: f.value(params) for f in laws}
    drift = {k: v * torch.exp(2.0 * torch.randn(*v.shape, generator=g, dtype=torch.float64)) for k, v in params.items()}
    rounds = {}
    for cls in (TensorProjector, _Separate):
        moved = {k: v.clone() for k, v in drift.items()}
        stats = cls(laws, moved)(h0, max_rounds=500)
        assert stats.converged
        for f in laws:
            torch.testing.assert_close(f.value(moved), h0[f.name], rtol=0, atol=1e-12 * float(f.value(moved, True).max()))
        rounds[cls] = stats.rounds
    assert rounds[TensorProjector] <= 2 < 10 < rounds[_Separate]


def test_one_family_owning_rows_and_columns_of_one_matrix_is_solved_jointly():
    """A residual-stream-like diagonal family: rows and columns of the same square W."""
    g = torch.Generator().manual_seed(6)
    params = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in dict(stem=(5, 3), W=(5, 5), V=(4, 5)).items()}
    laws = _chain_laws(params, [("stream", [("stem", 0), ("W", 0)], [("W", 1), ("V", 1)], 5)])
    h0 = {f.name: f.value(params) for f in laws}
    moved = {k: v + 0.05 * torch.randn(*v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    proj = TensorProjector(laws, moved)
    assert proj._joint
    stats = proj(h0)
    assert stats.converged and stats.rounds <= 2
    torch.testing.assert_close(laws["stream"].value(moved), h0["stream"], rtol=0, atol=1e-11)


def test_uncoupled_diagonal_families_keep_the_greedy_colouring():
    m, x, y, loss_fn, laws, _ = setup("residual")
    proj = TensorProjector(laws, dict(m.named_parameters()))
    assert not proj._joint
    assert proj.colours == _Separate(laws, dict(m.named_parameters())).colours


# -- single families on odd shapes and axes, against project() ------------------------------------
_SHAPES = {"A": (6, 4, 3, 3), "B": (5, 6, 3, 3), "C": (4, 5, 6), "D": (6, 5), "E": (4, 6, 2), "b": (6,), "F": (1,),
           "G": (3, 7, 2)}


def _fam(kind, form, order, terms):
    from consopt.laws import Family, Term

    return Family("f", kind, form, order, [Term(p, ax, torch.tensor(idx, dtype=torch.int64), s) for p, ax, idx, s in terms])


def _col(n):
    return [[i] for i in range(n)]


ODD_FAMILIES = {
    "diag conv rows / conv columns + bias": ("rescale", "diag", 2, [("A", 0, _col(6), 1), ("b", 0, _col(6), 1),
                                                                     ("B", 1, _col(6), -1)]),
    "diag two slices per unit": ("rescale", "diag", 2, [("A", 0, [[0, 1], [2, 3], [4, 5]], 1),
                                                        ("B", 1, [[5, 4], [1, 0], [3, 2]], -1)]),
    "diag last axis / rows": ("rescale", "diag", 2, [("C", 2, _col(6), 1), ("D", 0, _col(6), -1)]),
    "diag partial, unordered": ("rescale", "diag", 2, [("C", 1, [[4], [1]], 1), ("G", 1, [[6], [0]], -1)]),
    "diag one element": ("rescale", "diag", 2, [("F", 0, [[0]], 1), ("C", 0, [[2]], -1)]),
    "matrix by gather": ("stream", "matrix", 2, [("D", 0, [[0], [2], [4]], 1), ("E", 1, [[1], [3], [5]], -1)]),
    "matrix two slices per unit": ("attention_vo", "matrix", 2, [("A", 0, [[0, 3], [1, 4], [2, 5]], 1),
                                                                 ("B", 1, [[0, 1], [2, 3], [4, 5]], -1)]),
    "matrix consecutive on a conv's axis 1": ("stream", "matrix", 2, [("B", 1, [[2], [3], [4]], 1),
                                                                      ("A", 0, [[3], [4], [5]], -1)]),
    "shift vector on axis 1": ("translation", "vector", 1, [("C", 1, _col(5), 1)]),
    "shift vector, two terms": ("translation", "vector", 1, [("G", 1, _col(7), 1), ("E", 0, [[1], [3]], -1)]),
    "shift diag on the last axis": ("translation", "diag", 1, [("C", 2, [[0, 1], [2, 3], [4, 5]], 1),
                                                               ("b", 0, [[0], [3], [5]], -1)]),
    "shift diag on a conv's axis 1": ("translation", "diag", 1, [("A", 1, [[0, 2], [1, 3]], 1)]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ODD_FAMILIES))
def test_single_families_on_odd_axes_match_project(case, backend):
    from consopt.laws import LawSet

    fam = _fam(*ODD_FAMILIES[case])
    laws = LawSet([fam], {k: torch.Size(v) for k, v in _SHAPES.items()})
    g = torch.Generator().manual_seed(100 + list(ODD_FAMILIES).index(case))
    start = {n: torch.randn(_SHAPES[n], generator=g, dtype=torch.float64) for n in laws.param_names}
    h0 = {"f": fam.value({n: p + 0.05 * torch.randn(p.shape, generator=g, dtype=torch.float64)
                          for n, p in start.items()})}
    mom = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in start.items()}
    ref_p, ref_m = copy.deepcopy(start), copy.deepcopy(mom)
    ref = project(laws, ref_p, h0, "symmetry", buffers=ref_m)
    got_p, got_m = copy.deepcopy(start), copy.deepcopy(mom)
    proj = TensorProjector(laws, got_p, backend=backend)
    proj.relax = False
    stats = proj(h0, buffers=got_m)
    assert ref.converged and stats.converged and proj.fallback == []
    assert float(((fam.value(got_p) - h0["f"]).abs() / fam.value(got_p, absolute=True)).max()) <= 1e-12
    for n in start:
        torch.testing.assert_close(got_p[n], ref_p[n], rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(got_m[n], ref_m[n], rtol=1e-9, atol=1e-12, msg=n)
    assert max(float((got_p[n] - start[n]).abs().max()) for n in start) > 1e-6  # it did move


@pytest.mark.parametrize("name", ["mlp", "attention", "cnn-bn"])
def test_the_euclidean_preconditioner_is_the_diagonal_of_j_jt(name):
    """‖∇h_i‖² by autograd, function by function, against `_jjt_diagonal` (the slices of these
    models' families share no entry, where it is exact)."""
    from consopt.projection import _jjt_diagonal

    m, x, y, loss_fn, laws, _ = setup(name)
    params = dict(m.named_parameters())
    scales = {f.name: f.value(params, absolute=True) for f in laws}
    want = []
    for f in laws:
        h = f.value(params).reshape(-1)
        for i in range(h.numel()):
            g = torch.autograd.grad(h[i], list(params.values()), retain_graph=True, allow_unused=True)
            want.append(sum(float((gi ** 2).sum()) for gi in g if gi is not None))
    got = _jjt_diagonal(laws.families, laws.param_shapes, scales, torch.device("cpu"))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "cnn-bn", "attention", "llama", "residual"])
def test_closed_form_law_jacobian_matches_autograd(name):
    from torch.func import jvp, vjp

    from consopt.projection import _LawJacobian

    m, x, y, loss_fn, laws, _ = setup(name)
    fams = laws.families
    assert _LawJacobian.supported(fams)
    theta = {n: p.detach().clone() for n, p in m.named_parameters() if n in set(laws.param_names)}
    g = torch.Generator().manual_seed(4)
    delta = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in theta.items()}

    def h_of(th):
        return torch.cat([f.value(th).reshape(-1) for f in fams])

    jac = _LawJacobian(fams, theta)
    want = jvp(h_of, (theta,), (delta,))[1]
    torch.testing.assert_close(jac.jv(delta), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))
    lam = torch.randn(want.numel(), generator=g, dtype=torch.float64)
    (ref,) = vjp(h_of, theta)[1](lam)
    got = jac.jtv(lam)
    for n in theta:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-12 * float(ref[n].abs().max() + 1), msg=n)


def test_euclidean_in_closed_form_is_the_autograd_solution(monkeypatch):
    import consopt.projection as PP

    m, x, y, loss_fn, laws, _, h0 = _stepped("attention")
    out = {}
    for closed in (True, False):
        mm = copy.deepcopy(m)
        monkeypatch.setattr(PP._LawJacobian, "supported", staticmethod(lambda fams, c=closed: c))
        stats = project(laws, dict(mm.named_parameters()), h0, "euclidean")
        assert stats.converged and rel_dev(laws, mm, h0) <= DEV_TOL
        out[closed] = [p.detach().clone() for p in mm.parameters()]
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_lazy_momentum_transport_is_eager_off_the_fused_path():
    m, x, y, loss_fn, laws, _ = setup("mlp")
    runs = []
    for transport in ("eager", "lazy"):
        mm = copy.deepcopy(m)
        opt = consopt.SGD(mm.parameters(), lr=0.05, momentum=0.9, projection="symmetry",
                          laws=LawSet(laws.families, laws.param_shapes, params=dict(mm.named_parameters())))
        opt.momentum_transport = transport
        for _ in range(3):
            opt.zero_grad()
            loss_fn(mm(x), y).backward()
            opt.step()
        assert opt.momentum_transport == transport and opt.momentum_transport_active == "eager"
        runs.append([t.clone() for p in mm.parameters() for t in (p.detach(), opt.state[p]["momentum_buffer"])])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_translations_after_matrix_actions_and_the_predicted_coupling_cut_the_rounds():
    """Two closed forms take what follows in the round into account (float64, tol 1e-12):
    the heads' Newton steps the shifts of out_proj's rows and of the key bias
    (`_matrix_eliminations`: the attention block lands in one round), and the norm gains'
    rescale the heads' actions on the columns they scale (`_coupled_sums`: the Llama block).
    Every variant lands on the same level set with the same function."""
    for name, attr, on, off in (("attention", "eliminate", True, False), ("llama", "coupled_iters", 3, 0)):
        m, x, y, loss_fn, laws, fmap, h0 = _stepped(name)
        torch.manual_seed(7)
        before = fmap(m(x)).detach()
        rounds = {}
        for value in (on, off):
            mm, stats = _projected_copy(m, laws, h0, **{attr: value})
            assert stats.converged and rel_dev(laws, mm, h0) <= DEV_TOL, (name, value)
            torch.manual_seed(7)
            assert float((fmap(mm(x)).detach() - before).norm() / before.norm()) <= 1e-10
            rounds[value] = stats.rounds
        assert rounds[on] < rounds[off], (name, rounds)
        if name == "attention":
            assert rounds[on] == 1


def test_an_elimination_that_would_lose_a_direction_falls_back_to_the_plain_grams():
    # Linear(1→3) → Linear(3→2), no bias, cross-entropy: the consumer Gram minus the shift's
    # s sᵀ/K (K = 2 rows) has rank 1, so S = P + C loses a direction the plain S has; such a family
    # takes the plain Grams and still lands (it is not skipped)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(1, 3, bias=False), torch.nn.Linear(3, 2, bias=False)).double()
    x = torch.randn(8, 1, dtype=torch.float64)
    laws = consopt.find_laws(m, (x,), loss="cross_entropy")
    h0 = laws.evaluate(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = m(x).softmax(-1)
    stats = TensorProjector(laws, dict(m.named_parameters()))(h0)
    assert stats.converged and stats.skipped == 0
    assert rel_dev(laws, m, h0) <= DEV_TOL
    torch.testing.assert_close(m(x).softmax(-1), before, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("norm_first", [True, False])
def test_resume_with_the_predicted_coupling_is_bitwise(norm_first, tmp_path):
    # a LayerNorm feeding the heads: colour 0's prediction solves on the heads' cached bases,
    # which travel in the checkpoint; the resumed run repeats the original bit for bit
    torch.manual_seed(0)
    x = torch.randn(4, 5, 16, dtype=torch.float64)
    y = torch.randn(4, 5, 16, dtype=torch.float64)
    model = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                             norm_first=norm_first).double()
    laws = consopt.find_laws(model, (x,))

    def step(m, o, i):
        o.zero_grad()
        xi = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i), dtype=x.dtype)
        ((m(xi) - y) ** 2).mean().backward()
        o.step()

    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, laws=laws, projection="symmetry")
    for i in range(4):
        step(model, opt, i)
    assert opt._tensor_projector._plans[0].get("mcouple") is not None or not norm_first
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2 = copy.deepcopy(model)
    m2.load_state_dict(ck["m"])
    o2 = consopt.SGD(m2.parameters(), lr=0.05, momentum=0.9, laws=copy.deepcopy(laws).bind(m2), projection="symmetry")
    o2.load_state_dict(ck["o"])
    for i in range(4, 8):
        step(model, opt, i)
        step(m2, o2, i)
        assert opt.projection_stats == o2.projection_stats
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), m2.parameters()))
        assert all(torch.equal(v, o2.deviation()[k]) for k, v in opt.deviation().items())
