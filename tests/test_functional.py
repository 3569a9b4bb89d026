"""consopt.functional: the float64 per-axis statistics behind every diag/vector law, eager
(chunked) and graph (blocked column sums, for torch.compile), against a float64 reference."""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from consopt import functional as CF

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
