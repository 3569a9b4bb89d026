"""Projection mode (symmetry / Euclidean) and the gradient-flow reference (float64 models)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consopt
from consopt import models as M
from consopt.projection import project

from _models import EncoderDecoder, GPT2Attention, GroupedConv, QKNormAttention

DEV_TOL = 1e-10


def mse(o, t):
    return ((o - t) ** 2).mean()


def cases():
    # (name, model factory, inputs, targets, loss_fn, find_laws loss, output map for "same function")
    g = torch.Generator().manual_seed(123)
    yield ("mlp", lambda: M.MLP([5, 7, 6, 3]), torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g),
           mse, None, lambda o: o)
    yield ("cnn-bn", lambda: M.resnet_small(in_channels=1, width=4), torch.randn(8, 1, 8, 8, generator=g),
           torch.randint(0, 10, (8,), generator=g), F.cross_entropy, "cross_entropy", lambda o: o.softmax(-1))
    yield ("attention", lambda: M.TransformerClassifier(vocab=17, seq_len=6, d_model=8, nhead=2, layers=1, dim_ff=12),
           torch.randint(0, 17, (8, 6), generator=g), torch.randint(0, 10, (8,), generator=g), F.cross_entropy,
           "cross_entropy", lambda o: o.softmax(-1))
    yield ("llama", lambda: M.LlamaClassifier(d=16, n_heads=4, n_kv_heads=2, hidden=12),
           torch.randint(0, 17, (8, 6), generator=g), torch.randint(0, 10, (8,), generator=g), F.cross_entropy,
           "cross_entropy", lambda o: o.softmax(-1))
    yield ("residual", lambda: M.ResidualMLP(4, 5, 7, 3), torch.randn(8, 4, generator=g),
           torch.randn(8, 3, generator=g), mse, None, lambda o: o)
    yield ("encoder-decoder", EncoderDecoder, torch.randn(8, 5, 8, generator=g), torch.randint(0, 3, (8,), generator=g),
           F.cross_entropy, "cross_entropy", lambda o: o.softmax(-1))
    yield ("gpt2-attention", lambda: nn.Sequential(GPT2Attention(12, 3), nn.Flatten(), nn.Linear(60, 3)),
           torch.randn(8, 5, 12, generator=g), torch.randn(8, 3, generator=g), mse, None, lambda o: o)
    yield ("qk-norm-rope", lambda: nn.Sequential(QKNormAttention(), nn.Flatten(), nn.Linear(40, 3)),
           torch.randn(8, 5, 8, generator=g), torch.randn(8, 3, generator=g), mse, None, lambda o: o)
    yield ("grouped-conv", GroupedConv, torch.randn(6, 2, 5, 5, generator=g), torch.randn(6, 3, generator=g),
           mse, None, lambda o: o)


CASES = {c[0]: c for c in cases()}


def setup(name, seed=0):
    _, make, x, y, loss_fn, loss, fmap = CASES[name]
    torch.manual_seed(seed)
    m = make().double().train()
    x = x.double() if x.is_floating_point() else x
    laws = consopt.find_laws(m, (x,), loss=loss)
    return m, x, y, loss_fn, laws, fmap


def rel_dev(laws, model, h0):
    vals, sc = laws.evaluate(model), laws.scale(model)
    return max(float(((vals[k] - h0[k]).abs() / sc[k].clamp_min(1e-300)).max()) for k in vals)


@pytest.mark.parametrize("mode", ["symmetry", "euclidean"])
@pytest.mark.parametrize("name", list(CASES))
def test_projected_steps_stay_on_the_level_set(name, mode):
    m, x, y, loss_fn, laws, _ = setup(name)
    h0 = laws.evaluate(m)
    opt = consopt.SGD(m.parameters(), lr=0.05, momentum=0.9, laws=laws, projection=mode)
    plain = copy.deepcopy(m)
    popt = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for model, o in ((m, opt), (plain, popt)):
            o.zero_grad()
            loss_fn(model(x), y).backward()
            o.step()
        assert rel_dev(laws, m, h0) <= DEV_TOL
        dev = opt.deviation()
        for k, v in dev.items():
            assert float((v.abs() / laws.scale(m)[k].clamp_min(1e-300)).max()) <= DEV_TOL
    # the unprojected run really drifts, so the test above is not vacuous
    assert rel_dev(laws, plain, h0) > 1e-6


@pytest.mark.parametrize("name", list(CASES))
def test_symmetry_projection_keeps_the_function(name):
    m, x, y, loss_fn, laws, fmap = setup(name)
    h0 = laws.evaluate(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    opt.zero_grad()
    loss_fn(m(x), y).backward()
    opt.step()
    torch.manual_seed(7)
    before = fmap(m(x)).detach()
    assert rel_dev(laws, m, h0) > 1e-7
    stats = project(laws, dict(m.named_parameters()), h0, "symmetry")
    assert stats.converged and stats.skipped == 0
    torch.manual_seed(7)
    after = fmap(m(x)).detach()
    assert float((after - before).norm() / before.norm()) <= 1e-10
    assert rel_dev(laws, m, h0) <= DEV_TOL


def test_euclidean_is_nearer_than_symmetry_and_satisfies_lagrange():
    m, x, y, loss_fn, laws, _ = setup("mlp")
    h0 = laws.evaluate(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.2)
    opt.zero_grad()
    loss_fn(m(x), y).backward()
    opt.step()
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    results = {}
    for mode in ("symmetry", "euclidean"):
        mm = copy.deepcopy(m)
        project(laws, dict(mm.named_parameters()), h0, mode)
        results[mode] = {n: p.detach().clone() for n, p in mm.named_parameters()}
        assert rel_dev(laws, mm, h0) <= DEV_TOL
    dist = {k: sum(float(((v[n] - theta[n]) ** 2).sum()) for n in theta) for k, v in results.items()}
    assert dist["euclidean"] < dist["symmetry"]
    # KKT: θ_e − θ = Σ_f Σ_j μ_fj ∇h_fj(θ_e). Check it by least squares over the law gradients.
    mm = copy.deepcopy(m)
    for n, p in mm.named_parameters():
        p.data.copy_(results["euclidean"][n])
    params = dict(mm.named_parameters())
    grads = []
    for f in laws:
        h = f.value(params)
        for j in range(h.numel()):
            g = torch.autograd.grad(h.reshape(-1)[j], list(params.values()), retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                                    for gi, p in zip(g, params.values())]))
    G = torch.stack(grads, 1)
    d = torch.cat([(results["euclidean"][n] - theta[n]).reshape(-1) for n in theta])
    coef = torch.linalg.lstsq(G, d[:, None]).solution
    assert float((G @ coef - d[:, None]).norm() / d.norm()) < 1e-6


def test_momentum_is_transported_by_the_symmetry_action():
    m, x, y, loss_fn, laws, _ = setup("mlp")
    h0 = laws.evaluate(m)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        loss_fn(m(x), y).backward()
        opt.step()
    params = dict(m.named_parameters())
    bufs = {n: opt.state[p]["momentum_buffer"] for n, p in params.items()}
    before_p = {n: p.detach().clone() for n, p in params.items()}
    before_b = {n: b.clone() for n, b in bufs.items()}
    project(laws, params, h0, "symmetry", buffers=bufs)
    # For the first hidden layer: row j of fc0 (weight and bias) is scaled by a_j, column j of fc2 by 1/a_j;
    # the buffers by exactly the same factors.
    a = params["0.weight"].detach()[:, 0] / before_p["0.weight"][:, 0]
    torch.testing.assert_close(bufs["0.weight"], before_b["0.weight"] * a[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(bufs["0.bias"], before_b["0.bias"] * a, rtol=1e-12, atol=0)
    assert float((a - 1).abs().max()) > 1e-8


def dead_unit_mlp(dead_at_start: bool = True):
    """The MLP with hidden unit 3 of its first layer dead (all-zero slices) after a random
    perturbation of everything else, and at θ_0 too (h₀ = 0 there) or not (pruned mid-run:
    h₀ ≠ 0, which no point near the dead unit reaches): (model, laws, h0, check), where
    check(model) asserts every parameter finite and every other unit of that family back on h0."""
    m, x, y, loss_fn, laws, _ = setup("mlp")

    def kill():
        with torch.no_grad():
            m[0].weight[3] = 0
            m[0].bias[3] = 0
            m[2].weight[:, 3] = 0

    if dead_at_start:
        kill()
    h0 = laws.evaluate(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    kill()
    fam = [f for f in laws if f.modules[0] == "0"][0].name
    assert dead_at_start or float(h0[fam][3].abs()) > 1e-3
    others = [j for j in range(7) if j != 3]

    def check(model):
        assert all(torch.isfinite(p).all() for p in model.parameters())
        torch.testing.assert_close(laws.evaluate(model)[fam][others], h0[fam][others], rtol=0,
                                   atol=1e-10 * float(laws.scale(model)[fam].max()))

    return m, laws, h0, check


@pytest.mark.parametrize("mode", ["symmetry", "euclidean"])
@pytest.mark.parametrize("dead_at_start", [True, False])
def test_dead_unit_is_skipped_and_counted(mode, dead_at_start):
    m, laws, h0, check = dead_unit_mlp(dead_at_start)
    stats = project(laws, dict(m.named_parameters()), h0, mode)
    assert stats.skipped == 1 and stats.converged
    check(m)


@pytest.mark.parametrize("mode", ["symmetry", "euclidean"])
def test_unit_with_an_empty_side_and_h0_beyond_it_is_skipped(mode):
    """Producer side of unit 3 zeroed, its consumer kept, h₀ > 0: h = −c ≤ 0 moves towards 0 at best."""
    m, x, y, loss_fn, laws, _ = setup("mlp")
    fam = [f for f in laws if f.modules[0] == "0"][0].name
    with torch.no_grad():
        m[0].weight[3].mul_(10)  # h₀ > 0 for unit 3
        h0 = laws.evaluate(m)
        assert float(h0[fam][3]) > 0
        m[0].weight[3] = 0
        m[0].bias[3] = 0
        m[2].weight.add_(torch.randn_like(m[2].weight) * 1e-3)
    stats = project(laws, dict(m.named_parameters()), h0, mode)
    assert stats.skipped == 1 and stats.converged
    assert all(torch.isfinite(p).all() for p in m.parameters())
    others = [j for j in range(7) if j != 3]
    torch.testing.assert_close(laws.evaluate(m)[fam][others], h0[fam][others], rtol=0,
                               atol=1e-10 * float(laws.scale(m)[fam].max()))


@pytest.mark.parametrize("mode", ["symmetry", "euclidean"])
def test_matrix_family_with_a_dead_row_is_skipped_whole(mode):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    laws = consopt.find_laws(m, (torch.randn(2, 4, dtype=torch.float64),))
    (fam,) = [f.name for f in laws if f.form == "matrix"]
    h0 = laws.evaluate(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
        m[0].weight[1] = 0  # row 1 of the producer and column 1 of the consumer: P₁₁ = C₁₁ = 0 ≠ h₀₁₁
        m[0].bias[1] = 0
        m[1].weight[:, 1] = 0
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    stats = project(laws, dict(m.named_parameters()), h0, mode)
    assert stats.skipped == 1 and stats.converged
    assert all(torch.isfinite(p).all() for p in m.parameters())
    if mode == "euclidean":  # no family left to act with: nothing moves (the symmetry mode takes
        # its Newton step on the directions `_lyapunov` keeps, once)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0, msg=n)


def _moved_with_an_inf(name, where):
    """setup(name) with h0 at θ_0, then every parameter moved by ~1e-3 and the entry
    `where(model)` = (tensor, index) set to inf: (model, laws, h0)."""
    m, x, y, loss_fn, laws, _ = setup(name)
    h0 = laws.evaluate(m)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
        t, i = where(m)
        t[i] = float("inf")
    return m, laws, h0


@pytest.mark.parametrize("mode", ["symmetry", "euclidean", "batched"])
def test_non_finite_translation_is_skipped_and_the_rest_projected(mode):
    # the classifier's bias (the cross-entropy translation) holds an inf: that family is skipped
    # and counted, the shift never spreads it, every other family lands
    m, laws, h0 = _moved_with_an_inf("cnn-bn", lambda m: (m.fc.bias, 1))
    (trans,) = [f.name for f in laws if f.kind == "translation" and "fc" in f.params()[0]]
    before = m.fc.bias.detach().clone()
    if mode == "batched":  # (consopt.SGD's CPU path)
        from consopt.projection import TensorProjector

        stats = TensorProjector(laws, dict(m.named_parameters()))(h0)
    else:
        stats = project(laws, dict(m.named_parameters()), h0, mode)
    assert stats.skipped == 1 and stats.converged
    assert not any(torch.isnan(p).any() for p in m.parameters())
    assert torch.equal(m.fc.bias.detach(), before)  # (no other family moves it)
    vals, sc = laws.evaluate(m), laws.scale(m)
    for k in vals:
        if k != trans:
            assert float(((vals[k] - h0[k]).abs() / sc[k].clamp_min(1e-300)).max()) <= DEV_TOL, k


@pytest.mark.parametrize("mode", ["symmetry", "euclidean"])
def test_non_finite_entry_is_skipped_and_stays_where_it_is(mode):
    m, laws, h0 = _moved_with_an_inf("mlp", lambda m: (m[0].weight, (2, 1)))
    stats = project(laws, dict(m.named_parameters()), h0, mode)
    assert stats.skipped == 1
    assert float(m[0].weight.detach()[2, 1]) == float("inf")
    assert not any(torch.isnan(p).any() for p in m.parameters())
    fam = [f for f in laws if f.modules[0] == "0"][0].name
    others = [j for j in range(7) if j != 2]
    torch.testing.assert_close(laws.evaluate(m)[fam][others], h0[fam][others], rtol=0,
                               atol=1e-10 * float(laws.scale(m)[fam][others].max()))


def test_translation_projection_is_a_shift():
    m = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    laws = consopt.find_laws(m, (torch.randn(2, 5, dtype=torch.float64),))
    fam = laws["translation:0"]
    h0 = laws.evaluate(m)
    with torch.no_grad():
        m[0].weight.add_(torch.randn_like(m[0].weight) * 0.01)
        m[0].bias.add_(torch.randn_like(m[0].bias) * 0.01)
    w_before = m[0].weight.detach().clone()
    x = torch.randn(4, 5, dtype=torch.float64)
    out = m(x).detach()
    project(laws.subset([fam.name]), dict(m.named_parameters()), h0, "symmetry")
    diff = m[0].weight.detach() - w_before
    torch.testing.assert_close(diff, diff[:1].expand_as(diff), rtol=0, atol=1e-15)  # W + 1vᵀ
    torch.testing.assert_close(laws.evaluate(m)[fam.name], h0[fam.name], rtol=0, atol=1e-13)
    torch.testing.assert_close(m(x).detach(), out, rtol=1e-10, atol=1e-12)  # LayerNorm absorbs it


# ---------------------------------------------------------------------------------------------
# gradient-flow reference
# ---------------------------------------------------------------------------------------------
def test_flow_conserves_every_law_and_sgd_converges_to_it_linearly():
    from consopt.flow import compare, format_comparison, gradient_flow

    torch.manual_seed(0)
    # a linear network: its flow is smooth (ReLU kinks make adaptive solvers crawl at tight tolerances)
    m = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)).double().train()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    laws = consopt.find_laws(m, (x,))
    T = 0.32
    lrs = [0.02, 0.01, 0.005]
    res = compare(m, x, y, mse, T, lrs, laws=laws, checkpoints=2, rtol=1e-10, atol=1e-12)
    assert max(res["flow"]["law_dev"]) < 1e-7
    final = {(r["lr"], r["mode"]): r for r in res["runs"]}
    dist = [final[(lr, "plain")]["param_dist"][-1] for lr in lrs]
    slope = np.polyfit(np.log(lrs), np.log(dist), 1)[0]
    assert abs(slope - 1.0) <= 0.2, (slope, dist)
    for lr in lrs:
        for mode in ("symmetry", "euclidean"):
            r = final[(lr, mode)]
            assert max(r["law_dev"]) <= DEV_TOL
            ratio = r["param_dist"][-1] / final[(lr, "plain")]["param_dist"][-1]
            assert 0.2 < ratio < 5, (lr, mode, ratio)
        assert final[(lr, "plain")]["law_dev"][-1] > 1e-8
    text = format_comparison(res)
    assert "symmetry" in text and "flow" in text
    # the flow itself, at t = 0, is the starting point
    start = gradient_flow(m, x, y, mse, [0.0, 0.01])[0]
    for n, p in m.named_parameters():
        assert torch.equal(start[n], p.detach())
