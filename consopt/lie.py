"""Completeness certificate: count a model's conservation laws numerically.

A function h(θ) is conserved by gradient flow for every data set and every loss of the model's
output iff ∇h(θ) is orthogonal to every per-sample gradient field

    χ_{x,w}(θ) = ∂θ ⟨w, g(θ, x)⟩                          (x an input, w an output direction)

and then also to every Lie bracket of such fields. By Frobenius' theorem the number of
independent conserved functions near a generic θ is exactly

    count = D − dim Lie(W)(θ)

(Marcotte, Gribonval, Peyré, NeurIPS 2023), with D the number of trainable parameters and
Lie(W)(θ) the span at θ of the fields and all their iterated brackets. `count_laws` computes it
numerically and `certify` compares it with a `LawSet` (e.g. from `find_laws`).

How (all in float64, on a deep copy of the model at a random parameter point):

* Depth 0. Draw random inputs with the shapes of `example_inputs` (float inputs: normal with a
  per-draw scale log-uniform in [1/8, 8]; integer inputs such as token ids: uniform integers in
  the example's [min, max]) and take full Jacobians ∂θ g(θ, x) by `torch.func.jacrev` under
  `vmap`: each row is one per-sample field χ_{x,e_i}(θ). With `loss="cross_entropy"` the
  directions are projected onto the softmax tangent space (w ⟂ 1 over the class dim), since
  ∂ℓ/∂logits = softmax − onehot sums to zero.
* Depth k ≥ 1. Right-nested brackets [χ_1, [χ_2, … [χ_k, χ_{k+1}]]] of random generators
  (fresh unit-scale inputs, random w). A field is a callable θ ↦ R^D and

      [A, B](θ) = DB(θ)·A(θ) − DA(θ)·B(θ)

  is evaluated by forward-over-reverse autodiff (`torch.func.jvp` of the field: a Hessian-vector
  product for two generators, higher derivatives for nested brackets; cost ≈ 3^k field
  evaluations), vectorized with `vmap` over a batch of brackets (all brackets of one depth share
  the same code; only (x, w) differ). Right-nested brackets of generators span the Lie algebra
  they generate, so W_k = W_{k−1} + [W_0, W_{k−1}]. Random generators suffice: a bracket is
  multilinear in its generators, so brackets of random generators span the same space as the
  brackets of all of them (with probability one, given as many as the dimension to find). Only
  the span at θ is kept (an SVD factor), never the fields themselves.
* Adaptive sampling. Each depth adds rounds of samples/brackets until `patience` rounds in a row
  do not raise the rank; depth 0 also continues until the draws since the last rank increase at
  least equal the draws before it, and takes at least `min_samples` draws (ReLU networks need
  inputs in every activation region: with 1-input draws a 2-4-3 ReLU net with bias gave count 5
  instead of 4 at 1 random point in 30 before these rules). The iteration stops at the first
  depth that adds nothing (the distribution is then involutive, Frobenius), then a confirmation
  sweep (one more round at every depth) restarts it if anything still grows.
* Two random points (`points`). Sampling can only miss rank, so the point with the largest rank
  is reported and `counts` lists every point's count; a disagreement is warned about.
* Fused ops. torch's native layer_norm / batch_norm give silently wrong 3rd-order derivatives
  and the CPU flash attention kernel has none, so these run as plain ops while counting; a
  finite-difference check of a few nested brackets (`ad_error`) guards against other such bugs.

Tolerance. Rows are scaled before the rank so that rounding noise stays at the 1e-16 level and is
never blown up to unit size: the depth-0 fields of one draw by the largest of them (a row that
is small because its terms cancel, e.g. ∂ softmax weights of a saturated softmax, keeps its tiny
noise tiny), a bracket by the norm of the same nested expression with every minus sign turned
into a plus (the size of the terms that cancel in an identically vanishing bracket). The rank is
the number of singular values of the stacked rows above

    σ_max · D · eps_float64 · tol          (tol = 1e4 by default: ≈ 2.2e-12 · D · σ_max)

and the result reports the gap σ_rank / σ_rank+1 across that cut and the values on either side,
so a user sees how clear the decision was (1e10 or more on every model in the tests; the
approximate LayerNorm scale law, broken only by eps, shows up as σ ≈ 1e-5 σ_max, above the
cut, so it is correctly not counted; a warning is issued when the gap is below 1e4).

This is numerical evidence at random points, not a proof: it assumes the points generic and the
sampling exhaustive. For piecewise-linear models on inputs that cannot separate the units (ReLU
with 1-D input and no bias, ReLU after an embedding of a few tokens) the count differs between
open regions of parameter space, and the smallest count over the points is reported. The model's
output must be a deterministic function of (θ, x): active dropout (training mode, p > 0) raises
an error; BatchNorm uses batch statistics and its running statistics are not updated.
"""

from __future__ import annotations

import copy
import dataclasses
import contextlib
import math
import time
import warnings
from typing import Callable, Optional

import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

from .discover import check_arguments

__all__ = ["LieCount", "Certificate", "count_laws", "certify"]

_EPS = torch.finfo(torch.float64).eps
_LONGER = True  # also bracket [R_a, R_{k-1}], a ≥ 1, at depth k ≥ 2 when R_k grew the rank


@dataclasses.dataclass
class LieCount:
    """Result of `count_laws`: count = D − rank, rank = dim Lie(W)(θ) at a random θ."""

    count: int  # independent conserved functions near θ (the smallest over the random points)
    D: int  # trainable parameters
    rank: int  # dim Lie(W)(θ)
    ranks: list  # rank after depth 0, 1, 2, ... (depth 0 = the gradient fields themselves)
    gap: float  # σ_rank / σ_{rank+1} (inf when nothing lies below the cut)
    sigma_above: float  # σ_rank / σ_max: the smallest kept singular value, relative
    sigma_below: float  # σ_{rank+1} / σ_max: the largest dropped one (0 if none)
    tol: float  # the relative cut used: kept iff σ > tol · σ_max
    converged: bool  # False if max_depth or a sample cap stopped the iteration while growing
    samples: int  # input draws used for depth-0 fields (at the reported point)
    fields: int  # depth-0 field rows used (at the reported point)
    brackets: list  # brackets evaluated per depth (index 0: 0; at the reported point)
    seconds: float  # all points together
    loss: Optional[str] = None
    seed: int = 0
    ad_error: float = 0.0  # finite-difference check of one nested bracket per depth ≥ 2 (relative)
    counts: list = dataclasses.field(default_factory=list)  # the count at each random point
    singular_values: list = dataclasses.field(default_factory=list, repr=False)  # relative, descending
    point: dict = dataclasses.field(default_factory=dict, repr=False)  # θ (name -> float64 tensor)
    basis: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)  # [D, rank] orthonormal

    def summary(self) -> str:
        depth = ", ".join(f"d{k}:{r}" for k, r in enumerate(self.ranks))
        conv = "" if self.converged else " (NOT converged: count is an upper bound)"
        return (f"{self.count} independent conserved functions: D = {self.D}, dim Lie(W) = {self.rank} "
                f"[{depth}]{conv}; gap {self.gap:.2e} (σ_r/σ_max {self.sigma_above:.2e}, "
                f"σ_r+1/σ_max {self.sigma_below:.2e}, cut {self.tol:.1e}); {self.samples} input draws, "
                f"{sum(self.brackets)} brackets, points {self.counts}, {self.seconds:.2f} s")


@dataclasses.dataclass
class Certificate:
    """Result of `certify`: a LawSet's claimed count against the numeric count."""

    status: str  # "complete" | "missing k laws" | "more laws claimed than exist"
    claimed: int  # laws.num_functions
    count: int  # count_laws(...).count
    independent: int  # numeric rank of the claimed laws' gradients at the same θ
    violations: dict  # family -> max_i ‖P_Lie ∇h_i‖ / ‖∇h_i‖ (≈ 1e-13 for a true law)
    message: str
    lie: LieCount = dataclasses.field(repr=False)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    def __str__(self):
        return self.message


# ----------------------------------------------------------------------------------------------
# The model as a function of a flat parameter vector
# ----------------------------------------------------------------------------------------------
class _Flat:
    def __init__(self, model: torch.nn.Module, example_inputs: tuple, loss):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.D = sum(self.sizes)
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = dict(model.named_buffers())
        self.example = example_inputs
        self.loss = loss
        with torch.no_grad():
            out = model(*example_inputs)
        outs = self._outputs(out)
        if not outs:
            raise ValueError(f"{type(model).__name__} returned no floating-point tensor output")
        self.out_shapes = [o.shape for o in outs]
        self.out_sizes = [o.numel() for o in outs]
        self.n_out = sum(self.out_sizes)

    @staticmethod
    def _outputs(out) -> list:
        if torch.is_tensor(out):
            return [out] if out.is_floating_point() else []
        if isinstance(out, (tuple, list)):
            res = []
            for o in out:
                res += _Flat._outputs(o)
            return res
        if isinstance(out, dict):
            res = []
            for o in out.values():
                res += _Flat._outputs(o)
            return res
        return []

    def theta(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflat(self, theta: torch.Tensor) -> dict:
        out = dict(self.frozen)
        for n, s, t in zip(self.names, self.shapes, theta.split(self.sizes)):
            out[n] = t.view(s)
        return out

    def forward(self, theta: torch.Tensor, xs: tuple) -> torch.Tensor:
        """g(θ, x) flattened over every floating output (tuple outputs are concatenated)."""
        out = functional_call(self.model, (self.unflat(theta), self.buffers), xs)
        return torch.cat([o.reshape(-1) for o in self._outputs(out)])

    def project(self, w: torch.Tensor) -> torch.Tensor:
        """Output directions w [..., n_out] -> the loss's tangent directions (CE: w ⟂ 1 per class)."""
        if self.loss != "cross_entropy":
            return w
        shape = self.out_shapes[0]
        cdim = 1 if len(shape) >= 2 else 0
        n0 = self.out_sizes[0]
        first = w[..., :n0].reshape(*w.shape[:-1], *shape)
        first = first - first.mean(dim=w.dim() - 1 + cdim, keepdim=True)
        return torch.cat([first.reshape(*w.shape[:-1], n0), w[..., n0:]], dim=-1)


def _default_sampler(example: tuple, gen: torch.Generator):
    """Random inputs like `example`: normal floats, integers in the observed range, others as is."""
    specs = []
    for x in example:
        if torch.is_tensor(x) and x.is_floating_point():
            specs.append(("f", x.shape))
        elif torch.is_tensor(x) and x.dtype != torch.bool and not x.is_complex():
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            specs.append(("i", x.shape, x.dtype, lo, hi))
        else:
            specs.append(("c", x))

    def draw(n: int, spread: float = 1.0) -> tuple:
        out = []
        for s in specs:
            if s[0] == "f":
                # a scale mixture of normals: σ log-uniform in [1/spread, spread] per draw, so that
                # the activation regions of units with large offsets |b|/‖w‖ are reached too
                u = torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1
                scale = torch.exp(u * math.log(spread))
                x = torch.randn(n, *s[1], generator=gen, dtype=torch.float64)
                out.append(x * scale.reshape(n, *([1] * len(s[1]))))
            elif s[0] == "i":
                out.append(torch.randint(s[3], s[4] + 1, (n, *s[1]), generator=gen, dtype=s[2]))
            else:
                out.append(s[1])
        return tuple(out)

    return draw


# ----------------------------------------------------------------------------------------------
# Composite normalizations: torch's fused native_layer_norm / native_batch_norm give silently
# wrong derivatives from the 3rd order on (their double backward treats the saved mean/invstd as
# constants: pytorch/pytorch#175754, #186256, #196700, #196699), which depth-2 brackets need.
# Under this mode F.layer_norm / F.batch_norm / F.instance_norm run as plain tensor ops, and so
# does scaled_dot_product_attention (the CPU flash kernel has no forward-mode derivative).
# ----------------------------------------------------------------------------------------------
def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mu = input.mean(dims, keepdim=True)
    xc = input - mu
    var = (xc * xc).mean(dims, keepdim=True)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _channel_view(t, ndim):
    return t.reshape(1, -1, *([1] * (ndim - 2))) if ndim >= 2 else t


def _normalize(input, dims, running_mean, running_var, use_batch_stats, weight, bias, eps):
    """(x − μ) / √(σ² + eps) · γ + β over `dims`, written with plain tensor ops (exact higher derivatives)."""
    nd = input.dim()
    if use_batch_stats or running_mean is None or running_var is None:
        mu = input.mean(dims, keepdim=True)
        xc = input - mu
        var = (xc * xc).mean(dims, keepdim=True)
    else:
        xc = input - _channel_view(running_mean, nd)
        var = _channel_view(running_var, nd)
    y = xc * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * _channel_view(weight, nd)
    if bias is not None:
        y = y + _channel_view(bias, nd)
    return y


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    dims = tuple(d for d in range(input.dim()) if d != 1)
    return _normalize(input, dims, running_mean, running_var, training, weight, bias, eps)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    return _normalize(input, tuple(range(2, input.dim())), running_mean, running_var, use_input_stats, weight,
                      bias, eps)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if dropout_p:
        raise RuntimeError("count_laws needs a deterministic forward: scaled_dot_product_attention was called "
                           f"with dropout_p = {dropout_p} (random)")
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    logits = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    return torch.softmax(logits, dim=-1) @ value


class _CompositeMode(torch.overrides.TorchFunctionMode):
    def __init__(self, table):
        super().__init__()
        self.table = table

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.table.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def _composite_ops():
    """Plain-op versions of the fused ops whose higher derivatives torch gets wrong or lacks.

    A TorchFunctionMode catches direct calls (also through names bound before); since a mode is
    switched off while its handler runs a Python-level function such as
    F.multi_head_attention_forward, the torch.nn.functional attributes are also swapped for the
    duration (not thread-safe: other threads calling them meanwhile get the same values by
    plain ops)."""
    F = torch.nn.functional
    table = {F.layer_norm: _layer_norm, F.batch_norm: _batch_norm, F.instance_norm: _instance_norm,
             F.scaled_dot_product_attention: _sdpa}
    saved = {name: getattr(F, name) for name in ("layer_norm", "batch_norm", "instance_norm",
                                                 "scaled_dot_product_attention")}
    try:
        for name, orig in saved.items():
            setattr(F, name, table[orig])
        with _CompositeMode(table):
            yield
    finally:
        for name, orig in saved.items():
            setattr(F, name, orig)


def _in_dims(xs: tuple):
    return tuple(0 if torch.is_tensor(x) else None for x in xs)


# ----------------------------------------------------------------------------------------------
# Fields and nested brackets
# ----------------------------------------------------------------------------------------------
def _leaves(shape) -> int:
    """Generators in a bracket of `shape`: k (right-nested R_k of k+1 generators) or (a, b) = [R_a, R_b]."""
    return shape + 1 if isinstance(shape, int) else shape[0] + shape[1] + 2


def _bracket_fn(flat: _Flat, shape) -> Callable:
    """F(θ, xs, ws, s) for one bracket of generators χ_i(θ) = ∂θ⟨w_i, g(θ, x_i)⟩.

    shape k (int): the right-nested R_k = [χ_0, [χ_1, … [χ_{k-1}, χ_k]]] (R_0 = χ_0);
    shape (a, b): [R_a, R_b] on the generators 0..a and a+1..a+b+1.
    xs: tuple of inputs each stacked [leaves, ...]; ws: [leaves, n_out]; s = -1 gives the bracket,
    s = +1 the same expression with every minus turned into plus (its scale)."""

    def gen_field(theta, x, w):
        return grad(lambda t: (flat.forward(t, x) * w).sum())(theta)

    def F(theta, xs, ws, s, shape):
        if shape == 0:
            return gen_field(theta, tuple(x[0] if torch.is_tensor(x) else x for x in xs), ws[0])
        ia, ib = (0, shape - 1) if isinstance(shape, int) else shape
        na = _leaves(ia)
        xa = tuple(x[:na] if torch.is_tensor(x) else x for x in xs)
        xb = tuple(x[na:] if torch.is_tensor(x) else x for x in xs)

        def A(t):
            return F(t, xa, ws[:na], s, ia)

        def B(t):
            return F(t, xb, ws[na:], s, ib)

        a = A(theta)
        b, db_a = jvp(B, (theta,), (a,))
        _, da_b = jvp(A, (theta,), (b,))
        return db_a + s * da_b  # [A, B] = DB·A − DA·B  (s = −1)

    return lambda theta, xs, ws, s: F(theta, xs, ws, s, shape)


class _Rank:
    """Incremental rank of stacked rows: keeps S·Vᵀ of all rows so far (same singular values)."""

    def __init__(self, D: int, rtol: float):
        self.D = D
        self.rtol = rtol
        self.R = torch.zeros(0, D, dtype=torch.float64)
        self.S = torch.zeros(0, dtype=torch.float64)
        self.Vh = torch.zeros(0, D, dtype=torch.float64)
        self.rank = 0

    def cut(self, S: torch.Tensor) -> int:
        if S.numel() == 0 or float(S[0]) == 0.0:
            return 0
        return int((S > S[0] * self.rtol).sum())

    def add(self, rows: torch.Tensor) -> int:
        if rows.shape[0] == 0:
            return self.rank
        M = torch.cat([self.R, rows])
        _, S, Vh = torch.linalg.svd(M, full_matrices=False)
        self.S, self.Vh = S, Vh
        self.R = S[:, None] * Vh
        self.rank = self.cut(S)
        return self.rank


def _unit_rows(rows: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    n = rows.norm(dim=1) if scale is None else scale
    keep = n > 0
    return rows[keep] / n[keep, None]


def _perturb(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-initialise (each module's reset_parameters) and add noise: a generic point."""
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                try:
                    m.reset_parameters()
                except Exception:  # noqa: BLE001 - a custom reset that cannot run is skipped
                    pass
        for p in model.parameters():  # noise of half the init's spread, at least 0.15 (LN's γ = 1, β = 0)
            s = float(p.std()) if p.numel() > 1 else 0.0
            s = s if math.isfinite(s) and s >= 0.3 else 0.3
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 * s)


@contextlib.contextmanager
def _num_threads(n):
    saved = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(int(n))
        yield
    finally:
        if n:
            torch.set_num_threads(saved)


def _load_jvp_decompositions():
    """torch loads its forward-AD decompositions on the first jvp, scripting them with the deprecated
    torch.jit.script (a DeprecationWarning and ~1 s, once per process): do it here, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except Exception:  # noqa: BLE001 - private module: if it moves, the first jvp loads it
            pass


def _prepare(model, example_inputs, loss, seed, perturb):
    example_inputs = check_arguments(model, example_inputs, loss, "count_laws")
    m = copy.deepcopy(model).to(torch.float64)
    for mod in m.modules():  # batch statistics without running-stat updates (no in-place under vmap)
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.training:
            mod.track_running_stats = False
    gen = torch.Generator().manual_seed(int(seed))
    if perturb:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            _perturb(m, gen)
    cast = tuple(x.to(torch.float64) if torch.is_tensor(x) and x.is_floating_point() else x for x in example_inputs)
    return m, cast, gen


def _wrap_random(e: Exception, model) -> Exception:
    msg = str(e)
    if "randomness" in msg or "random" in msg.lower():
        return RuntimeError(
            f"count_laws needs a deterministic forward, but {type(model).__name__} calls a random op "
            f"({msg.splitlines()[0]}). Active dropout (training mode, p > 0) makes every gradient field "
            "random: set its p to 0 (or put the dropout modules in eval mode) before counting.")
    return e


# ----------------------------------------------------------------------------------------------
# count_laws
# ----------------------------------------------------------------------------------------------
def count_laws(model: torch.nn.Module, example_inputs, *, loss: Optional[str] = None, points: int = 2,
               samples: int = 4096, min_samples: int = 512, max_depth: int = 6, seed: int = 0, tol: float = 1e4,
               patience: int = 2, max_brackets: Optional[int] = None, confirm: bool = True, perturb: bool = True,
               sampler: Optional[Callable[[int, torch.Generator], tuple]] = None, ad_check: bool = True,
               chunk: int = 256, threads: Optional[int] = 1) -> LieCount:
    """Number of independent conservation laws of gradient flow: D − dim Lie(W)(θ), numerically.

    Args:
        model: an nn.Module (its mode is kept: laws of the training-mode graph need model.train()).
        example_inputs: tuple of positional inputs; random inputs of the same shapes/dtypes are drawn
            (normal floats with a random scale, integers uniform in [min, max] of the example,
            other arguments as given).
        loss: None / "mse" (every output direction) or "cross_entropy" (directions ⟂ 1 over the
            class dim: dim 1 of the first output, dim 0 if it is 1-D).
        points: random parameter points to count at; the result is the one of largest rank
            (smallest count). Sampling can only miss rank, so a point where rare activation
            regions went unseen over-counts; a second point makes that very unlikely.
        samples: cap on input draws per point for the depth-0 fields (a draw is a whole example batch).
        min_samples: input draws per point at least (per-sample fields are cheap; rare activation
            regions of ReLU units, e.g. the thin wedge where two nearly parallel units differ, need many).
        max_depth: deepest bracket nesting (depth k: k nested brackets of k+1 generators). The cost
            of one bracket grows like 3^k.
        seed: seeds the random parameter points, the inputs and the output directions.
        tol: safety factor of the rank cut: σ is kept iff σ > σ_max · D · eps_float64 · tol.
        patience: rounds in a row without rank growth before a depth counts as exhausted.
        max_brackets: cap on brackets per depth (default 4·D + 64).
        confirm: after convergence, one more round at every depth; restart if anything grows.
        perturb: re-initialise the copy (reset_parameters) and add noise, so that θ is generic;
            False counts at the model's own θ (then `points` is 1: a non-generic θ can have a
            smaller rank).
        sampler: optional `sampler(n, generator) -> tuple` of inputs stacked along a new dim 0.
        ad_check: compare one bracket per depth ≥ 2 with central finite differences (guards
            against wrong higher-order autodiff rules; the error is in `.ad_error`).
        chunk: brackets per vmap call.
        threads: torch intra-op threads while counting (restored afterwards; None keeps the current
            setting). The work is many tiny ops: one thread is fastest, and multi-threaded LAPACK
            on a busy machine made a 200×80 SVD 100× slower.

    Returns a `LieCount`; `.summary()` is one line.
    """
    t0 = time.perf_counter()
    if int(points) < 1:
        raise ValueError(f"points must be >= 1, got {points}")
    _load_jvp_decompositions()
    results = []
    with _num_threads(threads):
        for i in range(int(points) if perturb else 1):
            m, example, gen = _prepare(model, example_inputs, loss, seed + 7919 * i, perturb)
            with _composite_ops():
                results.append(_count(m, model, example, gen, loss=loss, samples=samples, max_depth=max_depth,
                                      min_samples=min_samples, tol=tol, patience=patience,
                                      max_brackets=max_brackets, confirm=confirm, sampler=sampler,
                                      ad_check=ad_check, chunk=chunk))
    res = max(results, key=lambda r: (r.rank, r.gap))
    res.counts = [r.count for r in results]
    res.seed = seed
    res.ad_error = max(r.ad_error for r in results)
    res.converged = all(r.converged for r in results)
    res.seconds = time.perf_counter() - t0
    D, r = res.D, res.rank
    if len(set(res.counts)) > 1:
        warnings.warn(f"count_laws: the count differs between random points {res.counts}; the smallest is "
                      "reported (sampling can only miss rank, e.g. rare ReLU activation regions). Raise "
                      "min_samples or points if this persists", RuntimeWarning, stacklevel=2)
    if res.gap < 1e4:
        warnings.warn(f"count_laws: unclear rank decision (D = {D}, rank {r}): σ_r/σ_max = {res.sigma_above:.2e}, "
                      f"σ_r+1/σ_max = {res.sigma_below:.2e}, gap {res.gap:.1e}", RuntimeWarning, stacklevel=2)
    if not res.converged:
        warnings.warn(f"count_laws: the rank may still grow (max_depth = {max_depth} or a sample cap reached): "
                      f"{D - r} is an upper bound on the number of laws", RuntimeWarning, stacklevel=2)
    if res.ad_error > 1e-5:
        warnings.warn(f"count_laws: a nested autodiff bracket disagrees with finite differences (relative error "
                      f"{res.ad_error:.1e}): an op in this model may have a wrong higher-order derivative "
                      "rule in PyTorch; the count is not reliable", RuntimeWarning, stacklevel=2)
    return res


def _count(m, model, example, gen, *, loss, samples, min_samples, max_depth, tol, patience, max_brackets, confirm,
           sampler, ad_check, chunk) -> LieCount:
    """One random point (the model copy `m` is already there)."""
    t0 = time.perf_counter()
    flat = _Flat(m, example, loss)
    D, n_out = flat.D, flat.n_out
    theta = flat.theta()
    if sampler is not None:
        draw = lambda n, spread=1.0: sampler(n, gen)  # noqa: E731
    else:
        draw = _default_sampler(example, gen)
    rtol = D * _EPS * float(tol)
    rk = _Rank(D, rtol)
    max_brackets = max_brackets if max_brackets is not None else 4 * D + 64
    stats = dict(samples=0, fields=0, brackets=[0] * (max_depth + 1), capped=False, ad_error=0.0)
    fns = {}

    def fn(shape):
        if shape not in fns:
            fns[shape] = _bracket_fn(flat, shape)
        return fns[shape]

    def jac_fn(x):
        return jacrev(flat.forward)(theta, x)

    def draw_brackets(n, shape):
        k1 = _leaves(shape)
        xs = draw(n * k1)
        xs = tuple(x.reshape(n, k1, *x.shape[1:]) if torch.is_tensor(x) else x for x in xs)
        ws = flat.project(torch.randn(n, k1, n_out, generator=gen, dtype=torch.float64))
        return xs, ws

    def depth0_round():
        n = max(8, min(128, -(-4 * D // max(1, n_out))))
        n = min(n, samples - stats["samples"])
        if n <= 0:
            return False
        xs = draw(n, spread=8.0)
        try:
            J = vmap(jac_fn, in_dims=(_in_dims(xs),), randomness="error")(xs)  # [n, n_out, D]
        except RuntimeError as e:
            raise _wrap_random(e, model) from e
        J = J.reshape(-1, n_out, D)
        if loss == "cross_entropy":
            J = flat.project(J.transpose(1, 2)).transpose(1, 2)
        # one scale per draw (its largest row), not per row: a row that is small because its terms
        # cancel (e.g. ∂ softmax weights when the softmax saturates) must keep its rounding noise
        # small instead of being blown up to unit size
        scale = J.norm(dim=2).amax(dim=1, keepdim=True).expand(-1, n_out).reshape(-1)
        rows = J.reshape(-1, D)
        stats["samples"] += n
        stats["fields"] += rows.shape[0]
        rk.add(_unit_rows(rows, scale))
        return True

    def bracket_round(depth, longer=False):
        """Random brackets of nesting depth `depth`: the right-nested R_depth (W_depth = W_{depth-1} +
        [W_0, W_{depth-1}]), or with `longer` [R_a, R_{depth-1}] for a = 1 .. depth-1: longer words
        (up to length 2·depth) at the same nesting depth, which save deeper, costlier levels."""
        n = min(max(8, D - rk.rank + 8), max_brackets - stats["brackets"][depth])
        if n <= 0:
            return False
        shapes = [(a, depth - 1) for a in range(1, depth)] if longer else [depth]
        out = []
        for j, shape in enumerate(shapes):
            nj = n // len(shapes) + (1 if j < n % len(shapes) else 0)
            if nj == 0:
                continue
            xs, ws = draw_brackets(nj, shape)
            for i in range(0, nj, chunk):
                xc = tuple(x[i:i + chunk] if torch.is_tensor(x) else x for x in xs)
                wc = ws[i:i + chunk]
                nb = wc.shape[0]
                x2 = tuple(torch.cat([x, x]) if torch.is_tensor(x) else x for x in xc)
                sgn = torch.cat([torch.full((nb,), -1.0, dtype=torch.float64), torch.ones(nb, dtype=torch.float64)])
                try:
                    v = _call_bracket(fn(shape), theta, x2, torch.cat([wc, wc]), sgn)
                except RuntimeError as e:
                    raise _wrap_random(e, model) from e
                out.append(_unit_rows(v[:nb], v[nb:].norm(dim=1)))
        stats["brackets"][depth] += n
        rk.add(torch.cat(out))
        if ad_check and depth >= 2 and depth not in checked:
            checked.add(depth)
            # the smallest error of 3 random brackets: a finite difference that crosses a ReLU kink
            # is wrong by O(1), a wrong derivative rule shows up in all three
            err = min(_fd_check(flat, fn, theta, depth, *draw_brackets(1, depth)) for _ in range(3))
            stats["ad_error"] = max(stats["ad_error"], err)
        return True

    checked = set()

    def one_round(depth, longer=False):
        return depth0_round() if depth == 0 else bracket_round(depth, longer)

    def exhaust(depth, longer=False):
        """Rounds until `patience` in a row add nothing (brackets: patience − 1, at least 1: a random
        bracket has a component along every new direction of its depth with probability one); at
        depth 0 also until the draws since the last rank increase at least equal the draws before
        it and at least `min_samples` draws (rare activation regions keep being searched for)."""
        stall, last = 0, stats["samples"]
        need = patience if depth == 0 else max(1, patience - 1)
        while rk.rank < D:
            before = rk.rank
            if not one_round(depth, longer):  # a cap (samples / max_brackets) stopped the search
                stats["capped"] = True
                return
            if rk.rank > before:
                stall, last = 0, stats["samples"]
            else:
                stall += 1
            if stall >= need and (depth > 0 or (stats["samples"] - last >= last
                                                and stats["samples"] >= min(min_samples, samples))):
                return

    converged = D == 0
    ranks = [0]
    while D:
        ranks, converged = [], False
        for depth in range(max_depth + 1):
            before = rk.rank
            exhaust(depth)
            if depth >= 2 and rk.rank > before and _LONGER:
                exhaust(depth, longer=True)
            ranks.append(rk.rank)
            if rk.rank == D or (depth > 0 and rk.rank == before):
                converged = True
                break
        if not converged or not confirm or rk.rank == D:
            break
        before = rk.rank
        for depth in range(min(len(ranks), 2)):  # new depth-0 fields would show at depth 0 or 1
            if rk.rank < D:
                one_round(depth)
        if rk.rank == before:
            break
    converged = converged and not stats["capped"]

    S = rk.S
    r = rk.rank
    smax = float(S[0]) if S.numel() else 0.0
    rel = (S / smax).tolist() if smax > 0 else []
    above = rel[r - 1] if r >= 1 else 0.0
    below = rel[r] if r < len(rel) else 0.0
    gap = above / below if below > 0 else math.inf
    basis = rk.Vh[:r].T.contiguous()
    point = {n: t.detach().clone() for n, t in flat.unflat(theta).items() if n in flat.names}
    return LieCount(count=D - r, D=D, rank=r, ranks=ranks, gap=gap, sigma_above=above, sigma_below=below,
                    tol=rtol, converged=converged, samples=stats["samples"], fields=stats["fields"],
                    brackets=stats["brackets"][:len(ranks)], seconds=time.perf_counter() - t0, loss=loss,
                    seed=0, ad_error=stats["ad_error"], singular_values=rel, point=point, basis=basis)


def _fd_check(flat, fn, theta, depth, xs, ws) -> float:
    """Relative error of D B(θ)·a (B a depth-(k−1) bracket, nested autodiff) against central differences.

    The yardstick is max(‖fd‖, ‖DB·a‖, 1e-6·‖B(θ)‖‖a‖/‖θ‖): a derivative that vanishes (brackets of
    commuting fields) agrees at the rounding level, which is not an error."""
    one = torch.tensor(-1.0, dtype=torch.float64)
    x0 = tuple(x[0, 0] if torch.is_tensor(x) else x for x in xs)
    rest = tuple(x[0, 1:] if torch.is_tensor(x) else x for x in xs)
    B = lambda t: fn(depth - 1)(t, rest, ws[0, 1:], one)  # noqa: E731
    a = grad(lambda t: (flat.forward(t, x0) * ws[0, 0]).sum())(theta)
    b, db = jvp(B, (theta,), (a,))
    tn, an = float(theta.norm()), float(a.norm())
    if an == 0 or tn == 0:
        return 0.0
    h = 1e-5 * tn / an
    fd = (B(theta + h * a) - B(theta - h * a)) / (2 * h)
    den = max(float(fd.norm()), float(db.norm()), 1e-6 * float(b.norm()) * an / tn)
    return float((db - fd).norm()) / den if den > 0 else 0.0


def _call_bracket(fn, theta, xs, ws, s):
    return vmap(fn, in_dims=(None, _in_dims(xs), 0, 0), randomness="error")(theta, xs, ws, s)


# ----------------------------------------------------------------------------------------------
# certify
# ----------------------------------------------------------------------------------------------
def _law_gradients(laws, point: dict, names: list) -> tuple:
    """Rows ∇h_i(θ) (flat over `names`) of every counted function, and the family of each row."""
    sizes = [point[n].numel() for n in names]
    shapes = [point[n].shape for n in names]
    fams = [f for f in laws if f.num_functions(laws.param_shapes) > 0]
    for f in fams:
        for p in f.params():
            if p not in point:
                raise KeyError(f"law family {f.name!r} names parameter {p!r}, which is not a trainable "
                               f"parameter of the model")

    def values(theta):
        params = {n: t.view(s) for n, s, t in zip(names, shapes, theta.split(sizes))}
        out = []
        for f in fams:
            v = f.value(params)
            if f.form == "matrix":
                iu = torch.triu_indices(f.units, f.units)
                v = v[iu[0], iu[1]]
            out.append(v.reshape(-1))
        return torch.cat(out) if out else theta.new_zeros(0)

    theta = torch.cat([point[n].reshape(-1) for n in names])
    owner = []
    for f in fams:
        n = f.units * (f.units + 1) // 2 if f.form == "matrix" else f.shape(laws.param_shapes)[0]
        owner += [f.name] * n
    if not owner:
        return theta.new_zeros(0, theta.numel()), owner
    return jacrev(values)(theta), owner


def certify(laws, model: torch.nn.Module, example_inputs, *, loss: Optional[str] = ...,
            law_tol: float = 1e-8, **count_kw) -> Certificate:
    """Check a LawSet against the numeric count: "complete", "missing k laws" or "more laws claimed
    than exist" (the last one is a bug: a claimed function that is not conserved, or a count that
    treats dependent functions as independent).

    `loss` (None, "mse" or "cross_entropy"): whose symmetries count; by default the loss the laws
    were found with (`laws.loss`, set by `find_laws`). Extra keyword arguments go to `count_laws`.
    Besides the counts, the claimed laws' gradients are evaluated at the same random point:
    `violations[family]` is the largest relative component of a ∇h_i inside Lie(W)(θ) (a true
    law gives ~1e-13; above `law_tol` the family is reported as not conserved), and
    `independent` is the numeric rank of all ∇h_i (what the claimed functions really span).
    """
    if loss is ...:
        loss = getattr(laws, "loss", None)
    res = count_laws(model, example_inputs, loss=loss, **count_kw)
    with _num_threads(count_kw.get("threads", 1)):
        return _certify(laws, res, law_tol)


def _certify(laws, res: LieCount, law_tol: float) -> Certificate:
    names = list(res.point)
    G, owner = _law_gradients(laws, res.point, names)
    claimed = int(laws.num_functions)
    violations = {}
    independent = 0
    if G.shape[0]:
        norms = G.norm(dim=1)
        inside = (G @ res.basis).norm(dim=1) if res.rank else torch.zeros_like(norms)
        rel = torch.where(norms > 0, inside / norms.clamp_min(1e-300), torch.zeros_like(norms))
        for name, v in zip(owner, rel.tolist()):
            violations[name] = max(violations.get(name, 0.0), v)
        Gu = _unit_rows(G)
        if Gu.shape[0]:
            S = torch.linalg.svdvals(Gu)
            independent = int((S > S[0] * res.D * _EPS * 1e4).sum())
    count = res.count
    if claimed == count:
        status = "complete"
    elif claimed < count:
        k = count - claimed
        status = f"missing {k} law" + ("s" if k != 1 else "")
    else:
        status = "more laws claimed than exist"
    bad = {k: v for k, v in violations.items() if v > law_tol}
    lines = [f"{status}: the LawSet claims {claimed} independent conserved functions, "
             f"count_laws finds {count} (D = {res.D}, dim Lie(W) = {res.rank}, gap {res.gap:.1e})."]
    if independent != claimed:
        lines.append(f"The claimed functions' gradients span only {independent} dimensions at a random point "
                     f"(num_functions counts {claimed}).")
    if bad:
        lines.append("Not conserved (gradient not orthogonal to Lie(W)): "
                     + ", ".join(f"{k} ({v:.1e})" for k, v in bad.items()))
    if not res.converged:
        lines.append("count_laws did not converge: its count is an upper bound.")
    return Certificate(status=status, claimed=claimed, count=count, independent=independent,
                       violations=violations, message=" ".join(lines), lie=res)
