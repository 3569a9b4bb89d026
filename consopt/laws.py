"""Conservation laws as data: `Term`, `Family` and `LawSet`.

Every law consopt knows is a sum of signed terms, each term a slice of one parameter:

    M_t = P_t.movedim(axis_t, 0)[index_t].reshape(units, -1)        # [units, K_t]
    (grouped convolutions refine the axis into axis × groups blocks: `Term.groups`)

and a family's value is, in float64,

    order 2, "matrix":  h = Σ_t s_t M_t M_tᵀ                        # (r, r), GL(r) Noether charge
    order 2, "diag":    h = Σ_t s_t rowsum(M_t ⊙ M_t)               # (units,), diagonal group
    order 1, "diag":    h = Σ_t s_t rowsum(M_t)                     # (units,), per-channel translation
    order 1, "vector":  h = concat_t s_t colsum(M_t)                # (Σ K_t,), per-token translation

with s_t = +1 for producer slices (rows of W̃ = [W | b]) and −1 for consumer slices
(columns of the next layer). See SPEC §5 and Marcotte, Gribonval, Peyré, "Transformative or
Conservative? Conservation laws for ResNets and Transformers", ICML 2025.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable, Iterable, Mapping

import torch

KINDS = ("rescale", "linear", "stream", "attention_qk", "attention_vo", "gate", "translation", "scale")


@dataclasses.dataclass(frozen=True, eq=False)
class Term:
    """One signed slice of one parameter: row `u` of M is P.movedim(axis, 0)[index[u]] flattened.

    groups = G > 1 refines the axis for grouped convolutions: the other entries of each slice
    along `axis` are split into G equal blocks (by the first remaining dim: a grouped conv's
    output channels), and position j·G + g of the refined axis is slice j restricted to block g.
    For W [O, c, k, k] of a conv with G groups of c input channels, Term(W, 1, [[j·G + g]], −1,
    groups=G) is input channel g·c + j as its group's rows read it: W[g·O/G:(g+1)·O/G, j]."""

    param: str
    axis: int
    index: torch.Tensor  # int64 [units, S]
    sign: int
    groups: int = 1

    @property
    def units(self) -> int:
        return int(self.index.shape[0])

    def slices(self, p: torch.Tensor) -> torch.Tensor:
        """M_t of this term from parameter tensor `p` (any dtype): shape [units, K]."""
        idx = self.index.to(p.device)
        q = p.movedim(self.axis, 0)
        if self.groups > 1:  # the refined axis: [n·G, rest / G], row j·G + g = block g of slice j
            q = q.reshape(q.shape[0] * self.groups, -1)
        return q[idx].reshape(self.units, -1)

    def width(self, shape: torch.Size) -> int:
        """K_t, the number of entries in one unit's slice, for a parameter of `shape`."""
        rest = math.prod(shape) // shape[self.axis] if len(shape) else 1
        return int(self.index.shape[1]) * rest // self.groups


@dataclasses.dataclass(eq=False)
class Family:
    """A set of conserved functions sharing one symmetry group (one layer's units, one head...)."""

    name: str
    kind: str
    form: str  # "matrix" | "diag" | "vector"
    order: int  # 2 (quadratic Noether charge) or 1 (translation)
    terms: list
    modules: tuple = ()
    approximate: bool = False
    note: str = ""

    @property
    def units(self) -> int:
        return self.terms[0].units

    def shape(self, param_shapes: Mapping[str, torch.Size]) -> tuple:
        if self.form == "matrix":
            return (self.units, self.units)
        if self.form == "diag":
            return (self.units,)
        return (sum(t.width(param_shapes[t.param]) for t in self.terms),)

    def num_functions(self, param_shapes: Mapping[str, torch.Size]) -> int:
        """Independent scalar functions (r(r+1)/2 for a symmetric r×r law); 0 if approximate."""
        if self.approximate:
            return 0
        if self.form == "matrix":
            # h = Σ ± M_t M_tᵀ with M = [M_1 | … ] of K columns: when r > K the symmetric r×r
            # matrix has rank ≤ K and only r·K − K(K−1)/2 of its entries are independent.
            r = self.units
            k = sum(t.width(param_shapes[t.param]) for t in self.terms)
            return r * (r + 1) // 2 if r <= k else r * k - k * (k - 1) // 2
        return self.shape(param_shapes)[0]

    def params(self) -> list:
        seen = []
        for t in self.terms:
            if t.param not in seen:
                seen.append(t.param)
        return seen

    def value(self, params: Mapping[str, torch.Tensor], absolute: bool = False) -> torch.Tensor:
        """h(θ) in float64 from `params` (name -> tensor). With absolute=True, Σ_t of |terms|."""
        out = None
        for t in self.terms:
            m = t.slices(params[t.param]).to(torch.float64)
            if absolute:
                m = m.abs()
            s = 1.0 if absolute else float(t.sign)
            if self.order == 2:
                v = m @ m.T if self.form == "matrix" else (m * m).sum(1)
            elif self.form == "diag":
                v = m.sum(1)
            else:
                v = m.sum(0)
            v = v * s
            if self.form == "vector":
                out = v if out is None else torch.cat([out, v])
            else:
                out = v if out is None else out + v
        return out


def _named_params(model_or_params) -> dict:
    if isinstance(model_or_params, torch.nn.Module):
        return dict(model_or_params.named_parameters(remove_duplicate=False))
    if isinstance(model_or_params, Mapping):
        return dict(model_or_params)
    raise TypeError(
        f"expected an nn.Module or a mapping of parameter names to tensors, got {type(model_or_params).__name__}"
    )


class FamilyValues(Mapping):
    """{family name: float64 tensor} over one flat vector: a family's tensor is a view of `flat`,
    made when it is first read. The fused step forms every law value in one vector; building a
    dict of hundreds of views from it at every step (GPT-2: 289 families) would cost more host
    time than the step's kernels on a GPU. `extra`: tensors of families outside the vector."""

    __slots__ = ("flat", "where", "names", "extra", "_views")

    def __init__(self, flat: torch.Tensor, where: Mapping, names: list, extra: Mapping | None = None):
        self.flat, self.where, self.names, self.extra = flat, where, names, extra or {}
        self._views: dict = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        v = self._views.get(name)
        if v is None:
            if name in self.extra:
                return self.extra[name]
            off, size, shape = self.where[name]  # (KeyError for a name that is not a family here)
            v = self._views[name] = self.flat[off:off + size].view(shape)
        return v

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self.extra or name in self.where

    def __repr__(self) -> str:
        return f"FamilyValues({dict(self)!r})"


class LawSet:
    """The conservation laws of one model, keyed by family name (SPEC §4)."""

    loss = None  # (LawSets pickled before `loss` existed read None)

    def __init__(self, families: Iterable[Family], param_shapes: Mapping[str, torch.Size], notes=(),
                 params: Mapping[str, torch.Tensor] | None = None, loss: str | None = None):
        self.families = list(families)
        self.loss = loss  # the loss the laws were found for (find_laws' `loss`; certify's default)
        # The parameter tensors of the model the laws were found on (what an optimizer binds to).
        self.bound = dict(params) if params is not None else None
        self.param_shapes = {k: torch.Size(v) for k, v in param_shapes.items()}
        self.notes = list(notes)
        names = [f.name for f in self.families]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate law family names: {names}")
        self._by_name = {f.name: f for f in self.families}

    # -- container protocol -------------------------------------------------------------
    def __len__(self):
        return len(self.families)

    def __iter__(self):
        return iter(self.families)

    def __getitem__(self, name: str) -> Family:
        return self._by_name[name]

    def __contains__(self, name) -> bool:
        return name in self._by_name

    def keys(self):
        return list(self._by_name)

    def __repr__(self):
        return f"LawSet({len(self.families)} families, {self.num_functions} functions)"

    @property
    def param_names(self) -> list:
        seen = {}  # (an ordered set)
        for f in self.families:
            for p in f.params():
                seen.setdefault(p, None)
        return list(seen)

    @property
    def num_functions(self) -> int:
        return sum(f.num_functions(self.param_shapes) for f in self.families)

    def subset(self, names: Iterable[str]) -> "LawSet":
        names = list(names)
        return LawSet([self[n] for n in names], self.param_shapes, self.notes, self.bound, self.loss)

    def bind(self, model) -> "LawSet":
        """Bind to `model`'s parameter tensors (checked by name and shape); returns self."""
        params = _named_params(model)
        self.check_params(params)
        self.bound = {n: params[n] for n in self.param_names}
        return self

    # -- evaluation ---------------------------------------------------------------------
    def check_params(self, params: Mapping[str, torch.Tensor], what: str = "model") -> None:
        """Raise a clear error if a law's parameter is missing or has another shape."""
        for name in self.param_names:
            if name not in params:
                raise KeyError(
                    f"law parameter {name!r} is not in the {what} (it has {len(params)} parameters); "
                    "a LawSet names parameters by their qualified names"
                )
            if params[name].shape != self.param_shapes[name]:
                raise ValueError(
                    f"law parameter {name!r} has shape {tuple(params[name].shape)} in the {what}, "
                    f"but the laws were found with shape {tuple(self.param_shapes[name])}: find the laws "
                    "again for the changed model"
                )

    def evaluate(self, model) -> dict:
        """float64 value of every family, on the parameters' device: {name: tensor}."""
        params = _named_params(model)
        self.check_params(params)
        with torch.no_grad():
            p64 = {n: params[n].detach() for n in self.param_names}
            return {f.name: f.value(p64) for f in self.families}

    def scale(self, model) -> dict:
        """Σ of the absolute terms of every function (the yardstick of SPEC §6's error bound)."""
        params = _named_params(model)
        self.check_params(params)
        with torch.no_grad():
            p64 = {n: params[n].detach() for n in self.param_names}
            return {f.name: f.value(p64, absolute=True) for f in self.families}

    # -- reporting ----------------------------------------------------------------------
    def summary(self) -> str:
        rows = [("family", "kind", "form", "units", "functions", "modules")]
        for f in self.families:
            shape = "x".join(str(s) for s in f.shape(self.param_shapes))
            nf = f.num_functions(self.param_shapes)
            kind = f.kind + (" (approx.)" if f.approximate else "")
            rows.append((f.name, kind, f"{f.form} {shape}", str(f.units), str(nf), ", ".join(f.modules)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.families)} families, {self.num_functions} independent conserved functions")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)

    def certify(self, model, example_inputs, *, loss=..., **count_kw):
        """Compare num_functions with the numeric count of `consopt.lie.count_laws`. `loss`:
        the loss whose symmetries count (None or "cross_entropy"); by default the one the laws
        were found for (`self.loss`)."""
        from .lie import certify

        return certify(self, model, example_inputs, loss=loss, **count_kw)

    # -- autograd check -----------------------------------------------------------------
    def verify(self, model, inputs, targets, loss_fn: Callable, *, max_functions: int = 2048) -> dict:
        """Worst |cos(∇h, ∇L)| per family, by autograd in float64 on a copy of `model`.

        ∇L is the gradient of `loss_fn(model(*inputs), targets)` over the trainable parameters
        (`requires_grad`); ∇h the gradient of each independent function (upper triangle of
        matrix laws) over the same parameters: a frozen one does not move, so a law with a
        frozen term is judged by its trainable part alone (and fails unless that part is
        orthogonal to ∇L). Families with more than `max_functions` functions are checked on a
        random subset of that size. A conservation law gives ~1e-16. A loss or gradient that is
        not finite raises ValueError (a NaN would otherwise read as a pass).
        """
        m64 = copy.deepcopy(model).to(torch.float64)
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        cast = lambda x: x.to(torch.float64) if torch.is_tensor(x) and x.is_floating_point() else x
        inputs = tuple(cast(x) for x in inputs)
        targets = cast(targets)
        params = dict(m64.named_parameters(remove_duplicate=False))
        self.check_params(params)
        trainable = {n for n, p in params.items() if p.requires_grad}
        if not trainable:
            raise ValueError("verify: the model has no trainable parameter (requires_grad): nothing moves")
        m64.zero_grad(set_to_none=True)
        loss = loss_fn(m64(*inputs), targets)
        names = [n for n in params if n in trainable]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        gL = {n: (g if g is not None else torch.zeros_like(params[n])) for n, g in zip(names, grads)}
        g_norm = torch.sqrt(sum((g * g).sum() for g in gL.values()))
        if not (torch.isfinite(loss).all() and torch.isfinite(g_norm)):
            raise ValueError(f"verify: the loss ({float(loss.detach().sum())}) or its gradient is not finite "
                             "for these inputs and targets (a NaN input, a fully masked row?): nothing can be checked")
        for p in params.values():  # ∇h over every term, frozen ones included (then left out below)
            p.requires_grad_(True)
        out = {}
        gen = torch.Generator().manual_seed(0)
        for f in self.families:
            fp = f.params()
            leaves = [params[n] for n in fp]
            h = f.value({n: params[n] for n in fp})
            if f.form == "matrix":
                iu = torch.triu_indices(f.units, f.units)
                h = h[iu[0], iu[1]]
            h = h.reshape(-1)
            sel = torch.arange(h.numel())
            if h.numel() > max_functions:
                sel = torch.randperm(h.numel(), generator=gen)[:max_functions]
            g_flat = torch.cat([gL[n].reshape(-1) if n in gL else torch.zeros(params[n].numel(), dtype=h.dtype)
                                for n in fp])
            worst = 0.0
            for chunk in sel.split(256):
                eye = torch.zeros(len(chunk), h.numel(), dtype=h.dtype)
                eye[torch.arange(len(chunk)), chunk] = 1.0
                gh = torch.autograd.grad(h, leaves, grad_outputs=eye, is_grads_batched=True,
                                         retain_graph=True, allow_unused=True)
                gh = torch.cat([(g if g is not None and n in trainable
                                 else torch.zeros(len(chunk), *params[n].shape, dtype=h.dtype))
                                .reshape(len(chunk), -1) for g, n in zip(gh, fp)], dim=1)
                if not bool(torch.isfinite(gh).all()):
                    raise ValueError(f"verify: the gradient of family {f.name!r} is not finite (a non-finite parameter?)")
                dots = gh @ g_flat
                denom = gh.norm(dim=1) * g_norm
                cos = torch.where(denom > 0, dots.abs() / denom.clamp_min(1e-300), torch.zeros_like(dots))
                worst = max(worst, float(cos.max()))
            out[f.name] = worst
        return out
