"""consopt.functional: the float64 per-axis statistics behind every diag/vector law, eager
(chunked) and graph (blocked column sums, for torch.compile), against a float64 reference; the
evaluator's one-vector values against its per-family ones."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import consopt
from consopt import functional as CF
from consopt.laws import Family, FamilyValues, Term

from _models import build, fill_grads, lawset, rows

# n0 around the column-block height: fewer than two blocks, exact blocks, blocks + remainder
SHAPES = [(1,), (7,), (1, 1), (5, 3), (63, 11), (64, 7), (97, 13), (130, 2, 3), (67, 5, 3, 3), (3, 1, 2, 5)]


def _ref(p: torch.Tensor, op: str, axis: int) -> torch.Tensor:
    x = p.to(torch.float64)
    x = x * x if op == "sq" else x
    dims = [d for d in range(p.ndim) if d != axis]
    return x.sum(dims) if dims else x


def _rand(shape, tag):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, tag)).encode()))
    # entries spread over many binades, so float32 sums of squares would visibly lose bits
    return torch.randn(shape, generator=g) * torch.exp2(torch.randint(-12, 12, shape, generator=g).float())


def _check(out, p, sq_axes, sum_axes, rest_sum):
    for op, axes in (("sq", sq_axes), ("sum", sum_axes)):
        for a in axes:
            ref = _ref(p, op, a)
            bound = 1e-15 * (p.numel() + 1) * _ref(p.abs(), op, a)  # float64 summation error
            assert out[(op, a)].dtype == torch.float64
            assert torch.all((out[(op, a)] - ref).abs() <= bound), (tuple(p.shape), op, a)
    if rest_sum:
        ref = p.to(torch.float64).sum(0).reshape(-1) if p.ndim > 1 else p.to(torch.float64).sum(0, keepdim=True)
        got = out[("rest_sum", 0)].reshape(-1)
        bound = 1e-15 * (p.shape[0] + 1) * (p.abs().to(torch.float64).sum(0).reshape(-1) if p.ndim > 1
                                              else p.abs().to(torch.float64).sum(0, keepdim=True))
        assert torch.all((got - ref).abs() <= bound)


@pytest.mark.parametrize("shape", SHAPES)
def test_param_axis_stats_eager_and_graph(shape):
    p = _rand(shape, "stats")
    axes = list(range(len(shape)))
    spec = _spec(axes, axes[:1], len(shape) > 1)
    # the eager pass with a chunk of a few rows (several chunks, a partial last one)
    eager = CF.param_axis_stats(p, axes, axes[:1], len(shape) > 1, chunk=max(1, 3 * math.prod(shape[1:])))
    _check(eager, p, axes, axes[:1], len(shape) > 1)
    graph = dict(zip(spec.keys(), CF._graph_param_stats(p, spec.frozen())))
    _check(graph, p, axes, axes[:1], len(shape) > 1)


def _spec(sq, sm, rest_sum):
    s = CF._StatsSpec("p")
    for a in sq:
        s.add("sq", a)
    for a in sm:
        s.add("sum", a)
    if rest_sum:
        s.add("rest_sum", 0)
    return s


@pytest.mark.parametrize("n0", [1, 31, 64, 65, 97])
def test_colsum_blocks(n0):
    """The blocked column sum equals a float64 column sum over every row (remainder rows too)."""
    x = _rand((n0, 37), "colsum").to(torch.float64)
    got = CF._colsum(x)
    ref = x.sum(0)
    assert got.shape == ref.shape
    assert torch.all((got - ref).abs() <= 1e-15 * n0 * x.abs().sum(0))
    # every row counts: changing only the last row changes the result by exactly that row
    y = x.clone()
    y[-1] += 1.0
    assert torch.allclose(CF._colsum(y) - got, torch.ones(37, dtype=torch.float64), rtol=0, atol=1e-12 * x.abs().max())


def test_graph_stats_compiled():
    """The graph statistics under torch.compile (one 4-D weight with remainder rows)."""
    p = _rand((67, 5, 3, 3), "compiled")
    spec = _spec([0, 1], [0], True)
    fn = torch.compile(lambda t: CF._graph_param_stats(t, spec.frozen()), dynamic=False, fullgraph=True)
    try:
        out = fn(p)
    except Exception as e:  # noqa: BLE001 - no working C++ compiler: the evaluator falls back to eager
        pytest.skip(f"torch.compile unavailable here ({type(e).__name__})")
    _check(dict(zip(spec.keys(), out)), p, [0, 1], [0], True)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int64), b.view(torch.int64))


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_flat_values_are_the_per_family_values(backend):
    """The evaluator's one-vector result (`FamilyValues`: every bucket writes its block of one
    float64 vector) holds bit for bit the per-family evaluation's values, for diag, vector and
    matrix families (the native step's Grams beside a batched one) and `Family.value`'s; the
    optimizer's deviation over it is h − h0 family by family, with h0 its own, reset, or loaded."""
    model, laws = build("attention", dtype=torch.float64, seed=3)
    E = model.attn.embed_dim
    extra = [  # (not conservation laws: values to evaluate)
        Family("shared", "linear", "matrix", 2, [Term("attn.in_proj_weight", 0, rows(4, 0), +1),
                                                  Term("out.weight", 1, rows(4, 0), -1)]),  # QK h0's group
        Family("rescale.inp", "rescale", "diag", 2, [Term("inp.weight", 0, rows(E), +1),
                                                     Term("inp.bias", 0, rows(E), +1),
                                                     Term("attn.in_proj_weight", 1, rows(E), -1)]),
        Family("translation.out", "translation", "vector", 1, [Term("out.weight", 0, rows(4), +1),
                                                               Term("attn.out_proj.weight", 1, rows(3, 2), -1)]),
    ]
    grouped = Family("grouped", "rescale", "diag", 2, [Term("attn.in_proj_weight", 0, rows(4), +1, groups=2)])
    laws = lawset(model, list(laws.families) + extra + [grouped])
    tensors = {n: model.get_parameter(n) for n in laws.param_names}
    ev = CF.LawEvaluator(laws, tensors, backend=backend)
    flat = ev.flat_values()
    if ev.backend != backend:
        pytest.skip("the native statistics are unavailable here")
    assert isinstance(flat, FamilyValues) and list(flat) == laws.keys() and set(flat.extra) == {"grouped"}
    assert ev.layout_of(flat) is ev._layouts[backend == "native"]  # (native: the Gram layout)
    stats = ev._native_stats() if backend == "native" else None
    ref = dict(zip(ev.names, ev._values(tuple(p.detach() for p in tensors.values()), False, stats)))
    as_dict = ev()
    assert list(as_dict) == laws.keys()
    for n in laws.keys():
        assert _bits_equal(flat[n], ref[n]) and _bits_equal(as_dict[n], ref[n]), n

    tracked = lawset(model, [f for f in laws.families if f is not grouped])  # (all in the vector)
    opt = consopt.SGD(model.parameters(), lr=0.05, momentum=0.9, laws=tracked)
    opt.tracking_backend = backend
    g = torch.Generator().manual_seed(5)

    def steps(opt, n):
        for _ in range(n):
            fill_grads(model, *model.example_inputs(generator=g))
            opt.step()
        tr = opt._tracker
        h, h0 = tr.current(), tr.h0
        assert tr.evaluator.layout_of(h) is not None  # (the deviation's one-vector path)
        dev = opt.deviation()
        assert list(dev) == tracked.keys()
        for n in tracked.keys():
            assert _bits_equal(dev[n], h[n] - h0[n]), n
        return dev

    steps(opt, 3)
    sd = opt.state_dict()
    opt.reset_tracking()
    assert all(float(d.abs().max()) == 0 for d in opt.deviation().values())
    steps(opt, 1)
    opt.load_state_dict(sd)  # h0 from the checkpoint (a dict): the next read uses it
    assert not isinstance(opt._tracker.h0, FamilyValues)
    steps(opt, 2)
