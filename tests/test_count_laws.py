"""count_laws / certify: the numeric completeness certificate (issue 7).

count_laws counts the independent conservation laws as D − dim Lie(W)(θ) at random points; every
test compares it with the closed-form count and with find_laws. Models are small (D ≤ ~150) so
that the whole file runs in well under two minutes on two CPU cores.
"""

import contextlib
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consopt
import consopt.lie as lie
from consopt import models as M
from consopt.laws import Family, LawSet, Term
from consopt.lie import certify, count_laws


def sym(r):
    return r * (r + 1) // 2


def cert(model, inputs, loss=None, **kw):
    model.train()
    laws = consopt.find_laws(model, inputs, loss=loss)
    c = certify(laws, model, inputs, loss=loss, **kw)
    return laws, c


def assert_clean(c):
    """A clear, converged decision, and every claimed law orthogonal to Lie(W)(θ)."""
    res = c.lie
    assert res.converged
    assert res.gap > 1e8, res.summary()
    assert res.ad_error < 1e-6, res.summary()
    assert all(v < 1e-9 for v in c.violations.values()), c.violations
    assert res.ranks == sorted(res.ranks)


def flat_offsets(res):
    names = list(res.point)
    sizes = [res.point[n].numel() for n in names]
    offs, o = {}, 0
    for n, s in zip(names, sizes):
        offs[n] = o
        o += s
    return offs


def coordinate_rows(res, pieces):
    """Unit vectors (rows) on the given (param, flat index) coordinates of θ."""
    offs = flat_offsets(res)
    rows = torch.zeros(len(pieces), res.D, dtype=torch.float64)
    for i, (p, j) in enumerate(pieces):
        rows[i, offs[p] + j] = 1.0
    return rows


# ---------------------------------------------------------------------------------------------
# the paper's families: count = closed form = find_laws
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [False, True])
def test_shallow_relu_one_law_per_hidden_unit(bias):
    m = M.MLP([3, 5, 2], bias=bias)
    laws, c = cert(m, (torch.randn(4, 3),))
    assert c.count == 5 == laws.num_functions
    assert c.status == "complete" and c.complete
    assert c.independent == 5
    assert c.lie.D == 3 * 5 + 5 * 2 + (7 if bias else 0)
    assert_clean(c)


def test_relu_rare_activation_regions_single_input_draws():
    """One input per draw (3 fields): the adaptive sampling must still find every activation region."""
    for seed in range(4):
        res = count_laws(M.MLP([2, 4, 3]), (torch.randn(1, 2),), seed=seed)
        assert res.count == 4, res.summary()
        assert res.samples >= 512  # min_samples
    res = count_laws(M.MLP([2, 4, 3]), (torch.randn(1, 2),), min_samples=0, points=1)
    assert res.ranks[0] == 4 * 2 + 4 + 3 * 4 + 3 - 4  # D - r fields at depth 0 already


def test_linear_two_layer_matrix_law():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    laws, c = cert(m, (torch.randn(4, 3),))
    assert c.count == sym(4) == laws.num_functions
    assert c.status == "complete"
    assert len(c.lie.ranks) >= 2 and c.lie.ranks[1] > c.lie.ranks[0]  # the brackets matter here
    assert_clean(c)


@pytest.mark.parametrize("dims,bias", [([3, 3, 3, 3], False), ([2, 3, 2, 2], True)])
def test_deep_linear_is_the_sum_of_the_layer_laws(dims, bias):
    m = nn.Sequential(*[nn.Linear(a, b, bias=bias) for a, b in zip(dims[:-1], dims[1:])])
    laws, c = cert(m, (torch.randn(4, dims[0]),))
    assert c.count == sym(dims[1]) + sym(dims[2]) == laws.num_functions
    assert c.status == "complete"
    assert_clean(c)


def test_conv_relu_conv_one_law_per_hidden_channel():
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3))
    laws, c = cert(m, (torch.randn(2, 2, 6, 6),))
    assert c.count == 3 == laws.num_functions
    assert c.status == "complete"
    assert_clean(c)


def test_single_head_attention_without_bias_is_complete():
    E = 3
    m = nn.MultiheadAttention(E, 1, bias=False)
    x = torch.randn(4, 2, E)
    laws, c = cert(m, (x, x, x))
    assert c.count == 2 * sym(E) == laws.num_functions  # QQᵀ − KKᵀ and VVᵀ − OᵀO, nothing else
    assert c.status == "complete"
    assert_clean(c)


def test_single_head_attention_with_bias_key_bias_is_conserved_too():
    """With biases the key bias b_k never gets a gradient (softmax ignores q·b_k, the same for every
    key): E more conserved functions than the paper's two matrix laws; find_laws emits them as a
    translation family, and the claimed laws then span the whole orthogonal complement of Lie(W)."""
    E = 3
    m = nn.MultiheadAttention(E, 1)
    x = torch.randn(4, 2, E)
    laws, c = cert(m, (x, x, x))
    assert laws.num_functions == 2 * sym(E) + E
    assert c.count == 2 * sym(E) + E
    assert c.status == "complete"
    assert_clean(c)
    res = c.lie
    key_bias = coordinate_rows(res, [("in_proj_bias", E + j) for j in range(E)])
    assert float((key_bias @ res.basis).norm()) < 1e-10  # b_k is orthogonal to Lie(W): conserved
    G, _ = lie._law_gradients(laws, res.point, list(res.point))
    S = torch.linalg.svdvals(G / G.norm(dim=1, keepdim=True))
    assert int((S > S[0] * 1e-10).sum()) == c.count  # the claimed laws span the whole Lie(W)^⊥


def test_multihead_attention_per_head_laws_complete_without_bias():
    E, H = 4, 2
    m = nn.MultiheadAttention(E, H, bias=False)
    x = torch.randn(3, 2, E)
    laws, c = cert(m, (x, x, x))
    assert c.count == H * 2 * sym(E // H) == laws.num_functions == 12
    assert c.status == "complete"
    assert_clean(c)


# ---------------------------------------------------------------------------------------------
# laws beyond the paper
# ---------------------------------------------------------------------------------------------
def test_residual_stream_mlp():
    m = M.ResidualMLP(3, 3, 4, 2, blocks=1)
    laws, c = cert(m, (torch.randn(5, 3),))
    assert c.count == sym(3) + 4 == laws.num_functions  # stream GL(3) law + block rescale
    assert c.status == "complete"
    assert_clean(c)


class SwiGLU(nn.Module):
    def __init__(self, d=3, h=4, bias=True):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias), nn.Linear(h, d, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_swiglu_gate_law():
    m = SwiGLU()
    laws, c = cert(m, (torch.randn(5, 3),))
    assert c.count == 4 == laws.num_functions
    assert {f.kind for f in laws} == {"gate"}
    assert c.status == "complete"
    assert_clean(c)


def test_layernorm_affine_feeds_linear():
    """LN translation (exact), LN affine -> Linear rescale, ReLU rescale; the scale law (eps > 0)
    is not exact and must not be counted: it shows as a small but kept singular value."""
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    laws, c = cert(m, (torch.randn(5, 3),))
    assert {f.name for f in laws} == {"translation:0", "rescale:1", "rescale:2"}
    assert c.count == 4 + 4 + 3 == laws.num_functions
    assert c.status == "complete"
    assert_clean(c)
    assert 1e-8 < c.lie.sigma_above < 1e-3  # the eps-broken scale direction sits just above the cut


def test_batchnorm_translation_and_cross_entropy():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    laws, c = cert(m, (torch.randn(6, 3),), loss="cross_entropy")
    assert c.count == 4 + 4 + 5 == laws.num_functions  # BN bias, BN affine rescale, CE translation
    assert c.status == "complete"
    assert_clean(c)


def test_cross_entropy_adds_translation_laws():
    m = M.MLP([3, 4, 3])
    x = (torch.randn(5, 3),)
    plain = count_laws(m, x)
    ce = count_laws(m, x, loss="cross_entropy")
    assert plain.count == 4 and ce.count == 4 + 4 + 1  # column sums of the last weight + Σ bias
    laws, c = cert(m, x, loss="cross_entropy")
    assert c.status == "complete" and laws.num_functions == ce.count


def test_integer_token_inputs():
    m = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 2))
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])  # the observed range [0, 4] covers the vocabulary
    laws, c = cert(m, (tokens,))
    assert c.count == sym(3) == laws.num_functions
    assert c.status == "complete"


# ---------------------------------------------------------------------------------------------
# certify statuses
# ---------------------------------------------------------------------------------------------
def test_incomplete_lawset_is_reported_missing():
    m = M.ResidualMLP(3, 3, 4, 2, blocks=1)
    x = (torch.randn(5, 3),)
    laws = consopt.find_laws(m, x)
    part = laws.subset([n for n in laws.keys() if not n.startswith("rescale")])
    c = certify(part, m, x)
    assert c.status == "missing 4 laws"
    assert c.claimed == 6 and c.count == 10 and not c.complete
    assert "missing 4 laws" in str(c)


def test_bogus_law_is_reported_as_more_than_exist():
    """A rescale 'law' across a GELU is not conserved: certify must say so and name the family."""
    m = M.MLP([3, 4, 2], activation=nn.GELU)
    x = (torch.randn(5, 3),)
    idx = torch.arange(4)[:, None]
    fam = Family("rescale:bogus", "rescale", "diag", 2,
                 [Term("0.weight", 0, idx, +1), Term("0.bias", 0, idx, +1), Term("2.weight", 1, idx, -1)])
    shapes = {n: p.shape for n, p in m.named_parameters()}
    c = certify(LawSet([fam], shapes), m, x)
    assert consopt.find_laws(m, x).num_functions == 0 and c.count == 0
    assert c.status == "more laws claimed than exist"
    assert c.violations["rescale:bogus"] > 1e-3
    assert "Not conserved" in c.message and "rescale:bogus" in c.message


def test_find_laws_overcounts_rank_deficient_linear_layer_count():
    """Linear(2→5)→Linear(5→2) without bias: W1W1ᵀ − W2ᵀW2 has rank ≤ 2 + 2 = 4 < 5, so its 15 entries
    satisfy det = 0: only 5·4 − 4·3/2 = 14 are independent. count_laws and the rank of the laws'
    gradients both say 14, and so does find_laws' num_functions (r·K − K(K−1)/2 when r > K)."""
    m = nn.Sequential(nn.Linear(2, 5, bias=False), nn.Linear(5, 2, bias=False))
    laws, c = cert(m, (torch.randn(4, 2),))
    assert c.count == 14 and c.independent == 14
    assert all(v < 1e-9 for v in c.violations.values())  # the laws hold, they are just dependent


def test_find_laws_count_matches_numeric_count_for_wide_hidden_layer():
    m = nn.Sequential(nn.Linear(2, 5, bias=False), nn.Linear(5, 2, bias=False))
    laws, c = cert(m, (torch.randn(4, 2),))
    assert laws.num_functions == c.count


def test_relu_with_scalar_input_has_more_laws_than_rescale():
    """d = 1, no bias: units of the same weight sign act linearly together (a GL block), so there are
    more laws than one per unit; how many depends on the sign pattern (the region of θ)."""
    m = M.MLP([1, 4, 2], bias=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the count differs between random points
        laws, c = cert(m, (torch.randn(4, 1),))
    assert laws.num_functions == 4
    assert c.count > 4 and c.status.startswith("missing")


# ---------------------------------------------------------------------------------------------
# numerics and robustness
# ---------------------------------------------------------------------------------------------
def test_result_fields_and_reproducibility():
    m = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    x = (torch.randn(3, 2),)
    fused = (F.layer_norm, F.batch_norm, F.scaled_dot_product_attention, torch.get_num_threads())
    a = count_laws(m, x, seed=3)
    # the composite ops and the thread setting are restored afterwards
    assert (F.layer_norm, F.batch_norm, F.scaled_dot_product_attention, torch.get_num_threads()) == fused
    b = count_laws(m, x, seed=3)
    assert a.count == b.count == sym(3)
    assert a.singular_values == b.singular_values  # same seed, same numbers
    assert a.D == 2 * 3 + 3 + 3 * 2 + 2 and a.rank == a.D - a.count == a.ranks[-1]
    assert a.counts == [sym(3), sym(3)]
    assert a.basis.shape == (a.D, a.rank)
    torch.testing.assert_close(a.basis.T @ a.basis, torch.eye(a.rank, dtype=torch.float64))
    assert set(a.point) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert a.sigma_above > a.tol > a.sigma_below and a.gap == a.sigma_above / a.sigma_below
    assert "independent conserved functions" in a.summary()
    # the caller's model is untouched (count_laws works on a float64 copy)
    assert m[0].weight.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:count_laws. the rank may still grow")
def test_native_norm_higher_derivatives_are_caught(monkeypatch):
    """torch's fused layer_norm has wrong 3rd derivatives (pytorch#175754): count_laws runs it as plain
    ops; without that, the finite-difference check must flag the brackets."""
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = (torch.randn(5, 3),)
    good = count_laws(m, x, points=1, max_depth=2)
    assert good.ad_error < 1e-6
    monkeypatch.setattr(lie, "_composite_ops", contextlib.nullcontext)
    with pytest.warns(RuntimeWarning, match="finite differences"):
        bad = count_laws(m, x, points=1, max_depth=2)
    assert bad.ad_error > 1e-4


def test_dropout_is_a_clear_error():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with pytest.raises(RuntimeError, match="dropout"):
        count_laws(m, (torch.randn(2, 3),))


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss"):
        count_laws(M.MLP([2, 3, 1]), (torch.randn(2, 2),), loss="hinge")
    with pytest.raises(TypeError, match="nn.Module"):
        count_laws(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match="tuple"):
        count_laws(M.MLP([2, 3, 1]), {"x": torch.randn(2, 2)})
    with pytest.raises(ValueError, match="points"):
        count_laws(M.MLP([2, 3, 1]), (torch.randn(2, 2),), points=0)


def test_max_depth_too_small_is_not_converged():
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 3))
    with pytest.warns(RuntimeWarning, match="upper bound"):
        res = count_laws(m, (torch.randn(4, 3),), max_depth=0, points=1)
    assert not res.converged and res.count > sym(4)


def test_benchmark_quick(tmp_path):
    import importlib.util
    import json
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_count_laws.py"
    spec = importlib.util.spec_from_file_location("bench_count_laws", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8 and all(r["ok"] for r in rows)
    assert bench.linear_theory([2, 5, 2], False) == 14 and bench.linear_theory([3, 4, 4, 3], False) == 20


def test_certify_counts_with_the_loss_the_laws_were_found_for():
    """find_laws(loss="cross_entropy") adds the logits' translation; certify (the LawSet method and
    the function) counts with that loss unless told otherwise: without it the translation is not
    a law of the plain model, and the certificate says more laws are claimed than exist."""
    torch.manual_seed(2)
    m = M.MLP([3, 4, 3])
    x = (torch.randn(5, 3),)
    laws = consopt.find_laws(m, x, loss="cross_entropy")
    assert laws.loss == "cross_entropy" and any(f.kind == "translation" for f in laws)
    assert laws.certify(m, x).status == "complete"
    assert certify(laws, m, x).status == "complete"
    assert laws.subset(laws.keys()).certify(m, x).status == "complete"
    assert laws.certify(m, x, loss=None).status == "more laws claimed than exist"
