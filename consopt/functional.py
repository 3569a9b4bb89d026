"""Functional core of consopt's optimizers: float64 law statistics and step helpers.

`LawEvaluator` turns a `LawSet` bound to parameter tensors into a fixed evaluation plan, so that
h(θ) for every family can be recomputed after each optimizer step with few, large operations
instead of one small operation per term. Its values equal `Family.value` (the definition in
`consopt.laws`) up to float64 summation order: every product is formed exactly in float64 from
the stored parameters and every sum is accumulated in float64 (SPEC §6).

How the plan evaluates each kind of family (M_t = P.movedim(axis, 0)[index].reshape(units, -1)):

- order-2 "diag" (rescale, gate, scale laws): for each (parameter, axis) it needs, one chunked
  pass over the parameter forms the per-slice sums of squares
      q_a[i] = Σ_{entries of P with index i along axis a} P²        (float64)
  (every axis from the same pass: rows directly, other axes from the column sums of the
  chunk). A unit's value is then Σ_t s_t Σ_{i in index_t[u]} q_{a_t}[i], gathered for all
  families at once.
- order-1 "diag" (per-channel translation): the same with plain sums.
- order-1 "vector" (per-token translation): colsum(M_t) of a term that takes a whole parameter
  along axis 0 (or axis 1 of a matrix) comes from the same pass; other terms are sliced.
- order-2 "matrix" (GL laws, attention QK/VO): families with the same units and the same term
  widths and signs form a batch X [F, units, Σ_t K_t] (float64, each family's producer slices
  side by side, then its consumer slices; filled by one copy per run of families that slice the
  same parameter), and h = X₊X₊ᵀ − X₋X₋ᵀ by two `bmm`: every product exact, one float64 sum.
  With the native step (backend "native", `consopt.native`) the kernel forms the Gram matrix of
  every aligned group of units (a head's rows of a packed in_proj, an out_proj's columns) while
  it updates the parameter, into an arena laid out per family, and h is a signed sum of views.
- anything else uses `Family.value` directly.

All reductions are dense torch reductions (no atomics), so the same inputs on the same device
give bitwise identical values. With backend="compile" the whole evaluation is one
`torch.compile`d graph (inductor fuses the float64 conversion, squares and reductions into one
pass over each parameter).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterable, Mapping

import torch
from torch import Tensor

from .laws import Family, FamilyValues, LawSet, Term
from .native import stage_elements

__all__ = ["LawEvaluator", "param_axis_stats", "first_nonfinite_grad", "deviation_stats", "BACKENDS"]

# Elements per chunk of the float64 statistics pass: 2**17 float64 = 1 MiB, fits in L2.
_CHUNK_ELEMS = 1 << 17
_F64 = torch.float64


def _run_start(index: Tensor) -> int | None:
    """s if `index`, flattened, is s, s+1, s+2, … (consecutive slices: a view); else None."""
    flat = index.reshape(-1).cpu()
    if not flat.numel():
        return None
    s = int(flat[0])
    return s if bool(torch.equal(flat, torch.arange(s, s + flat.numel()))) else None


def _is_trivial_index(index: Tensor, n: int) -> bool:
    """index == arange(n).view(T*units, S) flattened in order, i.e. the whole axis, in order."""
    return index.numel() == n and (n == 0 or _run_start(index) == 0)


class _StatsSpec:
    """Which per-axis statistics one parameter needs.

    sq / sum: axes a for which Σ over all other indices of P² / P is needed (a vector of length
    P.shape[a]); rest_sum: Σ over axis 0 of P, flattened (the column sums of a translation law).
    """

    __slots__ = ("name", "sq", "sum", "rest_sum")

    def __init__(self, name: str):
        self.name = name
        self.sq: list = []
        self.sum: list = []
        self.rest_sum = False

    def add(self, op: str, axis: int) -> None:
        if op == "rest_sum":
            self.rest_sum = True
            return
        lst = self.sq if op == "sq" else self.sum
        if axis not in lst:
            lst.append(axis)
            lst.sort()

    def keys(self) -> list:
        """The (op, axis) keys of `param_axis_stats`' result, in a fixed order."""
        return ([("sum", a) for a in self.sum] + [("sq", a) for a in self.sq]
                + ([("rest_sum", 0)] if self.rest_sum else []))

    def frozen(self) -> tuple:
        return (tuple(self.sq), tuple(self.sum), self.rest_sum)


def param_axis_stats(p: Tensor, sq_axes: Iterable[int] = (), sum_axes: Iterable[int] = (),
                     rest_sum: bool = False, scratch: Tensor | None = None,
                     chunk: int = _CHUNK_ELEMS) -> dict:
    """Per-axis float64 sums of `p` ("sum") and of `p²` ("sq"), eagerly, in one chunked pass.

    Returns {(op, axis): vector of length p.shape[axis]} with
        sum[a][i] = Σ_{j : j_a = i} p[j],     sq[a][i] = Σ_{j : j_a = i} p[j]²,
    each product formed exactly in float64, and with rest_sum, {("rest_sum", 0): Σ_i p[i]
    flattened} (length numel / shape[0]; [1] for a 1-D p). `p` is read once, in chunks of rows
    of dim 0 converted into the cache-sized float64 `scratch`, whatever the number of axes.
    """
    sq_axes, sum_axes = sorted(set(sq_axes)), sorted(set(sum_axes))
    p = p.detach()
    out = {}
    if p.ndim == 1:
        x = p.to(_F64)
        for a in sum_axes:
            out[("sum", a)] = x
        if sq_axes:
            out[("sq", 0)] = x * x
        if rest_sum:
            out[("rest_sum", 0)] = x.sum(0, keepdim=True)
        return out
    n0 = p.shape[0]
    rest_shape = p.shape[1:]
    rest = math.prod(rest_shape)
    want = {"sum": sum_axes, "sq": sq_axes}
    rows = {op: torch.zeros(n0, dtype=_F64, device=p.device) for op in want if 0 in want[op]}
    cols = {op: torch.zeros(rest, dtype=_F64, device=p.device) for op in want
            if any(a >= 1 for a in want[op]) or (op == "sum" and rest_sum)}
    if n0 > 0 and rest > 0 and (rows or cols):
        r_step = max(1, chunk // rest)
        need = min(n0, r_step) * rest
        if scratch is None or scratch.numel() < need or scratch.device != p.device:
            scratch = torch.empty(need, dtype=_F64, device=p.device)
        p2 = p.reshape(n0, rest)
        for r0 in range(0, n0, r_step):
            r = min(r_step, n0 - r0)
            buf = scratch[: r * rest].view(r, rest)
            buf.copy_(p2[r0:r0 + r])
            for op in ("sum", "sq"):
                if op not in rows and op not in cols:
                    continue
                if op == "sq":
                    buf.mul_(buf)
                if op in rows:
                    torch.sum(buf, 1, out=rows[op][r0:r0 + r])
                if op in cols:
                    cols[op].add_(buf.sum(0))
    for op, axes in want.items():
        for a in axes:
            out[(op, a)] = rows[op] if a == 0 else _axis_from_cols(cols[op], rest_shape, a)
    if rest_sum:
        out[("rest_sum", 0)] = cols["sum"]
    return out


def _axis_from_cols(c: Tensor, rest_shape, a: int) -> Tensor:
    """Σ over every dim but a (≥ 1) of a tensor whose dim-0 sum is c (flattened rest)."""
    c = c.view(rest_shape)
    dims = [d for d in range(len(rest_shape)) if d != a - 1]
    return c.sum(dims) if dims else c


# The native kernel forms a family's Gram matrices in its pass only for groups of at most
# _GRAM_UNITS units whose float64 scratch block fits in _GRAM_STAGE elements (8 MiB per thread);
# larger groups (a GL law over a wide layer) are left to float64 bmm.
_GRAM_UNITS = 256
_GRAM_STAGE = 1 << 20

# Row-block height of the compiled column sums: Σ over dim 0 of [n0, rest] as Σ_blocks Σ_rows-in-block,
# so each inner reduction walks `_COL_BLOCK` consecutive rows (one contiguous stretch of memory)
# instead of striding through all n0 rows per column vector; measured on a 2-core AVX-512 CPU with
# the parameter out of cache: 1.74 ms → 1.08 ms for a 512 × 4608 float32 weight (a plain copy: 1.04 ms).
_COL_BLOCK = 32


def _colsum(x: Tensor) -> Tensor:
    """Σ over dim 0 of a 2-D float64 expression, in row blocks (see `_COL_BLOCK`)."""
    n0 = x.shape[0]
    nb = n0 // _COL_BLOCK
    if nb < 2:
        return x.sum(0)
    c = x[: nb * _COL_BLOCK].reshape(nb, _COL_BLOCK, -1).sum(1).sum(0)
    return c + x[nb * _COL_BLOCK:].sum(0) if n0 % _COL_BLOCK else c


def _graph_param_stats(p: Tensor, spec: tuple) -> list:
    """`param_axis_stats` as one expression per statistic (no chunks: for torch.compile, which
    fuses the float64 conversion, squares and reductions into a single pass over p)."""
    sq_axes, sum_axes, rest_sum = spec
    out = []
    if p.ndim == 1:
        x = p.to(_F64)
        for _ in sum_axes:
            out.append(x)
        for _ in sq_axes:
            out.append(x * x)
        if rest_sum:
            out.append(x.sum(0, keepdim=True))
        return out
    rest_shape = p.shape[1:]
    x = p.to(_F64).reshape(p.shape[0], -1)
    if sum_axes or rest_sum:
        c = _colsum(x)
        for a in sum_axes:
            out.append(x.sum(1) if a == 0 else _axis_from_cols(c, rest_shape, a))
    if sq_axes:
        s = x * x
        c2 = _colsum(s)
        for a in sq_axes:
            out.append(s.sum(1) if a == 0 else _axis_from_cols(c2, rest_shape, a))
    if rest_sum:
        out.append(c)
    return out


_COMPILED_IDS = iter(range(1 << 62))


def _compile_values(values_fn):
    """torch.compile the whole evaluation (statistics, gathers, Grams) as one static graph.

    Each evaluator gets its own code object, so dynamo's per-code cache (and its recompile
    limit) is not shared between optimizers.
    """

    def law_values(*ps):
        return values_fn(ps, True)

    law_values.__code__ = law_values.__code__.replace(co_name=f"consopt_law_values_{next(_COMPILED_IDS)}")
    return torch.compile(law_values, dynamic=False, fullgraph=True,
                         options={"size_asserts": False})


def _check_index(f: Family, t: Term, idx: Tensor, n: int) -> None:
    # vector families sum each term over its own units; the others pair units across terms
    if idx.ndim != 2 or (f.form != "vector" and idx.shape[0] != f.units):
        raise ValueError(f"law family {f.name!r}: term on {t.param!r} has index of shape {tuple(idx.shape)}, "
                         f"expected [{f.units}, S]")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"law family {f.name!r}: index of {t.param!r} along axis {t.axis} is out of "
                         f"range for size {n}")


class _FlatLayout:
    """Where one evaluation writes every family's value: one float64 vector in which each plan
    bucket (a diag sign pattern, the vector families, a batch of matrix families) is a
    contiguous block that its own ops write in place, so that a step hands over one vector
    (`FamilyValues`) instead of a tensor per family. `where` = {family: (offset, numel, shape)}
    (`FamilyValues.where`), `order` the families in vector order; `views` makes the per-family
    tensors of a vector with one split (1-D families) or unbind (matrix batches) per run."""

    def __init__(self, blocks: list, device: torch.device):
        self.device = device
        self.keys, self.sizes, self.shapes = [], [], []  # per bucket block, in vector order
        self.where: dict = {}
        self.order: list = []
        self.runs: list = []  # (offset, numel, names, sizes of 1-D families | matrix block shape)
        off = 0
        for key, fams, shape in blocks:  # fams: [(name, its shape)] in block order
            n = math.prod(shape)
            self.keys.append(key)
            self.sizes.append(n)
            self.shapes.append(shape)
            o = off
            for name, fshape in fams:
                self.where[name] = (o, math.prod(fshape), fshape)
                self.order.append(name)
                o += math.prod(fshape)
            if len(shape) > 1:
                self.runs.append((off, n, [name for name, _ in fams], shape))
            elif self.runs and isinstance(self.runs[-1][3], list):  # neighbouring 1-D blocks: one split
                o0, n0, names, sizes = self.runs[-1]
                self.runs[-1] = (o0, n0 + n, names + [name for name, _ in fams], sizes + [s[0] for _, s in fams])
            else:
                self.runs.append((off, n, [name for name, _ in fams], [s[0] for _, s in fams]))
            off += n
        self.n = off

    def blocks(self, out: Tensor) -> dict:
        """{bucket key: its block of the vector `out`} (one split; matrix batches as [F, U, U])."""
        return {k: b if len(shape) == 1 else b.view(shape)
                for k, shape, b in zip(self.keys, self.shapes, out.split(self.sizes))}

    def views(self, flat: Tensor, minus: Tensor | None = None) -> dict:
        """{family: view} of a vector in this layout; with `minus`, of flat − minus, formed per
        run (ops no larger than the evaluation's own: a vector-sized one would fork threads)."""
        out = {}
        for off, n, names, how in self.runs:
            seg = flat[off:off + n] if minus is None else flat[off:off + n] - minus[off:off + n]
            out.update(zip(names, seg.split(how) if isinstance(how, list) else seg.view(how).unbind(0)))
        return out


BACKENDS = ("eager", "compile", "native")


class LawEvaluator:
    """Evaluate every family of `laws` on fixed tensors, in float64, with a precomputed plan.

    `tensors` maps each law parameter name to the tensor to read (typically the optimizer's
    parameters, as bound by `LawSet.bind`). `evaluator()` returns {family: float64 tensor} with
    the same keys, order and shapes as `laws.evaluate`, on each family's device.

    backend: "eager" (default) runs the plan with torch ops (the statistics in cache-sized
    chunks); "compile" runs the same plan as one `torch.compile`d graph (inductor fuses the
    conversion, squares and reductions into one pass per parameter; the first call compiles,
    which takes seconds); "native" takes the statistics and Gram matrices from the C++ kernel of
    `consopt.native` (statistics only here; `consopt.SGD` runs it fused with the update, and
    passes them to `values_from_stats`). If compiling or building fails the evaluator warns once
    and falls back to "eager". All agree to float64 rounding; bitwise reproducibility holds
    within one backend.
    """

    def __init__(self, laws: LawSet, tensors: Mapping[str, Tensor], *, chunk: int = _CHUNK_ELEMS,
                 backend: str = "eager"):
        self.laws = laws
        self.names = laws.keys()
        self.tensors = OrderedDict((n, tensors[n]) for n in laws.param_names)
        self.chunk = int(chunk)
        self._scratch: dict = {}
        self._compiled = None
        self._native = None
        self.backend = backend
        self._build()

    def __getstate__(self):  # copies / pickles recompile lazily and get their own scratch
        state = self.__dict__.copy()
        state["_compiled"] = None
        state["_native"] = None
        state["_scratch"] = {}
        state["_mat_scratch"] = {}
        for k in ("_gram_specs", "_gram_plans", "_mat_rest_plans"):
            state.pop(k, None)  # views of one arena: pickle would split them; rebuilt below
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        names = {n for plan in self._mat_plans for n in plan["fams"]}
        matrix = [f for f in self.laws.families if f.name in names]  # as _build ordered them
        self._gram_specs, self._gram_plans, rest = self._build_grams(matrix)
        self._mat_rest_plans = self._build_matrix(rest)
        if "_layouts" not in state:  # (pickled before the flat layouts)
            self._layouts = self._build_layouts()

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {value!r}")
        self._backend = value
        self._compiled = None
        self._native = None

    # -- plan ----------------------------------------------------------------------------
    def _build(self):
        laws, tensors = self.laws, self.tensors
        self._stats: "OrderedDict[str, _StatsSpec]" = OrderedDict()
        diag, matrix, vector, generic = [], [], [], []
        for f in laws.families:
            ok = len(f.terms) > 0 and all(tensors[t.param].ndim >= 1 and t.groups == 1 for t in f.terms)
            if ok and f.form == "diag" and f.order in (1, 2):
                diag.append(f)
            elif ok and f.form == "matrix" and f.order == 2:
                matrix.append(f)
            elif ok and f.form == "vector" and f.order == 1:
                vector.append(f)
            else:
                generic.append(f)
        self._generic = generic
        self._diag_plans = self._build_diag(diag)
        self._mat_plans = self._build_matrix(matrix)
        self._mat_scratch: dict = {}
        self._vec_plans = self._build_vector(vector)
        self._gram_specs, self._gram_plans, rest = self._build_grams(matrix)
        self._mat_rest_plans = self._build_matrix(rest)  # with the native Grams: the others
        self._layouts = self._build_layouts()

    @staticmethod
    def _family_device(f: Family, tensors) -> torch.device:
        return tensors[f.terms[0].param].device

    def _terms(self, f: Family):
        """(term, its tensor, its index as int64 on the CPU) for every term, indices checked."""
        for t in f.terms:
            p = self.tensors[t.param]
            idx = t.index.to(torch.int64).cpu()
            _check_index(f, t, idx, p.shape[t.axis])
            yield t, p, idx

    def _need(self, name: str, op: str, axis: int) -> None:
        self._stats.setdefault(name, _StatsSpec(name)).add(op, axis)

    def _build_diag(self, families):
        """Per device: the statistics to concatenate, and per sign pattern of a unit's W
        contributions (producers first) an index table [W, units] into that concatenation."""
        tensors = self.tensors
        per_dev: "OrderedDict[torch.device, list]" = OrderedDict()
        for f in families:
            per_dev.setdefault(self._family_device(f, tensors), []).append(f)
        plans = []
        for dev, fams in per_dev.items():
            keys: "OrderedDict[tuple, int]" = OrderedDict()  # (param, op, axis) -> offset
            offset = 0
            buckets: "OrderedDict[tuple, dict]" = OrderedDict()
            for f in fams:
                op = "sq" if f.order == 2 else "sum"
                src_cols, signs = [], []
                for t, p, idx in sorted(self._terms(f), key=lambda tpi: -tpi[0].sign):  # producers first
                    n = p.shape[t.axis]
                    key = (t.param, op, t.axis)
                    if key not in keys:
                        keys[key] = offset
                        offset += n
                        self._need(t.param, op, t.axis)
                    src_cols.append(idx + keys[key])
                    signs += [int(t.sign)] * idx.shape[1]
                b = buckets.setdefault(tuple(signs), {"src": [], "fams": []})
                b["src"].append(torch.cat(src_cols, 1))
                b["fams"].append((f.name, f.units))
            bplans = [{"src": torch.cat(b["src"], 0).t().contiguous().to(dev), "signs": signs,
                       "names": [n for n, _ in b["fams"]], "sizes": [u for _, u in b["fams"]]}
                      for signs, b in buckets.items()]
            plans.append({"device": dev, "keys": list(keys), "buckets": bplans})
        return plans

    def _build_vector(self, families):
        """Per family: pieces s_t · colsum(M_t), from the statistics pass where the term takes a
        whole parameter along axis 0 in order, else from the term's own slice."""
        plans = []
        for f in families:
            pieces = []
            for t, p, idx in self._terms(f):
                whole = idx.shape[1] == 1 and _is_trivial_index(idx, p.shape[t.axis])
                if whole and t.axis == 0:  # Σ over axis 0, the rest flattened
                    self._need(t.param, "rest_sum", 0)
                    pieces.append(("stat", (t.param, "rest_sum", 0), float(t.sign)))
                elif whole and t.axis == 1 and p.ndim == 2:  # Σ over axis 1 = per-row sums
                    self._need(t.param, "sum", 0)
                    pieces.append(("stat", (t.param, "sum", 0), float(t.sign)))
                else:
                    pieces.append(("slice", (t.param, t.axis, idx.to(p.device), idx.shape[0]), float(t.sign)))
            plans.append((f.name, pieces))
        return plans

    def _build_matrix(self, families):
        """Families batched by (device, units, column recipe): a batch of F families is one
        float64 X [F, units, Σ_t K_t] holding every family's term slices side by side (producer
        terms first), and the fills that write X (one per run of consecutive families whose
        term j slices the same parameter: a view of it when their rows are consecutive)."""
        tensors = self.tensors
        batches: "OrderedDict[tuple, dict]" = OrderedDict()
        for f in families:
            terms = sorted(self._terms(f), key=lambda tpi: -tpi[0].sign)  # producers (+1) first
            recipe = tuple((t.width(p.shape), int(t.sign)) for t, p, _ in terms)
            b = batches.setdefault((self._family_device(f, tensors), f.units, recipe), {"fams": [], "terms": []})
            b["fams"].append(f.name)
            b["terms"].append(terms)
        plans = []
        for (dev, units, recipe), b in batches.items():
            # families whose terms slice the same parameters in increasing rows become neighbours
            order = sorted(range(len(b["fams"])), key=lambda i: tuple(
                (t.param, t.axis, int(idx.reshape(-1)[0]) if idx.numel() else 0) for t, _, idx in b["terms"][i]))
            fams = [b["fams"][i] for i in order]
            terms = [b["terms"][i] for i in order]
            n_f = len(fams)
            segments, k0 = [], 0
            for j, (w, _) in enumerate(recipe):
                fills = []
                a = 0
                while a < n_f:
                    t0 = terms[a][j][0]
                    e = a + 1
                    while e < n_f and terms[e][j][0].param == t0.param and terms[e][j][0].axis == t0.axis:
                        e += 1
                    idx = torch.stack([terms[i][j][2] for i in range(a, e)])  # [n, units, S]
                    start = _run_start(idx)
                    fills.append({"cols": (k0, k0 + w), "fams": (a, e), "param": t0.param, "axis": t0.axis,
                                  "start": start, "shape": tuple(idx.shape),
                                  "index": None if start is not None else idx.to(dev)})
                    a = e
                segments.append(fills)
                k0 += w
            plans.append({"device": dev, "units": units, "fams": fams, "width": k0,
                          "split": sum(w for w, sg in recipe if sg > 0), "segments": segments,
                          "signs": [sg for _, sg in recipe]})
        return plans

    def _build_grams(self, families):
        """For the native step: the matrix families (on the CPU) whose every term is an aligned
        group of U consecutive rows (or columns) of a vector or matrix, so that the kernel forms
        its Gram matrix while updating the parameter, straight into a float64 arena laid out as
        [terms, families, U, U] per (units, signs) bucket. Returns ({param: [row request,
        column request]}, the buckets, the other families); a request is (U, arena, per-group
        element offsets, −1 where no family reads the group)."""
        tensors = self.tensors
        sizes: dict = {}  # (param, axis) -> U
        used: set = set()  # (param, axis, group) read by a chosen family
        chosen, rest = [], []
        for f in families:
            terms = sorted(self._terms(f), key=lambda tpi: -tpi[0].sign)  # producers first
            groups, ok = [], self._family_device(f, tensors).type == "cpu"
            for t, p, idx in terms:
                units = idx.shape[0]
                if not (ok and p.ndim in (1, 2) and t.axis < p.ndim and idx.shape[1] == 1 and 0 < units <= _GRAM_UNITS
                        and stage_elements(p.shape, t.axis, units) <= _GRAM_STAGE
                        and p.shape[t.axis] % units == 0 and _run_start(idx) is not None
                        and int(idx[0, 0]) % units == 0 and sizes.get((t.param, t.axis), units) == units):
                    ok = False
                    break
                groups.append((t.param, t.axis, int(idx[0, 0]) // units))
            if not ok or len(set(groups)) < len(groups) or any(g in used for g in groups):
                rest.append(f)  # (a group read by two families keeps its family on the X path)
                continue
            used.update(groups)
            for (param, axis, _), (t, p, idx) in zip(groups, terms):
                sizes[(param, axis)] = idx.shape[0]
            chosen.append((f, groups, tuple(int(t.sign) for t, _, _ in terms)))
        buckets: "OrderedDict[tuple, list]" = OrderedDict()
        for f, groups, signs in chosen:
            buckets.setdefault((f.units, signs), []).append((f.name, groups))
        total = sum(len(signs) * len(members) * units * units for (units, signs), members in buckets.items())
        arena = torch.zeros(total, dtype=_F64)
        dest = {key: torch.full((tensors[key[0]].shape[key[1]] // u,), -1, dtype=torch.int64)
                for key, u in sizes.items()}
        plans, base = [], 0
        for (units, signs), members in buckets.items():
            n_t, n_f = len(signs), len(members)
            for i, (_, groups) in enumerate(members):
                for t, (param, axis, g) in enumerate(groups):
                    dest[(param, axis)][g] = base + (t * n_f + i) * units * units
            plans.append({"view": arena[base:base + n_t * n_f * units * units].view(n_t, n_f, units, units),
                          "signs": signs, "fams": [name for name, _ in members]})
            base += n_t * n_f * units * units
        specs: "OrderedDict[str, list]" = OrderedDict()
        for (param, axis), u in sizes.items():
            specs.setdefault(param, [0, 0])[axis] = (u, arena, dest[(param, axis)])
        return specs, plans, rest

    def _build_layouts(self) -> dict | None:
        """The `_FlatLayout` of an evaluation with the native step's Grams (True) and without
        (False: every matrix family from the batched X), or None where the law tensors are on
        several devices (one vector per call) or every family is `Family.value`'s."""
        if len({p.device for p in self.tensors.values()}) != 1 or len(self._generic) == len(self.laws.families):
            return None
        shapes = {n: p.shape for n, p in self.tensors.items()}
        blocks = []
        for i, plan in enumerate(self._diag_plans):
            for j, b in enumerate(plan["buckets"]):
                blocks.append((("diag", i, j), [(n, (u,)) for n, u in zip(b["names"], b["sizes"])],
                               (sum(b["sizes"]),)))
        if self._vec_plans:  # (one cat writes them all)
            vec = [(name, self.laws[name].shape(shapes)) for name, _ in self._vec_plans]
            blocks.append((("vec",), vec, (sum(shape[0] for _, shape in vec),)))

        def matrix(kind, plans):
            return [((kind, i), [(n, (p["units"], p["units"])) for n in p["fams"]],
                     (len(p["fams"]), p["units"], p["units"])) for i, p in enumerate(plans)]

        gram_plans = [{"fams": p["fams"], "units": p["view"].shape[-1]} for p in self._gram_plans]
        device = next(iter(self.tensors.values())).device
        return {True: _FlatLayout(blocks + matrix("gram", gram_plans) + matrix("rest", self._mat_rest_plans), device),
                False: _FlatLayout(blocks + matrix("mat", self._mat_plans), device)}

    def layout_of(self, values) -> _FlatLayout | None:
        """The flat layout of `values` if it is a `FamilyValues` this evaluator wrote, else None."""
        if isinstance(values, FamilyValues) and self._layouts is not None:
            for lay in self._layouts.values():
                if values.where is lay.where:
                    return lay
        return None

    def as_dict(self, values: Mapping, minus: Tensor | None = None) -> dict:
        """{family: float64 tensor} in `self.names` order from this evaluator's values (a
        `FamilyValues` in one of its layouts: the views of its vector, a few calls in all); with
        `minus` (a vector in the same layout, values without `extra`): of values − minus."""
        lay = self.layout_of(values)
        if lay is None:
            return values if isinstance(values, dict) else {n: values[n] for n in self.names}
        views = lay.views(values.flat, minus)
        views.update(values.extra)
        return {n: views[n] for n in self.names}

    def _gram_values(self, block=None) -> dict:
        """The families the native step formed Grams for: h = Σ_t s_t G_t from the arena (written
        into `block(key)` of a flat vector where given)."""
        vals = {}
        for i, plan in enumerate(self._gram_plans):
            a, signs = plan["view"], plan["signs"]
            dst = None if block is None else block(("gram", i))
            if len(signs) > 1 and signs[0] > 0:  # a₀ + s₁a₁ in one pass (the sum a copy and add_ form)
                h, first = torch.add(a[0], a[1], alpha=signs[1], out=dst), 2
            elif signs[0] > 0:
                h, first = a[0].clone() if dst is None else dst.copy_(a[0]), 1
            else:
                h, first = torch.neg(a[0], out=dst), 1
            for t in range(first, len(signs)):
                h.add_(a[t], alpha=signs[t])
            if block is None:
                vals.update(zip(plan["fams"], h.unbind(0)))
        return vals

    @staticmethod
    def _fill_source(tensors, fill) -> Tensor:
        """The [n, units, K] slices of one fill (a view where the rows are consecutive)."""
        pm = tensors[fill["param"]].movedim(fill["axis"], 0)
        n, units, s = fill["shape"]
        if fill["start"] is not None:
            src = pm.narrow(0, fill["start"], n * units * s).unflatten(0, (n, units, s))
        else:
            src = pm[fill["index"]]
        return src.flatten(2)

    def _matrix_values(self, tensors, graph: bool, plans=None, block=None) -> dict:
        """Per batch h = X₊X₊ᵀ − X₋X₋ᵀ (X₊: the producer terms side by side, X₋: the
        consumers): each family's Σ_t s_t M_t M_tᵀ in two float64 bmm, every product formed
        exactly from the stored values (in a compiled graph: one bmm per term, summed). Written
        into `block(key)` of a flat vector where given (the same two bmm, in place)."""
        vals = {}
        for i, plan in enumerate(self._mat_plans if plans is None else plans):
            n_f, units = len(plan["fams"]), plan["units"]
            if graph:  # for torch.compile: a bmm per term (inductor copes badly with building X)
                h = None
                for seg, sign in zip(plan["segments"], plan["signs"]):
                    gs = []
                    for f in seg:
                        x = self._fill_source(tensors, f).to(_F64)
                        gs.append(torch.bmm(x, x.transpose(1, 2)))
                    g = gs[0] if len(gs) == 1 else torch.cat(gs, 0)
                    h = (g if sign > 0 else -g) if h is None else (h + g if sign > 0 else h - g)
                vals.update(zip(plan["fams"], h.unbind(0)))
                continue
            # into a scratch buffer (a fresh multi-MB buffer would page-fault on every call)
            x = self._mat_scratch.get((plans is None, i))
            if x is None:
                x = self._mat_scratch[(plans is None, i)] = torch.empty(n_f, units, plan["width"], dtype=_F64,
                                                                        device=plan["device"])
            for seg in plan["segments"]:
                for f in seg:
                    (k0, k1), (a, e) = f["cols"], f["fams"]
                    x[a:e, :, k0:k1].copy_(self._fill_source(tensors, f))
            k = plan["split"]  # X = [producers | consumers]: h = X₊X₊ᵀ − X₋X₋ᵀ
            xp, xn = x[:, :, :k], x[:, :, k:]
            if block is None:
                h = torch.bmm(xp, xp.transpose(1, 2))
                if xn.shape[2]:
                    h = torch.baddbmm(h, xn, xn.transpose(1, 2), alpha=-1)
                vals.update(zip(plan["fams"], h.unbind(0)))
                continue
            h = torch.bmm(xp, xp.transpose(1, 2), out=block(("mat" if plans is None else "rest", i)))
            if xn.shape[2]:
                h.baddbmm_(xn, xn.transpose(1, 2), alpha=-1)
        return vals

    # -- evaluation ------------------------------------------------------------------------
    def _stats_eager(self, tensors) -> dict:
        out = {}
        for name, spec in self._stats.items():
            p = tensors[name]
            scratch = None
            if p.ndim >= 2 and p.shape[0] > 0:
                dev = p.device
                rest = p.numel() // p.shape[0]
                need = min(p.shape[0], max(1, self.chunk // max(rest, 1))) * rest
                scratch = self._scratch.get(dev)
                if scratch is None or scratch.numel() < need:
                    scratch = self._scratch[dev] = torch.empty(need, dtype=_F64, device=dev)
            st = param_axis_stats(p, spec.sq, spec.sum, spec.rest_sum, scratch, self.chunk)
            for k in spec.keys():
                out[(name,) + k] = st[k]
        return out

    def _stats_graph(self, tensors) -> dict:
        out = {}
        for name, spec in self._stats.items():
            for k, v in zip(spec.keys(), _graph_param_stats(tensors[name], spec.frozen())):
                out[(name,) + k] = v
        return out

    def _values(self, ps: tuple, graph: bool, stats: dict | None = None, flat: bool = False):
        """The family values from the law parameters `ps` (in `self.tensors` order): a list in
        `self.names` order, or with flat=True (where the plan has a `_FlatLayout`) a
        `FamilyValues` over one float64 vector that every bucket's ops write in place (the same
        ops: bitwise the list's values). A pure function of `ps` given the plan; graph=True uses
        the unchunked statistics, for torch.compile; `stats` (from the native step) replaces the
        statistics pass."""
        tensors = dict(zip(self.tensors.keys(), ps))
        if stats is None:
            stats = self._stats_graph(tensors) if graph else self._stats_eager(tensors)
        grams = bool(self._gram_plans) and all(
            (p, "gram", a) in stats for p, req in self._gram_specs.items() for a in (0, 1) if req[a])
        lay = self._layouts[grams] if flat and self._layouts is not None else None
        if lay is not None:
            out = torch.empty(lay.n, dtype=_F64, device=lay.device)
            block = lay.blocks(out).__getitem__
        vals = {}
        for i, plan in enumerate(self._diag_plans):
            allstats = torch.cat([stats[k] for k in plan["keys"]])  # (every statistic is a vector)
            for j, b in enumerate(plan["buckets"]):  # Σ_w s_w stat[src_w], left to right (as Family.value sums)
                src, signs = b["src"], b["signs"]
                if lay is None:
                    v = allstats.index_select(0, src[0])
                else:
                    v = torch.index_select(allstats, 0, src[0], out=block(("diag", i, j)))
                if signs[0] < 0:
                    v = v.neg_()
                for w in range(1, len(signs)):
                    v.add_(allstats.index_select(0, src[w]), alpha=signs[w])
                if lay is None:
                    vals.update(zip(b["names"], v.split(b["sizes"])))
        vec_parts = []
        for name, pieces in self._vec_plans:
            parts = []
            for kind, key, sign in pieces:
                if kind == "stat":
                    x = stats[key]
                else:
                    pname, axis, idx, units = key
                    x = tensors[pname].movedim(axis, 0)[idx].reshape(units, -1).to(_F64).sum(0)
                parts.append(x if sign == 1.0 else x * sign)
            if lay is None:
                vals[name] = torch.cat(parts)
            else:
                vec_parts += parts
        if lay is not None:
            if vec_parts:
                torch.cat(vec_parts, out=block(("vec",)))
            if grams:
                self._gram_values(block)
                self._matrix_values(tensors, graph, self._mat_rest_plans, block)
            else:
                self._matrix_values(tensors, graph, None, block)
            return FamilyValues(out, lay.where, self.names, {f.name: f.value(tensors) for f in self._generic})
        if grams:
            vals.update(self._gram_values())  # the native step's Grams
            vals.update(self._matrix_values(tensors, graph, self._mat_rest_plans))
        else:
            vals.update(self._matrix_values(tensors, graph))
        for f in self._generic:
            vals[f.name] = f.value(tensors)
        return [vals[n] for n in self.names]

    def native_needs(self) -> dict:
        """{parameter name: (its `_StatsSpec` or None, U of its row Grams, U of its column
        Grams)}: what the native step computes for each law parameter."""
        out = OrderedDict()
        for name in self.tensors:
            spec, (ru, cu) = self._stats.get(name), self._gram_specs.get(name, (0, 0))
            if spec is not None or ru or cu:
                out[name] = (spec, ru, cu)
        return out

    @torch.no_grad()
    def values_from_stats(self, stats: dict) -> dict:
        """{family: h} from precomputed statistics {(name, op, axis): float64 tensor} of the
        current parameters (the native step's); Grams and other terms from the parameters."""
        return self.as_dict(self.flat_values_from_stats(stats))

    @torch.no_grad()
    def flat_values_from_stats(self, stats: dict) -> Mapping:
        """`values_from_stats` as a `FamilyValues` over one vector (a dict where the plan has no
        flat layout): what the optimizer keeps after each step, so that nobody builds a tensor
        per family unless `deviation()` is read."""
        return self._mapping(self._values(tuple(self.tensors.values()), False, stats, flat=True))

    def _mapping(self, vals) -> Mapping:
        return vals if isinstance(vals, FamilyValues) else dict(zip(self.names, vals))

    def _native_stats(self) -> dict | None:
        from .native import NativeStats, NativeUnavailable

        if self._native is None:
            self._native = NativeStats(self.native_needs())
        try:
            where: dict = {}
            if self._native.collect_rest(self.tensors, where):
                return self._native.stats(self.tensors, where)
        except NativeUnavailable as e:
            import warnings

            warnings.warn(f"consopt: the native law statistics are unavailable ({e}); using the eager backend",
                          RuntimeWarning, stacklevel=3)
            self._backend = "eager"
            self._native = None
        return None  # (a tensor it cannot read: this call is eager)

    @torch.no_grad()
    def __call__(self) -> dict:
        return self.as_dict(self.flat_values())

    @torch.no_grad()
    def flat_values(self) -> Mapping:
        """`evaluator()` as a `FamilyValues` over one vector where the plan has a flat layout (the
        compile backend's graph, or law tensors on several devices: a dict)."""
        ps = tuple(p.detach() for p in self.tensors.values())
        if self._backend == "native":
            return self._mapping(self._values(ps, False, self._native_stats(), flat=True))
        if self._backend == "compile":
            try:
                if self._compiled is None:
                    self._compiled = _compile_values(self._values)
                return dict(zip(self.names, self._compiled(*ps)))
            except Exception as e:  # noqa: BLE001 - any compiler failure: warn once, fall back
                import warnings

                warnings.warn(f"consopt: torch.compile of the law evaluation failed ({type(e).__name__}: "
                              f"{str(e)[:300]}); using the eager backend", RuntimeWarning, stacklevel=2)
                self._backend = "eager"
                self._compiled = None
        return self._mapping(self._values(ps, False, flat=True))

    @torch.no_grad()
    def scale(self) -> dict:
        """Σ of the absolute terms of every function (`LawSet.scale`), float64."""
        t = {n: p.detach() for n, p in self.tensors.items()}
        return {f.name: f.value(t, absolute=True) for f in self.laws.families}


def first_nonfinite_grad(grads: list) -> int | None:
    """Index of the first gradient with a NaN or ±inf entry, or None. One host sync per device.

    Uses the ∞-norm of each gradient (a max, which propagates NaN), so no gradient-sized
    temporary is written.
    """
    by_dev: "OrderedDict[torch.device, list]" = OrderedDict()
    for i, g in enumerate(grads):
        if g is None:
            continue
        if g.layout == torch.sparse_coo:
            g = g._values()
        elif g.layout != torch.strided:
            g = g.values()
        if g.numel():
            by_dev.setdefault(g.device, []).append((i, g))
    bad = None
    for items in by_dev.values():
        norms = torch._foreach_norm([g for _, g in items], math.inf)
        ok = torch.isfinite(torch.stack([n.real if n.is_complex() else n for n in norms]))
        if not bool(ok.all()):
            first = items[int((~ok).nonzero()[0, 0])][0]
            bad = first if bad is None else min(bad, first)
    return bad


def deviation_stats(h: Mapping[str, Tensor], h0: Mapping[str, Tensor], scale0: Mapping[str, Tensor],
                    steps: int) -> dict:
    """Flat {str: float} summary of the deviation dev = h − h0 of every family f:

        f"{f}/max_abs" = max_i |dev_i|
        f"{f}/max_rel" = max_i |dev_i| / max(|h0_i|, 1e-12 · scale0_i)

    where scale0_i is the sum of the absolute terms of function i at θ_0 (`LawSet.scale`), so a
    function that starts at 0 is measured against its size instead of dividing by zero. Where
    the denominator is 0 (every term 0 at θ_0, e.g. a dead unit), the ratio is 0 if dev_i = 0 and
    inf otherwise. Empty families give 0. Plus "step": the number of tracked steps. One host sync.
    """
    keys, parts = [], []
    for name in h:
        dev = h[name] - h0[name]
        a = dev.abs()
        if a.numel() == 0:
            parts.append(torch.zeros(2, dtype=_F64, device=a.device))
        else:
            denom = torch.maximum(h0[name].abs(), 1e-12 * scale0[name])
            rel = torch.where(denom > 0, a / torch.where(denom > 0, denom, torch.ones_like(denom)),
                              torch.where(a > 0, torch.full_like(a, math.inf), torch.zeros_like(a)))
            parts.append(torch.stack([a.max(), rel.max()]))
        keys.append(name)
    out = {}
    if parts:
        dev0 = parts[0].device
        flat = torch.cat([p.to(dev0) for p in parts]).tolist()
        for i, name in enumerate(keys):
            out[f"{name}/max_abs"] = flat[2 * i]
            out[f"{name}/max_rel"] = flat[2 * i + 1]
    out["step"] = float(steps)
    return out
