"""The symmetry projection on the fused path's flat buffers (consopt.projection.FlatProjector) and
its kernel (triton_kernels.project), on the CPU under TRITON_INTERPRET=1 (tests/conftest.py) and
on a GPU with CONSOPT_TEST_GPU=1 (benchmarks/gpu_check.sh).

References are independent of the code under test: the kernel against plain torch arithmetic,
the projector against `Family.value` (laws.evaluate), the model's own outputs, and
`consopt.projection.project` (PyTorch path). The two projections iterate in different orders,
so they reach points of the same level set, not necessarily the same point (for the diagonal
laws of a ReLU MLP the orbit meets the level set once, so there the points agree as well).
"""

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consopt
from consopt import models as M
from consopt.laws import Family, LawSet, Term
from consopt.projection import FlatProjector, project

from _models import GroupedConv

K = pytest.importorskip("triton_kernels.project")

ON_GPU = torch.cuda.is_available() and os.environ.get("CONSOPT_TEST_GPU") == "1"
DEV = "cuda" if ON_GPU else "cpu"
DEV_TOL = 1e-10


# ---------------------------------------------------------------------------------------------
# the kernel against torch
# ---------------------------------------------------------------------------------------------

# (shape, factor axes, translated?) per segment: 1 element, primes, 1-D / 2-D / 3-D / 4-D, an
# axis without factor, a segment with two factors, one with a shift only, one with both
SEGMENTS = [
    ((1,), (0,), False),
    ((7,), (0,), False),
    ((5, 3), (1,), False),
    ((3, 2, 5, 2), (0, 1), False),
    ((2, 3, 5), (2,), False),
    ((11, 13), (), True),
    ((4, 3), (0,), True),
    ((6,), (), False),  # in the table but untouched: factors 1
]


def _setup(dtype, gen):
    """Flat buffer with SEGMENTS at unaligned offsets, factor / shift tables, and the torch result."""
    bases, off = [], 3
    for shp, _, _ in SEGMENTS:
        bases.append(off)
        off += int(torch.Size(shp).numel()) + 2
    n = off + 1
    p = (torch.randn(n, generator=gen, dtype=torch.float64) * 3).to(dtype)
    m = (torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    fac, coef, rowt = [1.0], [0.0], [0, 0]
    shift = torch.randn(64, generator=gen, dtype=torch.float64)
    rows, ref_p, ref_m = [], p.clone(), m.clone()
    for (shp, axes, moved), base in zip(SEGMENTS, bases):
        numel = int(torch.Size(shp).numel())
        x = p[base:base + numel].view(shp).double().clone()  # (a copy even for float64)
        z = m[base:base + numel].view(shp).double().clone()
        cols = []
        for a in list(axes) + [None] * (2 - len(axes)):
            if a is None:
                cols += [0, 0, 1, 1]
                continue
            f = 0.5 + torch.rand(shp[a], generator=gen, dtype=torch.float64)
            cols += [len(fac), 1, int(torch.Size(shp[a + 1:]).numel()), shp[a]]
            fac += f.tolist()
            view = [1] * len(shp)
            view[a] = shp[a]
            x = x * f.view(view)  # same order as the kernel: x · f_A · f_B
            z = z * f.view(view)
        krow = numel // shp[0]
        if moved:  # every other row moves: row i adds c_i · D[so_i + sk·k]
            r0 = len(coef)
            sk = 1 if len(shp) > 1 and shp[0] % 2 else 0
            for i in range(shp[0]):
                c = float(torch.randn((), generator=gen, dtype=torch.float64)) if i % 2 == 0 else 0.0
                so = int(torch.randint(0, 64 - krow, (), generator=gen))
                coef.append(c)
                rowt += [so, sk]
                if c != 0.0:
                    k = torch.arange(krow)
                    x.view(shp[0], -1)[i] += c * shift[so + sk * k]
            cols += [r0, 1, krow, int(bool(axes))]
        else:
            cols += [0, 0, krow, 1]
        rows.append([base, numel] + cols)
        ref_p[base:base + numel] = x.reshape(-1).to(dtype)
        ref_m[base:base + numel] = z.reshape(-1).to(dtype)
    tabs = dict(factors=torch.tensor(fac, dtype=torch.float64), coef=torch.tensor(coef, dtype=torch.float64),
                rowtab=torch.tensor(rowt, dtype=torch.int64), shift=shift, rows=rows)
    return p, m, ref_p, ref_m, tabs


def _ulp_close(a, b, dtype, what):
    if dtype == torch.float64:
        rel = 2 ** -50
    else:
        rel = torch.finfo(dtype).eps
    a64, b64 = a.double(), b.double()
    assert ((a64 - b64).abs() <= rel * b64.abs() + 1e-300).all(), f"{what}: {(a64 - b64).abs().max().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_m", [True, False])
def test_apply_kernel_matches_torch(dtype, with_m):
    gen = torch.Generator().manual_seed(11)
    p, m, ref_p, ref_m, t = _setup(dtype, gen)
    p0 = p.clone()
    # tiny tiles and blocks: several programs per segment and several iterations per program
    table = torch.from_numpy(K.plan_tiles(t["rows"], tile=32, block=16))
    assert table.shape[0] > len(SEGMENTS)
    dev = lambda x: x.to(DEV)  # noqa: E731
    p, m = dev(p), dev(m)
    K.launch_symmetry_apply(p, m if with_m else None, dev(t["factors"]), dev(table), coef=dev(t["coef"]),
                            rowtab=dev(t["rowtab"]), shift=dev(t["shift"]), block=16)
    p, m = p.cpu(), m.cpu()
    # untranslated elements: x · f_A · f_B rounded once (through fp32, like torch's .to()) — bitwise
    moved = torch.zeros_like(p, dtype=torch.bool)
    for (shp, _, mv), row in zip(SEGMENTS, t["rows"]):
        if mv:
            moved[row[0]:row[0] + row[1]] = True
    assert torch.equal(p[~moved], ref_p[~moved]), (p[~moved] - ref_p[~moved]).abs().max()
    # translated rows: x · f + c · d (the GPU may contract it into an FMA): within one rounding
    _ulp_close(p[moved], ref_p[moved], dtype, "shifted params")
    assert (p[moved] != p0[moved]).any()
    if with_m:  # momentum: the factors only, never the shift
        assert torch.equal(m, ref_m)


def test_apply_kernel_without_shift_leaves_other_elements_and_momentum_alone():
    gen = torch.Generator().manual_seed(5)
    p = torch.randn(40, generator=gen).to(DEV)
    m = torch.randn(40, generator=gen).to(DEV)
    p0, m0 = p.clone(), m.clone()
    fac = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64, device=DEV)
    # segment [10, 16) as a (3, 2) tensor, factor on axis 0 only
    rows = [[10, 6, 1, 1, 2, 3, 0, 0, 1, 1, 0, 0, 2, 1]]
    K.launch_symmetry_apply(p, m, fac, torch.from_numpy(K.plan_tiles(rows)).to(DEV))
    f = torch.tensor([2.0, 2.0, 0.5, 0.5, 4.0, 4.0], device=DEV)
    assert torch.equal(p[10:16], p0[10:16] * f) and torch.equal(m[10:16], m0[10:16] * f)
    keep = torch.ones(40, dtype=torch.bool, device=DEV)
    keep[10:16] = False
    assert torch.equal(p[keep], p0[keep]) and torch.equal(m[keep], m0[keep])


# ---------------------------------------------------------------------------------------------
# the flat projector on float64 models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matrix_kernel_matches_the_torch_matmul(dtype):
    # x ← A x per slice x[i, j] = buf[base + i·si + j·sj], on the parameters and the momentum:
    # rows of a weight (heads along axis 0), columns (axis 1), a bias (S = 1), r = 1, prime and
    # 16+ sizes, slices longer than one program; against (A @ x.double()).to(dtype) per slice, to
    # the rounding of the float64 sums' order (≤ 1 ulp of the element type); elements outside
    # every slice untouched
    from triton_kernels.project import launch_matrix_apply, matrix_rows

    gen = torch.Generator().manual_seed(41)
    n = 4000
    p = (torch.randn(n, generator=gen) * 3).to(dtype).to(DEV)
    mom = torch.randn(n, generator=gen).to(dtype).to(DEV)
    eps = torch.finfo(dtype).eps
    for r, si, sj, S, bases in ((3, 7, 1, 7, [0, 21]), (5, 1, 13, 11, [60, 65]), (1, 1, 1, 1, [300]),
                                (17, 2, 40, 3, [400, 401]), (4, 600, 1, 600, [1000])):
        mats = (torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(3, r, r, generator=gen, dtype=torch.float64))
        sels = [2, 0][:len(bases)]
        P, Mo = p.clone(), mom.clone()
        table = torch.tensor(matrix_rows(bases, sels, r, si, sj, S, tile=256), dtype=torch.int64).to(DEV)
        launch_matrix_apply(P, Mo, mats.to(DEV), table, r)
        touched = torch.zeros(n, dtype=torch.bool)
        for b0, sel in zip(bases, sels):
            idx = (b0 + torch.arange(r)[:, None] * si + torch.arange(S)[None, :] * sj).to(DEV)
            touched[idx.reshape(-1).cpu()] = True
            A = mats[sel].to(DEV)
            for new, old in ((P, p), (Mo, mom)):
                x = old[idx].double()
                ref = (A @ x).to(dtype) if dtype == torch.float64 else (A @ x).float().to(dtype)
                bound = eps * (A.abs() @ x.abs()) + 1e-300
                err = (new[idx].double() - ref.double()).abs()
                assert bool((err <= bound).all()), (dtype, r, float((err / bound).max()))
                assert float((new[idx].double() != ref.double()).float().mean()) <= 0.05  # (mostly bitwise)
        for new, old in ((P, p), (Mo, mom)):
            assert torch.equal(new[~touched.to(DEV)], old[~touched.to(DEV)])
        P2 = p.clone()  # without momentum
        launch_matrix_apply(P2, None, mats.to(DEV), table, r)
        assert torch.equal(P2, P)
    # a skipped family's action is the identity: its slice is stored as it was, an inf included
    # (a product would give 0 · inf = NaN in every other row), next to a slice that does move
    r, si, sj, S = 5, 1, 13, 11
    mats = torch.stack([torch.eye(r, dtype=torch.float64),
                        torch.eye(r, dtype=torch.float64) + 0.3 * torch.randn(r, r, generator=gen, dtype=torch.float64)])
    P = p.clone()
    P[60 + 2 * si + 3 * sj] = float("inf")
    before = P.clone()
    table = torch.tensor(matrix_rows([60, 700], [0, 1], r, si, sj, S), dtype=torch.int64).to(DEV)
    launch_matrix_apply(P, None, mats.to(DEV), table, r)
    idx0 = (60 + torch.arange(r)[:, None] * si + torch.arange(S)[None, :] * sj).reshape(-1).to(DEV)
    idx1 = (700 + torch.arange(r)[:, None] * si + torch.arange(S)[None, :] * sj).reshape(-1).to(DEV)
    assert torch.equal(P[idx0], before[idx0]) and not bool(torch.isnan(P).any())
    assert not torch.equal(P[idx1], before[idx1])


def mse(o, t):
    return ((o - t) ** 2).mean()


def _cases():
    g = torch.Generator().manual_seed(321)
    yield ("mlp", lambda: M.MLP([5, 7, 6, 3]), torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g),
           mse, None)
    yield ("cnn-bn", lambda: M.resnet_small(in_channels=1, width=4), torch.randn(6, 1, 8, 8, generator=g),
           torch.randint(0, 10, (6,), generator=g), F.cross_entropy, "cross_entropy")
    yield ("attention", lambda: M.TransformerClassifier(vocab=17, seq_len=5, d_model=8, nhead=2, layers=1, dim_ff=12),
           torch.randint(0, 17, (6, 5), generator=g), torch.randint(0, 10, (6,), generator=g), F.cross_entropy,
           "cross_entropy")
    yield ("llama", lambda: M.LlamaClassifier(d=16, n_heads=4, n_kv_heads=2, hidden=12),
           torch.randint(0, 17, (6, 5), generator=g), torch.randint(0, 10, (6,), generator=g), F.cross_entropy,
           "cross_entropy")
    # the family on the grouped conv's refined axis is acted on by project()'s own code (fallback)
    yield ("grouped-conv", GroupedConv, torch.randn(6, 2, 5, 5, generator=g), torch.randn(6, 3, generator=g), mse, None)


CASES = {c[0]: c for c in _cases()}


def setup(name, seed=0):
    _, make, x, y, loss_fn, loss = CASES[name]
    torch.manual_seed(seed)
    m = make().double().train().to(DEV)
    x = (x.double() if x.is_floating_point() else x).to(DEV)
    y = y.to(DEV)
    laws = consopt.find_laws(m, (x,), loss=loss)
    return m, x, y, loss_fn, laws


def output(m, x, softmax=False):
    """The model's function: its outputs, or softmax(logits) when the laws include the
    cross-entropy translation (adding one value to every logit is its symmetry)."""
    torch.manual_seed(7)  # dropout, if any, draws the same mask
    with torch.no_grad():
        o = m(x).detach().clone()
    return o.softmax(-1) if softmax else o


def _bits(t):
    """t's bytes: bitwise comparisons (of a flat buffer: the padding between segments included)."""
    return t.detach().reshape(-1).view(torch.uint8)


def rel_dev(laws, params, h0):
    vals, sc = laws.evaluate(params), laws.scale(params)
    return max(float(((vals[k] - h0[k]).abs() / sc[k].clamp_min(1e-300)).max()) for k in vals)


def fused_sgd(m, laws, **kw):
    """consopt.SGD on its fused path (flat buffers), tracking `laws`."""
    opt = consopt.SGD(m.parameters(), laws=laws, **kw)
    opt._force_triton = True
    return opt


def sgd_steps(m, opt, x, y, loss_fn, n):
    for _ in range(n):
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", list(CASES))
def test_flat_projector_restores_the_laws_keeps_the_function_and_transports_momentum(name):
    m, x, y, loss_fn, laws = setup(name)
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.01, momentum=0.9)
    sgd_steps(m, opt, x, y, loss_fn, 2)  # two fused steps with momentum, unprojected
    assert opt._step_impl() == "fused"
    params = dict(m.named_parameters())
    assert rel_dev(laws, params, h0) > 1e-9  # the steps really left the level set
    before = {n: p.detach().clone() for n, p in params.items()}
    mom = {n: opt.state[p]["momentum_buffer"] for n, p in params.items()}
    mom_before = {n: b.clone() for n, b in mom.items()}
    ce = CASES[name][5] == "cross_entropy"
    out_before = output(m, x, ce)
    ref = copy.deepcopy(m)  # the PyTorch projection from the same point, for comparison
    ref_stats = project(laws, dict(ref.named_parameters()), h0, "symmetry")

    proj = FlatProjector(laws, opt._tracker.evaluator.tensors, opt._flat)
    grouped = [f.name for f in laws if any(t.groups > 1 for t in f.terms)]
    assert proj.fallback == grouped and bool(grouped) == (name == "grouped-conv")
    assert 1 <= len(proj.colours) <= 2
    stats = proj(h0)
    assert stats.converged and stats.skipped == 0 and stats.rounds >= 1
    # on the level set, measured independently of the kernels
    assert rel_dev(laws, params, h0) <= DEV_TOL
    assert stats.max_residual <= 1e-12
    # the values it reports are h at the projected point
    now, sc = laws.evaluate(params), laws.scale(params)
    for k, v in proj.values.items():
        assert float(((v - now[k]).abs() / sc[k].clamp_min(1e-300)).max()) <= 1e-12
    # the action is a symmetry: the network computes the same function
    out = output(m, x, ce)
    assert float((out - out_before).norm() / out_before.norm()) <= 1e-10
    # the parameters moved, at the size of the drift
    moved = max(float((params[n].detach() - before[n]).abs().max()) for n in params)
    assert 0 < moved < 1e-2
    # project() reaches the same level set from the same point; the batched rounds (coupled
    # diagonal families solved together, over-relaxation) take no more rounds than its plain ones
    assert ref_stats.converged and rel_dev(laws, dict(ref.named_parameters()), h0) <= DEV_TOL
    assert stats.rounds <= ref_stats.rounds + 2
    # momentum: multiplied by exactly the factor of its slice wherever only diagonal laws act
    diag_only = _diag_only_params(laws)
    assert diag_only
    for n in diag_only:
        ratio = params[n].detach() / before[n]
        ok = before[n].abs() > 1e-8
        torch.testing.assert_close(mom[n][ok], mom_before[n][ok] * ratio[ok], rtol=1e-11, atol=0)
    if name == "mlp":  # only rescale laws: every slice is transported, and the points coincide
        assert set(diag_only) == set(laws.param_names)
        for n, p in dict(ref.named_parameters()).items():
            torch.testing.assert_close(params[n], p, rtol=1e-9, atol=1e-12)


def _diag_only_params(laws):
    """Parameters touched only by order-2 diagonal laws (their slices are scaled, never mixed or shifted)."""
    bad, names = set(), set()
    for f in laws:
        for t in f.terms:
            names.add(t.param)
            if not (f.order == 2 and f.form == "diag"):
                bad.add(t.param)
    return sorted(names - bad)


def test_sgd_symmetry_projection_fused_vs_pytorch_path():
    """consopt.SGD(projection="symmetry"): the fused path (flat projector) and the PyTorch path
    (project) stay on the level set and follow the same loss trajectory (float64 ReLU MLP)."""
    m, x, y, loss_fn, laws = setup("mlp")
    ref = copy.deepcopy(m)
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.02, momentum=0.9, projection="symmetry")
    rlaws = LawSet(laws.families, laws.param_shapes, params=dict(ref.named_parameters()))
    ropt = consopt.SGD(ref.parameters(), lr=0.02, momentum=0.9, laws=rlaws, projection="symmetry",
                       fused=False)  # the PyTorch path, also on a GPU
    for step in range(3):
        losses = []
        for model, o in ((m, opt), (ref, ropt)):
            o.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            o.step()
            losses.append(float(loss))
            assert o.projection_stats.converged
            assert rel_dev(laws, dict(model.named_parameters()), h0) <= DEV_TOL
            sc = laws.scale(model)
            for k, v in o.deviation().items():  # tracked deviation: back at h(θ_0)
                assert float((v.abs() / sc[k].clamp_min(1e-300)).max()) <= DEV_TOL
        assert abs(losses[0] - losses[1]) <= 1e-8 * abs(losses[1])
    assert opt._step_impl() == "fused" and opt._projector not in (None, False)
    assert ropt._step_impl() == "torch"
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    # momentum buffers: transported alike on both paths
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ropt.state[q]["momentum_buffer"],
                                   rtol=1e-8, atol=1e-12)


def shallow(dtype=torch.float64):
    """Linear(5→7) → ReLU → Linear(7→3): one rescale family, projected in closed form (one round)."""
    torch.manual_seed(1)
    m = M.MLP([5, 7, 3]).to(dtype=dtype, device=DEV)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, generator=g, dtype=dtype).to(DEV)
    y = torch.randn(8, 3, generator=g, dtype=dtype).to(DEV)
    return m, x, y, mse, consopt.find_laws(m, (x,))


def test_float32_model_stops_at_storage_precision():
    m, x, y, loss_fn, laws = setup("mlp")
    m = m.float()
    laws.bind(m)
    x = x.float()
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9, projection="symmetry")
    sgd_steps(m, opt, x, y.float(), loss_fn, 2)
    st = opt.projection_stats
    assert opt._projector not in (None, False)
    assert st.converged and st.max_residual <= 2 * torch.finfo(torch.float32).eps and st.rounds <= 8
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= 1e-6


def test_euclidean_projection_still_runs_on_the_flat_storage():
    m, x, y, loss_fn, laws = shallow()
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9, projection="euclidean")
    sgd_steps(m, opt, x, y, loss_fn, 2)
    assert opt._step_impl() == "fused" and opt._projector is None
    params = dict(m.named_parameters())
    flat = {id(b.param.untyped_storage()) for f in opt._flat for b in f.buffers}
    assert all(id(p.untyped_storage()) in flat for p in params.values())  # still views into the buffers
    assert opt.projection_stats.converged
    assert rel_dev(laws, params, h0) <= DEV_TOL


def test_dead_unit_is_skipped_and_counted():
    m, x, y, loss_fn, laws = shallow()
    with torch.no_grad():  # unit 3 is dead from the start
        m[0].weight[3] = 0
        m[0].bias[3] = 0
        m[2].weight[:, 3] = 0
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9)
    sgd_steps(m, opt, x, y, loss_fn, 1)
    with torch.no_grad():  # a unit that died after θ_0: zero producer and consumer weights
        m[0].weight[5] = 0
        m[0].bias[5] = 0
        m[2].weight[:, 5] = 0
    proj = FlatProjector(laws, opt._tracker.evaluator.tensors, opt._flat)
    stats = proj(h0)
    assert stats.skipped == 2  # units 3 (dead from the start) and 5
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert all(torch.isfinite(b.mom).all() for f in opt._flat for b in f.buffers)
    assert stats.converged  # the dead units are left out of the residual
    (fam,) = laws.keys()
    vals, sc = laws.evaluate(m), laws.scale(m)
    live = [j for j in range(7) if j not in (3, 5)]
    assert float(((vals[fam][live] - h0[fam][live]).abs() / sc[fam][live]).max()) <= DEV_TOL
    assert float(m[0].weight.detach()[5].abs().max()) == 0.0


def test_dead_unit_through_the_optimizer_keeps_the_skip_semantics():
    # consopt.SGD's fused path hands the step's measurement to the projector, whose round 0 is
    # then the skip test: a unit that died after θ_0 is skipped and counted every step, and a
    # step that moves nothing returns after round 0 with the dead unit still left out
    m, x, y, loss_fn, laws = shallow()
    h0 = laws.evaluate(m)
    with torch.no_grad():
        m[0].weight[5] = 0
        m[0].bias[5] = 0
        m[2].weight[:, 5] = 0
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9, projection="symmetry")
    for _ in range(3):
        sgd_steps(m, opt, x, y, loss_fn, 1)
        st = opt.projection_stats
        assert st.converged and st.skipped == 1 and st.rounds >= 1
        assert all(torch.isfinite(p).all() for p in m.parameters())
    assert opt._projector and opt._projector.measure_in_step
    for g in opt.param_groups:
        g["lr"] = 0.0
    sgd_steps(m, opt, x, y, loss_fn, 1)
    st = opt.projection_stats
    assert st.rounds == 0 and st.converged and st.skipped == 1
    (fam,) = laws.keys()
    vals, sc = laws.evaluate(m), laws.scale(m)
    live = [j for j in range(7) if j != 5]
    assert float(((vals[fam][live] - h0[fam][live]).abs() / sc[fam][live]).max()) <= DEV_TOL


def test_family_the_tables_cannot_express_falls_back_to_per_family_code():
    """A family whose terms overlap each other (here a consumer term listed twice: the action is
    still x ÷ a on those columns) is handled by project()'s own per-family code, every round."""
    m, x, y, loss_fn, laws = setup("mlp")
    f1, f2 = laws.families
    neg = [t for t in f2.terms if t.sign < 0][0]
    twice = Family(f2.name + ":twice", f2.kind, f2.form, 2, list(f2.terms) + [Term(neg.param, neg.axis, neg.index, -1)])
    laws2 = LawSet([f1, twice], laws.param_shapes, params=dict(m.named_parameters()))
    h0 = laws2.evaluate(m)
    opt = fused_sgd(m, laws2, lr=0.05, momentum=0.9)
    sgd_steps(m, opt, x, y, loss_fn, 1)
    params = dict(m.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    mom = {n: opt.state[p]["momentum_buffer"].clone() for n, p in params.items()}
    out_before = output(m, x)
    proj = FlatProjector(laws2, opt._tracker.evaluator.tensors, opt._flat)
    assert proj.fallback == [twice.name] and proj.colours == [[f1.name]]
    stats = proj(h0)
    assert stats.converged and rel_dev(laws2, params, h0) <= DEV_TOL
    out = output(m, x)
    assert float((out - out_before).norm() / out_before.norm()) <= 1e-10
    for n, p in params.items():  # the fallback transports momentum too
        ratio = p.detach() / before[n]
        ok = before[n].abs() > 1e-8
        torch.testing.assert_close(opt.state[p]["momentum_buffer"][ok], mom[n][ok] * ratio[ok], rtol=1e-11, atol=0)


def test_projector_follows_a_rebuild_of_the_flat_buffers():
    m, x, y, loss_fn, laws = shallow()
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9, projection="symmetry")
    sgd_steps(m, opt, x, y, loss_fn, 1)
    proj = opt._projector
    with torch.no_grad():  # replace a parameter's storage: the FlatGroup rebuilds on the next step
        m[2].weight.data = m[2].weight.detach().clone()
    sgd_steps(m, opt, x, y, loss_fn, 1)
    assert opt._projector is proj and opt.projection_stats.converged
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= DEV_TOL


def test_conflicting_families_get_different_colours():
    """The colouring is what makes a round a Gauss–Seidel sweep: the two rescale families of the
    MLP share the middle Linear (rows of one, columns of the other) and land in different colours,
    unless diagonal families are solved together: then one colour, coupled through that Linear."""

    class Separate(FlatProjector):
        joint_diag = False

    m, x, y, loss_fn, laws = setup("mlp")
    opt = fused_sgd(m, laws, lr=0.05)
    sgd_steps(m, opt, x, y, loss_fn, 1)
    proj = Separate(laws, opt._tracker.evaluator.tensors, opt._flat)
    assert proj.colours == [[laws.families[0].name], [laws.families[1].name]]
    joint = FlatProjector(laws, opt._tracker.evaluator.tensors, opt._flat)
    assert joint.colours == [[f.name for f in laws.families]]
    assert [cp["names"] for cp in joint._plans[0]["couple"]] == [["2.weight"]]


def test_paired_bias_translation_of_a_pre_norm_layer():
    """Pre-norm layer without a final norm: Σ b_out_proj − Σ b_linear2 is conserved (one unit, two
    bias tensors of opposite sign). Both projections restore it by the shift b_A + d/n, b_B − d/n."""
    from consopt.fused import FlatGroup

    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="relu", batch_first=True, norm_first=True)
    m = m.double().to(DEV)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV)
    laws = consopt.find_laws(m, (x,))
    (pair,) = [f for f in laws if f.kind == "translation" and len(f.terms) == 2]
    h0 = laws.evaluate(m)
    params = dict(m.named_parameters())
    group = FlatGroup(list(params.values()))  # the parameters become views into flat buffers
    a, b = (params[t.param] for t in pair.terms)
    with torch.no_grad():  # move only the two biases: of all laws, only the paired one changes
        a.add_(torch.rand(a.shape, dtype=a.dtype, device=DEV) * 1e-3)
        b.sub_(torch.rand(b.shape, dtype=b.dtype, device=DEV) * 1e-3)
    moved = laws.evaluate(m)
    assert float((moved[pair.name] - h0[pair.name]).abs()) > 1e-4
    a0, b0 = a.detach().clone(), b.detach().clone()
    ref = copy.deepcopy(m)
    out_before = output(m, x)
    ref_stats = project(laws, dict(ref.named_parameters()), h0, "symmetry")
    proj = FlatProjector(laws, params, group)
    assert proj.fallback == []
    stats = proj(h0)
    for st, model in ((ref_stats, ref), (stats, m)):
        assert st.converged and rel_dev(laws, dict(model.named_parameters()), h0) <= DEV_TOL
        out = output(model, x)
        assert float((out - out_before).norm() / out_before.norm()) <= 1e-10  # absorbed downstream
    # the shift: every entry of both biases by the same d/n, with opposite signs
    d = (h0[pair.name] - moved[pair.name]) / (a.numel() + b.numel())
    torch.testing.assert_close(a.detach() - a0, d.expand_as(a0), rtol=1e-9, atol=0)
    torch.testing.assert_close(b.detach() - b0, -d.expand_as(b0), rtol=1e-9, atol=0)


@pytest.mark.parametrize("name,dtype", [(n, torch.float64) for n in CASES] + [("cnn-bn", torch.float32),
                                                                             ("mlp", torch.float32)])
def test_folded_apply_equals_apply_then_measure(name, dtype, monkeypatch):
    # a colour of diagonal families applies its factors inside the next statistics pass (the
    # statistics kernel's SCALE prologue): bitwise the same parameters, momentum, residuals and
    # values as the apply kernel followed by a statistics pass, with fewer passes
    import triton_kernels.sgd_stats as ks

    m, x, y, loss_fn, laws = setup(name)
    m = m.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    laws = LawSet(laws.families, laws.param_shapes, params=dict(m.named_parameters()))
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.01, momentum=0.9)
    sgd_steps(m, opt, x, y, loss_fn, 2)
    state0 = [(b.param.clone(), b.mom.clone()) for g in opt._flat for b in g.buffers]
    import consopt.fused as cf

    folded_launches = []  # statistics launches: True where an apply was folded in
    measured = []  # separate statistics passes
    real, real_measure = ks.launch_sgd_stats, cf.law_values_only
    monkeypatch.setattr(ks, "launch_sgd_stats",
                        lambda *a, **k: (folded_launches.append(k.get("scale") is not None), real(*a, **k))[1])
    monkeypatch.setattr(cf, "law_values_only", lambda c: (measured.append(1), real_measure(c))[1])
    results = []
    for fold in (True, False):
        for b, (p0, m0) in zip([b for g in opt._flat for b in g.buffers], state0):
            b.param.copy_(p0)
            b.mom.copy_(m0)
        proj = FlatProjector(laws, opt._tracker.evaluator.tensors, opt._flat)
        proj.fold = fold
        proj._build()
        folded_launches.clear()
        measured.clear()
        stats = proj(h0)
        assert stats.converged and stats.rounds >= 1
        n_folded = sum(p["fold"] is not None for p in proj._plans)
        assert (any(folded_launches) == (n_folded > 0)) and (fold or n_folded == 0)
        results.append((stats, proj.values, [(b.param.clone(), b.mom.clone()) for g in opt._flat for b in g.buffers],
                        n_folded, len(measured)))
    (s1, v1, b1, nf, passes1), (s2, v2, b2, _, passes2) = results
    if name in ("mlp", "cnn-bn"):  # colours of diagonal families only
        assert nf >= 1 and passes1 < passes2
    assert (s1.rounds, s1.max_residual, s1.skipped) == (s2.rounds, s2.max_residual, s2.skipped)
    for (p1, m1), (p2, m2) in zip(b1, b2):
        assert torch.equal(_bits(p1), _bits(p2)) and torch.equal(_bits(m1), _bits(m2))
    for k in v1:
        assert torch.equal(v1[k], v2[k])
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= (DEV_TOL if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eliminate", [True, False])
def test_remeasure_after_the_translation_colour_equals_a_full_measurement(dtype, eliminate, monkeypatch):
    # diagonal families, then the cross-entropy translation: the first colour is folded into the
    # whole measurement, and after the shift only the shifted segments' statistics tiles are formed
    # again: bitwise the parameters, momentum, rounds and values of a full measurement pass, which
    # is never run (without the elimination the two colours take several rounds: every round)
    import consopt.fused as cf
    import triton_kernels.sgd_stats as ks

    m, x, y, loss_fn, laws = setup("cnn-bn")
    m = m.to(dtype)
    x = x.to(dtype)
    laws = LawSet(laws.families, laws.param_shapes, params=dict(m.named_parameters()))
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9)
    sgd_steps(m, opt, x, y, loss_fn, 2)
    bufs = [b for g in opt._flat for b in g.buffers]
    state0 = [(b.param.clone(), b.mom.clone()) for b in bufs]
    read = []  # per plain statistics launch (no SCALE prologue): the segments it reads
    full = []  # full measurement passes
    real, real_measure = ks.launch_sgd_stats, cf.law_values_only
    monkeypatch.setattr(ks, "launch_sgd_stats", lambda p, g, mm, tiles, *a, **k: (
        read.append({int(s_) for s_ in tiles[:, ks.T_SEG]}) if k.get("scale") is None and not k.get("update") else None,
        real(p, g, mm, tiles, *a, **k))[1])
    monkeypatch.setattr(cf, "law_values_only", lambda c: (full.append(1), real_measure(c))[1])
    results = []
    for rem in (True, False):
        for b, (p0, m0) in zip(bufs, state0):
            b.param.copy_(p0)
            b.mom.copy_(m0)
        proj = FlatProjector(laws, opt._tracker.evaluator.tensors, opt._flat)
        proj.remeasure, proj.eliminate = rem, eliminate
        proj._build()
        first = proj._first_measurement()  # (as the fused step hands it over)
        read.clear()
        full.clear()
        stats = proj(h0, measured=first)
        assert stats.converged and (stats.rounds == 1) == eliminate
        results.append((stats, proj.values, [(b.param.clone(), b.mom.clone()) for b in bufs]))
        if rem:
            assert proj._plans[1].get("remeasure") is not None
            shifted = {k for f in laws.families if f.name in proj.colours[1] for (_, _, k), *_ in proj._fps[f.name]}
            assert len(full) == 0 and len(read) >= stats.rounds and all(r <= shifted for r in read)
            assert shifted == {k for k, p in enumerate(opt._flat[0].params) if p is m.fc.weight or p is m.fc.bias}
        else:
            assert len(full) == stats.rounds
    (s1, v1, b1), (s2, v2, b2) = results
    assert (s1.rounds, s1.max_residual, s1.skipped) == (s2.rounds, s2.max_residual, s2.skipped)
    for (p1, m1), (p2, m2) in zip(b1, b2):
        assert torch.equal(_bits(p1), _bits(p2)) and torch.equal(_bits(m1), _bits(m2))
    assert all(torch.equal(v1[k], v2[k]) for k in v1)
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= (DEV_TOL if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("name", ["mlp", "attention"])
def test_fused_step_forms_the_first_measurement(name, monkeypatch):
    # consopt.SGD(projection="symmetry") on the fused path steps over the projector's own split
    # statistics (`FlatProjector.step_laws`): the projection then starts without a statistics
    # pass, with bitwise the same parameters, momentum and law values as a step over the
    # tracker's laws followed by a measurement; the MLP (one colour, folded) reads no pass at all
    import consopt.fused as cf

    m, x, y, loss_fn, laws = setup(name)
    ref = copy.deepcopy(m)
    h0 = laws.evaluate(m)
    opts = []
    for model in (m, ref):
        lw = LawSet(laws.families, laws.param_shapes, params=dict(model.named_parameters()))
        opts.append(fused_sgd(model, lw, lr=0.02, momentum=0.9, projection="symmetry"))
    measured = []
    real = cf.law_values_only
    monkeypatch.setattr(cf, "law_values_only", lambda c: (measured.append(1), real(c))[1])
    for step in range(3):
        passes = []
        for model, o in zip((m, ref), opts):
            if o._projector:
                o._projector.measure_in_step = o is opts[0]
            measured.clear()
            o.zero_grad()
            loss_fn(model(x), y).backward()
            o.step()
            passes.append(len(measured))
            assert o.projection_stats.converged and o.projection_stats.rounds >= 1
        if step > 0:  # (the projector is built at the first projected step)
            assert passes[0] < passes[1]
            if name == "mlp":
                assert passes[0] == 0
        for p, q in zip(m.parameters(), ref.parameters()):
            assert torch.equal(p, q)
            assert torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])
        d0, d1 = opts[0].deviation(), opts[1].deviation()
        assert all(torch.equal(d0[k], d1[k]) for k in d0)
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= DEV_TOL
    sc = laws.scale(m)
    for k, v in opts[0].deviation().items():
        assert float((v.abs() / sc[k].clamp_min(1e-300)).max()) <= DEV_TOL


def test_fused_projection_with_two_param_groups_follows_the_pytorch_path():
    # two parameter groups (their own flat buffers and learning rates): the step forms the
    # projector's measurement over both, the projection acts on both, and the trajectory is the
    # PyTorch path's (project() on the parameter tensors)
    m, x, y, loss_fn, laws = setup("mlp")
    ref = copy.deepcopy(m)
    h0 = laws.evaluate(m)
    opts = []
    for model, fused in ((m, True), (ref, False)):
        ps = list(model.parameters())
        groups = [{"params": ps[:2], "lr": 0.03}, {"params": ps[2:]}]
        lw = LawSet(laws.families, laws.param_shapes, params=dict(model.named_parameters()))
        o = consopt.SGD(groups, lr=0.01, momentum=0.9, laws=lw, projection="symmetry", fused=None if fused else False)
        o._force_triton = fused
        opts.append(o)
    for _ in range(3):
        for model, o in zip((m, ref), opts):
            o.zero_grad()
            loss_fn(model(x), y).backward()
            o.step()
            assert o.projection_stats.converged
    assert opts[0]._step_impl() == "fused" and len(opts[0]._flat) == 2 and opts[0]._projector
    assert opts[1]._step_impl() != "fused"
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"],
                                   rtol=1e-8, atol=1e-12)
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= DEV_TOL
    sc = laws.scale(m)
    for k, v in opts[0].deviation().items():
        assert float((v.abs() / sc[k].clamp_min(1e-300)).max()) <= DEV_TOL


def test_first_flat_projection_failure_restores_and_falls_back(monkeypatch):
    import triton_kernels.project as kp
    import triton_kernels.sgd_stats as ks

    def broken(p_flat, m_flat, *a, **k):  # scribble, then fail as a kernel that cannot compile would
        p_flat.add_(1.0)
        if m_flat is not None:
            m_flat.add_(1.0)
        raise RuntimeError("simulated Triton compilation error")

    stats_launch = ks.launch_sgd_stats

    def broken_folded(p_flat, g_flat, m_flat, *a, **k):  # the apply folded into a statistics pass
        if k.get("scale") is None:
            return stats_launch(p_flat, g_flat, m_flat, *a, **k)
        return broken(p_flat, m_flat)

    m, x, y, loss_fn, laws = shallow()
    ref = copy.deepcopy(m)
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.05, momentum=0.9, projection="symmetry")
    rlaws = LawSet(laws.families, laws.param_shapes, params=dict(ref.named_parameters()))
    ropt = consopt.SGD(ref.parameters(), lr=0.05, momentum=0.9, laws=rlaws, projection="symmetry", fused=False)
    monkeypatch.setattr(kp, "launch_symmetry_apply", broken)
    monkeypatch.setattr(ks, "launch_sgd_stats", broken_folded)
    with pytest.warns(RuntimeWarning, match="simulated Triton compilation error"):
        sgd_steps(m, opt, x, y, loss_fn, 1)
    assert opt._projector is False and opt._step_impl() == "fused"  # the step stays fused
    sgd_steps(m, opt, x, y, loss_fn, 1)
    sgd_steps(ref, ropt, x, y, loss_fn, 2)
    for p, q in zip(m.parameters(), ref.parameters()):  # the scribbles were undone before project() ran
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ropt.state[q]["momentum_buffer"],
                                   rtol=1e-10, atol=1e-12)
    assert opt.projection_stats.converged
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= DEV_TOL
    sc = laws.scale(m)
    for k, v in opt.deviation().items():
        assert float((v.abs() / sc[k].clamp_min(1e-300)).max()) <= DEV_TOL


def test_matrix_action_strided_view_covers_the_gathered_slices():
    # heads in order along rows (axis 0) and along columns (axis 1) of a [12, 10] weight: the
    # strided view must address exactly the gathered entries, in the same order
    import numpy as np

    from consopt.projection import _as_strided, _offsets

    buf = torch.randn(7 + 12 * 10, dtype=torch.float64)[7:]  # a view with a storage offset
    for axis, r, n in ((0, 3, 4), (1, 2, 5)):
        offs = [_offsets((12, 10), axis, np.arange(h * r, (h + 1) * r)[:, None]) for h in range(n)]
        q = offs[0] - offs[0][0, 0]
        bases = [int(o[0, 0]) for o in offs]
        size, stride, off = _as_strided(q, bases)
        view = buf.as_strided(size, stride, buf.storage_offset() + off)
        idx = torch.as_tensor(np.stack([b + q for b in bases])).reshape(-1)
        assert torch.equal(view.reshape(-1), buf[idx])
    # two "layers" of 3 heads each, 50 elements apart: one [2, 3, r, S] view
    q = np.arange(2)[:, None] * 4 + np.arange(3)[None, :]
    bases = [0, 8, 16, 50, 58, 66]
    size, stride, off = _as_strided(q, bases)
    assert size == (2, 3, 2, 3) and stride == (50, 8, 4, 1) and off == 0
    idx = torch.as_tensor(np.stack([b + q for b in bases])).reshape(-1)
    assert torch.equal(buf.as_strided(size, stride, buf.storage_offset()).reshape(-1), buf[idx])
    # an irregular pattern (units out of order) or unequal spacing: no view, the gather is used
    assert _as_strided(np.array([[0, 1], [5, 6], [2, 3]]), [0]) is None
    assert _as_strided(np.array([[0, 1]]), [0, 4, 9]) is None
    assert _as_strided(np.array([[0, 1]]), [0, 4, 8, 50, 54]) is None  # ragged layers


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("path", ["kernel", "strided", "gather"])
def test_matrix_actions_by_kernel_strided_view_and_gather(monkeypatch, path, layers):
    # attention models with their matrix actions applied by the matrix kernel (the default), by
    # torch on strided views (one [layers, heads, r, S] view per slice pattern) and by torch
    # through the index gather (irregular layouts use it)
    import consopt.projection as P

    strided = path == "strided"
    monkeypatch.setattr(FlatProjector, "matrix_kernel", path == "kernel")
    if path == "gather":
        monkeypatch.setattr(P, "_as_strided", lambda q, bases: None)
    name = "attention"
    m, x, y, loss_fn, laws = setup(name)
    if layers == 2:
        torch.manual_seed(5)
        m = M.TransformerClassifier(vocab=17, seq_len=5, d_model=8, nhead=2, layers=2, dim_ff=12).double().train().to(DEV)
        laws = consopt.find_laws(m, (x,), loss="cross_entropy")
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.01, momentum=0.9)
    sgd_steps(m, opt, x, y, loss_fn, 2)
    params = dict(m.named_parameters())
    ce = CASES[name][5] == "cross_entropy"
    out_before = output(m, x, ce)
    proj = FlatProjector(laws, opt._tracker.evaluator.tensors, opt._flat)
    views = [mm["strided"] for plan in proj._plans for mm in plan["matmul"]]
    kern = [k for plan in proj._plans for k in plan["matkern"]]
    if path == "kernel":
        assert kern and not views
    else:
        assert not kern and views
        assert all(v is not None for v in views) == strided and any(v is not None for v in views) == strided
    if strided:
        assert {v[0][0] for v in views} == {layers}
    stats = proj(h0)
    assert stats.converged and rel_dev(laws, params, h0) <= DEV_TOL
    out = output(m, x, ce)
    assert float((out - out_before).norm() / out_before.norm()) <= 1e-10


def test_a_step_already_on_the_level_set_skips_the_projection():
    # after projected steps, a step that moves nothing (lr = 0) is already within the tolerance:
    # the fused step's own law values show it, so the projector reads and writes nothing
    m, x, y, loss_fn, laws = setup("mlp")
    h0 = laws.evaluate(m)
    opt = fused_sgd(m, laws, lr=0.01, momentum=0.9, projection="symmetry")
    sgd_steps(m, opt, x, y, loss_fn, 2)
    assert opt.projection_stats.rounds >= 1 and opt.projection_stats.converged
    proj = opt._projector
    calls = []
    real = proj._measure.values
    # a statistics pass of its own (`vals` given: statistics the step or a folded apply formed)
    proj._measure.values = lambda *a, **k: (k.get("vals") is None and calls.append(1), real(*a, **k))[1]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for g in opt.param_groups:
        g["lr"] = 0.0
    sgd_steps(m, opt, x, y, loss_fn, 1)
    st = opt.projection_stats
    assert st.rounds == 0 and st.converged and st.max_residual <= 1e-12 and not calls
    assert all(torch.equal(p.detach(), before[n]) for n, p in m.named_parameters())
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= DEV_TOL
    # and a step that moves: measured and projected again
    for g in opt.param_groups:
        g["lr"] = 0.01
    sgd_steps(m, opt, x, y, loss_fn, 1)
    assert opt.projection_stats.rounds >= 1
    assert not all(torch.equal(p.detach(), before[n]) for n, p in m.named_parameters())
    assert rel_dev(laws, dict(m.named_parameters()), h0) <= DEV_TOL


# -- lazy momentum transport (consopt.SGD.momentum_transport = "lazy") ------------------------

def _twins(name, dtype=torch.float64, lr=0.02):
    """The same model and data under eager and lazy momentum transport (fused path, symmetry)."""
    m, x, y, loss_fn, laws = setup(name)
    m = m.to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    models, opts = [m, copy.deepcopy(m)], []
    for model, transport in zip(models, ("eager", "lazy")):
        lw = LawSet(laws.families, laws.param_shapes, params=dict(model.named_parameters()))
        o = fused_sgd(model, lw, lr=lr, momentum=0.9, projection="symmetry")
        o.momentum_transport = transport
        opts.append(o)
    return models, opts, x, y, loss_fn, laws


def _step(model, o, x, y, loss_fn):
    o.zero_grad()
    loss_fn(model(x), y).backward()
    o.step()


@pytest.mark.parametrize("name,dtype", [("mlp", torch.float64), ("cnn-bn", torch.float64), ("mlp", torch.float32),
                                        ("cnn-bn", torch.float32)])
def test_lazy_momentum_transport_is_bitwise_the_eager_one(name, dtype, monkeypatch):
    # one round per step (each buffer slot scaled once between two steps): the lazy transport,
    # applied by the next step's kernel as it loads the buffer, gives bitwise the parameters,
    # deviations and (once synced) momentum of the eager one, while no projection pass touches
    # the momentum; between steps opt.state holds the untransported buffer
    import triton_kernels.project as kp
    import triton_kernels.sgd_stats as ks

    (me, ml), (oe, ol), x, y, loss_fn, laws = _twins(name, dtype)
    mom_args = []
    real_apply, real_stats = kp.launch_symmetry_apply, ks.launch_sgd_stats
    monkeypatch.setattr(kp, "launch_symmetry_apply", lambda p, mm, *a, **k: (mom_args.append(mm), real_apply(p, mm, *a, **k))[1])
    monkeypatch.setattr(ks, "launch_sgd_stats", lambda p, g, mm, *a, **k: (
        mom_args.append(mm) if not k.get("update") else None, real_stats(p, g, mm, *a, **k))[1])
    owed = 0
    for step in range(4):
        for model, o in zip((me, ml), (oe, ol)):
            mom_args.clear()
            _step(model, o, x, y, loss_fn)
            assert o.projection_stats.rounds == 1
            if o is ol and step > 0:
                assert ol._projector.lazy and mom_args and all(a is None for a in mom_args)
            if o is oe and step > 0:
                assert any(a is not None for a in mom_args)  # (the eager passes do write it)
        for p, q in zip(me.parameters(), ml.parameters()):
            assert torch.equal(_bits(p), _bits(q))
        de, dl = oe.deviation(), ol.deviation()
        assert all(torch.equal(de[k], dl[k]) for k in de)
        owed += sum(not torch.equal(oe.state[p]["momentum_buffer"], ol.state[q]["momentum_buffer"])
                    for p, q in zip(me.parameters(), ml.parameters()))
    assert owed > 0  # the buffers between steps really were untransported
    se, sl = oe.state_dict(), ol.state_dict()  # state_dict applies what is owed first
    for k in se["state"]:
        assert torch.equal(_bits(se["state"][k]["momentum_buffer"]), _bits(sl["state"][k]["momentum_buffer"]))
    assert not any(b.transport.dirty for g in ol._flat for b in g.buffers if b.transport is not None)
    assert rel_dev(laws, dict(ml.named_parameters()), laws.evaluate(copy.deepcopy(me))) == 0.0


@pytest.mark.parametrize("name", ["attention", "llama"])
def test_lazy_transport_next_to_matrix_actions_matches_eager_to_rounding(name, monkeypatch):
    # the attention heads' matrix actions mix rows of in_proj / out_proj that the owed diagonal
    # factors (LayerNorm gains and their consumers' columns) do not scale along: they commute, and
    # the lazy run follows the eager one to the rounding of composed factors (several rounds: the
    # eliminations, which land these blocks in one round, are off)
    monkeypatch.setattr(FlatProjector, "eliminate", False)
    (me, ml), (oe, ol), x, y, loss_fn, laws = _twins(name)
    h0 = laws.evaluate(me)
    for _ in range(3):
        for model, o in zip((me, ml), (oe, ol)):
            _step(model, o, x, y, loss_fn)
    assert ol._projector.lazy and ol._projector._plans and any(p["mat"] for p in ol._projector._plans)
    assert ol.momentum_transport_active == "lazy" and oe.momentum_transport_active == "eager"
    assert ol.projection_stats.rounds > 1 and ol.projection_stats.converged
    ol.sync_momentum()
    for (n, p), q in zip(me.named_parameters(), ml.parameters()):
        for a, b in ((p, q), (oe.state[p]["momentum_buffer"], ol.state[q]["momentum_buffer"])):
            torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12, atol=1e-12 * float(a.detach().abs().max()), msg=n)
    assert rel_dev(laws, dict(ml.named_parameters()), h0) <= DEV_TOL


def test_lazy_transport_falls_back_to_eager_for_per_family_code():
    # families acted on by project()'s own code transport the momentum through opt.state's views:
    # no lazy transport then, and the run is the eager one bit for bit
    (me, ml), (oe, ol), x, y, loss_fn, laws = _twins("grouped-conv")
    for _ in range(2):
        for model, o in zip((me, ml), (oe, ol)):
            _step(model, o, x, y, loss_fn)
    assert ol._projector.fallback and not ol._projector.lazy
    assert ol.momentum_transport == "lazy" and ol.momentum_transport_active == "eager"
    assert all(b.transport is None for g in ol._flat for b in g.buffers)
    for p, q in zip(me.parameters(), ml.parameters()):
        assert torch.equal(p, q) and torch.equal(oe.state[p]["momentum_buffer"], ol.state[q]["momentum_buffer"])


def test_lazy_transport_survives_checkpoints_rebuilds_and_switching():
    # what is owed is applied before anything reads the buffers (state_dict, a rebuild of the
    # flat storage, switching to eager) and dropped where a true buffer replaces it
    # (load_state_dict, the user): every run continues bit for bit like the eager one
    (me, ml), (oe, ol), x, y, loss_fn, laws = _twins("cnn-bn")
    both = lambda: [_step(model, o, x, y, loss_fn) for model, o in zip((me, ml), (oe, ol))]  # noqa: E731

    def same():
        for p, q in zip(me.parameters(), ml.parameters()):
            assert torch.equal(p, q)
        se, sl = oe.state_dict(), ol.state_dict()
        for k in se["state"]:
            assert torch.equal(se["state"][k]["momentum_buffer"], sl["state"][k]["momentum_buffer"])

    both()
    both()
    # a checkpoint taken while factors are owed, loaded into a new lazy optimizer
    sd = copy.deepcopy(ol.state_dict())
    m2 = copy.deepcopy(ml)
    lw = LawSet(laws.families, laws.param_shapes, params=dict(m2.named_parameters()))
    o2 = fused_sgd(m2, lw, lr=0.02, momentum=0.9, projection="symmetry")
    o2.momentum_transport = "lazy"
    o2.load_state_dict(sd)
    both()
    _step(m2, o2, x, y, loss_fn)
    for p, q in zip(me.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    # the eager twin's true buffers loaded over owed factors: the factors are dropped
    ol.load_state_dict(copy.deepcopy(oe.state_dict()))
    both()
    same()
    # a true buffer the user puts into opt.state for one parameter while the others' are owed
    both()
    assert any(b.transport.dirty for g in ol._flat for b in g.buffers if b.transport is not None)
    ol.state[ml.fc.weight]["momentum_buffer"] = oe.state[me.fc.weight]["momentum_buffer"].clone()
    both()
    same()
    # a rebuild of the flat storage while factors are owed
    both()
    assert any(b.transport.dirty for g in ol._flat for b in g.buffers if b.transport is not None)
    with torch.no_grad():
        for model in (me, ml):
            model.fc.weight.data = model.fc.weight.detach().clone()
    both()
    same()
    # another projector on the same buffers: an eager one leaves the transport alone, a lazy one
    # takes over after applying what is owed (ours then transports eagerly)
    both()
    FlatProjector(laws, ol._tracker.evaluator.tensors, ol._flat)
    assert ol._projector.lazy
    other = FlatProjector(laws, ol._tracker.evaluator.tensors, ol._flat, lazy_momentum=True)
    assert other.lazy and not ol._projector.lazy
    both()
    same()
    other.set_lazy(False)
    ol.momentum_transport = "lazy"  # (installs ours again)
    assert ol._projector.lazy
    # switching to eager applies what is owed; switching back installs the transport again
    ol.momentum_transport = "eager"
    assert not ol._projector.lazy and all(b.transport is None for g in ol._flat for b in g.buffers)
    both()
    ol.momentum_transport = "lazy"
    both()
    assert ol._projector.lazy
    same()
    with pytest.raises(ValueError, match="momentum_transport"):
        ol.momentum_transport = "later"


def test_lazy_transport_with_a_forced_first_step_keeps_untouched_buffers():
    # fused_sgd_step(first_step=True) restarts the buffers of the parameters it updates; a
    # parameter without a grad keeps its buffer (torch's semantics), which must be the transported
    # one: what is owed is applied before such a step
    from consopt.fused import fused_sgd_step

    (me, ml), (oe, ol), x, y, loss_fn, laws = _twins("mlp")
    for _ in range(2):
        for model, o in zip((me, ml), (oe, ol)):
            _step(model, o, x, y, loss_fn)
    assert any(b.transport.dirty for g in ol._flat for b in g.buffers if b.transport is not None)
    for model, o in zip((me, ml), (oe, ol)):
        o.zero_grad()
        loss_fn(model(x), y).backward()
        next(model.parameters()).grad = None
        with torch.no_grad():
            fused_sgd_step(o._flat[0], 0.02, momentum=0.9, first_step=True)
    ol.sync_momentum()
    for p, q in zip(me.parameters(), ml.parameters()):
        assert torch.equal(p, q) and torch.equal(oe.state[p]["momentum_buffer"], ol.state[q]["momentum_buffer"])


@pytest.mark.parametrize("lr", [0.05, 1e-6])
def test_flat_projection_resumes_bitwise_from_a_checkpoint(tmp_path, lr):
    # the relaxation, the cached Lyapunov bases and the skip flags one projected step hands to the
    # next travel in state_dict()["consopt"]["projector"]: a resumed run projects as the original
    # (with lr 1e-6 the steps land within the tolerance: the resumed projector must take the
    # step's own measurement as the original does, not the skip test)
    m, x, y, loss_fn, laws = setup("attention")
    m = m.float()
    lw = LawSet(laws.families, laws.param_shapes, params=dict(m.named_parameters()))
    o = fused_sgd(m, lw, lr=lr, momentum=0.9, projection="symmetry")
    sgd_steps(m, o, x, y, loss_fn, 3)
    assert o._projector and o.projection_stats.converged
    torch.save({"model": m.state_dict(), "optim": o.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert set(ckpt["optim"]["consopt"]["projector"]["bases"]) or lr < 1e-3  # attention heads: matrix families
    m2 = copy.deepcopy(m)
    m2.load_state_dict(ckpt["model"])
    o2 = fused_sgd(m2, LawSet(laws.families, laws.param_shapes, params=dict(m2.named_parameters())),
                   lr=lr, momentum=0.9, projection="symmetry")
    o2.load_state_dict(ckpt["optim"])
    for _ in range(2):
        for model, opt in ((m, o), (m2, o2)):
            _step(model, opt, x, y, loss_fn)
        assert o.projection_stats == o2.projection_stats
        for p, q in zip(m.parameters(), m2.parameters()):
            assert torch.equal(_bits(p), _bits(q))
        for k, v in o.deviation().items():
            assert torch.equal(_bits(v), _bits(o2.deviation()[k]))
