"""`consopt.SGD`: `torch.optim.SGD` that tracks the exact deviation of every conserved function.

The update is torch's own (`torch.optim.sgd.sgd`, the functional behind `torch.optim.SGD`), so
parameters and momentum buffers are bitwise those of `torch.optim.SGD` (with
tracking_backend="native" on the CPU: the same arithmetic in one C++ pass that also forms the law
statistics, `consopt.native`; with "compile": as one compiled graph, `consopt.compiled_update`;
both checked bit for bit against torch's; on CUDA: the fused Triton step). With `laws`, the
optimizer also records h(θ_0) when tracking starts and h(θ_t) after every step, in float64
(`consopt.functional.LawEvaluator`), so that `deviation()` = h(θ_t) − h(θ_0) is free to read.
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.optim.optimizer import _use_grad_for_differentiable
from torch.optim.sgd import sgd as _torch_sgd

from .functional import LawEvaluator, deviation_stats, first_nonfinite_grad
from .laws import FamilyValues, LawSet

__all__ = ["SGD"]

_PROJECTIONS = ("symmetry", "euclidean")
_NONFINITE = ("propagate", "raise")
_STATE_KEY = "consopt"
_STATE_VERSION = 1
_FALLBACK = object()  # _fused_step could not run: take the PyTorch path


class _LawTracker:
    """Tracking state of one optimizer: h(θ_0), the last h(θ_t), scale at θ_0 and a step count.

    On the PyTorch path h(θ_t) is evaluated when it is first read after a step (`current()`),
    from the parameters as they are then, so steps whose deviation nobody reads cost torch's
    update only. The fused path hands over the values its kernels formed during the update.
    Values are kept as the evaluator (or the fused step) gives them: a `FamilyValues` over one
    vector where it can, so that `deviation()` is a few vector subtractions."""

    def __init__(self, laws: LawSet, tensors: Mapping[str, Tensor]):
        self.laws = laws
        self.evaluator = LawEvaluator(laws, tensors)
        self.names = laws.keys()
        self.h0: dict | None = None
        self.h: dict | None = None
        self.scale0: dict | None = None
        self.steps = 0
        self.skipped: Tensor | None = None  # steps skipped by a fused GradScaler step (on device)
        self._h0_flat = None  # (h0, a flat layout, h0 in that layout): see `deviation`

    @property
    def started(self) -> bool:
        return self.h0 is not None

    def family_device(self, name: str) -> torch.device:
        f = self.laws[name]
        return self.evaluator.tensors[f.terms[0].param].device

    def reset(self) -> None:
        h = self.evaluator.flat_values()
        self.h0, self.h = h, h
        self.scale0 = self.evaluator.scale()
        self.steps, self.skipped = 0, None

    def advance(self, values: dict | None = None, found_inf: Tensor | None = None) -> None:
        self.h = values  # None: evaluated on first read
        self.steps += 1
        if found_inf is not None:  # fused GradScaler step: no host sync, count skips on device
            s = (found_inf.detach() > 0).to(torch.int64).reshape(-1).sum()
            self.skipped = s if self.skipped is None else self.skipped + s.to(self.skipped.device)

    def current(self) -> Mapping:
        """h(θ_t) for every family (evaluated now if the last step did not provide it)."""
        if self.h is None:
            self.h = self.evaluator.flat_values()
        return self.h

    def num_steps(self) -> int:
        return self.steps - (int(self.skipped.item()) if self.skipped is not None else 0)

    def deviation(self) -> dict:
        if not self.started:
            shapes = self.laws.param_shapes
            return {n: torch.zeros(self.laws[n].shape(shapes), dtype=torch.float64, device=self.family_device(n))
                    for n in self.names}
        h = self.current()
        lay = self.evaluator.layout_of(h)
        if lay is not None and not h.extra:  # a few subtractions over the evaluator's vector
            return self.evaluator.as_dict(h, minus=self._h0_in(lay))
        names = self.names
        return dict(zip(names, torch._foreach_sub([h[n] for n in names], [self.h0[n] for n in names])))

    def _h0_in(self, lay) -> Tensor:
        """h0 as one vector in the flat layout `lay` (formed once per h0 and layout)."""
        h0 = self.h0
        if isinstance(h0, FamilyValues) and h0.where is lay.where:
            return h0.flat
        cached = getattr(self, "_h0_flat", None)  # (trackers pickled before it have none)
        if cached is None or cached[0] is not h0 or cached[1] is not lay:
            cached = self._h0_flat = (h0, lay, torch.cat([h0[n].reshape(-1) for n in lay.order]))
        return cached[2]

    def stats(self) -> dict:
        if not self.started:
            out = {}
            for n in self.names:
                out[f"{n}/max_abs"] = 0.0
                out[f"{n}/max_rel"] = 0.0
            out["step"] = 0.0
            return out
        return deviation_stats(self.current(), self.h0, self.scale0, self.num_steps())

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> dict:
        clone = lambda d: {k: v.detach().clone() for k, v in d.items()} if d is not None else {}
        return {
            "version": _STATE_VERSION,
            "families": list(self.names),
            "started": self.started,
            "steps": self.num_steps(),
            "h0": clone(self.h0),
            "h": clone(self.current() if self.started else None),
            "scale0": clone(self.scale0),
        }

    def prepare(self, state: Any) -> dict | None:
        """Validate a saved tracking state and move it to this optimizer's devices."""
        if state is None:
            return None
        if not isinstance(state, Mapping) or "families" not in state:
            raise ValueError(f"malformed consopt tracking state in the optimizer state dict: {type(state).__name__}")
        if int(state.get("version", 0)) > _STATE_VERSION:
            raise ValueError(f"consopt tracking state has version {state.get('version')}, "
                             f"this consopt reads up to version {_STATE_VERSION}; upgrade consopt")
        saved = list(state["families"])
        if saved != list(self.names):
            missing = [n for n in self.names if n not in saved]
            extra = [n for n in saved if n not in self.names]
            raise ValueError(
                "the checkpoint tracked other law families than this optimizer's laws "
                f"(missing from checkpoint: {missing[:5]}, not in laws: {extra[:5]}); "
                "build the optimizer with the same LawSet, or load a state dict without the "
                f"{_STATE_KEY!r} key to restart tracking"
            )
        if not state["started"]:
            return {"started": False}
        out = {"started": True, "steps": int(state["steps"])}
        shapes = self.laws.param_shapes
        for key in ("h0", "h", "scale0"):
            d = {}
            for n in self.names:
                if not isinstance(state.get(key), Mapping) or n not in state[key]:
                    raise ValueError(f"checkpoint tracking state {key!r} has no entry for law family {n!r}")
                v = state[key][n]
                want = tuple(self.laws[n].shape(shapes))
                if tuple(v.shape) != want:
                    raise ValueError(f"checkpoint tracking state {key}[{n!r}] has shape {tuple(v.shape)}, "
                                     f"the law family has shape {want}")
                d[n] = v.detach().to(device=self.family_device(n), dtype=torch.float64, copy=True)
            out[key] = d
        return out

    def load(self, prepared: dict | None) -> None:
        if prepared is None or not prepared["started"]:
            self.h0 = self.h = self.scale0 = None
            self.steps, self.skipped = 0, None
            return
        self.h0, self.h, self.scale0 = prepared["h0"], prepared["h"], prepared["scale0"]
        self.steps, self.skipped = prepared["steps"], None


class SGD(torch.optim.SGD):
    r"""Drop-in :class:`torch.optim.SGD` that tracks the deviation of conservation laws.

    Without ``laws`` (and with ``on_nonfinite="propagate"``) this is exactly
    ``torch.optim.SGD``: same hyperparameters, same errors, same update code
    (``torch.optim.sgd.sgd``), same ``state_dict``. Every torch.optim.SGD argument keeps its meaning.

    Args (beyond torch.optim.SGD's):
        laws (LawSet, optional): conservation laws to track, e.g. from ``consopt.find_laws``.
            Bound to parameter tensors through ``laws.bound`` (``laws.bind(model)``); every
            parameter a law uses must be held by this optimizer.
        projection (None | "symmetry" | "euclidean"): after each step, move the parameters
            back onto {h = h(θ_0)} (``consopt.projection``): "symmetry" acts with each law's
            own symmetry group (the network's function is unchanged; momentum buffers are
            transported by the same action), "euclidean" takes the nearest point. Needs laws.
            "symmetry" runs batched by colours of families in over-relaxed Gauss–Seidel rounds
            (``TensorProjector``; ``FlatProjector`` on the fused path); "euclidean" is the
            per-family reference ``project``. ``projection_stats`` holds the last projection's
            rounds, skipped (dead) units, residual and over-relaxation factor.
        on_nonfinite ("propagate" | "raise"): "propagate" does what torch does with NaN/inf
            gradients; "raise" raises FloatingPointError naming the first parameter with a
            non-finite gradient, before any parameter, momentum buffer or tracking state changes.

    Tracking. θ_0 is the parameter state at the first ``step()`` (evaluated before its update)
    or at ``reset_tracking()``. After every step h(θ_t) is evaluated in float64 from the stored
    parameters, so ``deviation()`` returns h(θ_t) − h(θ_0) without further work; it agrees with
    a float64 re-evaluation (``laws.evaluate``) to ~1e-15 × the sum of the absolute terms.
    Tracking state travels in ``state_dict()["consopt"]``; a state dict of this class loads into
    ``torch.optim.SGD`` and vice versa.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        laws: LawSet | None = None,
        projection: str | None = None,
        on_nonfinite: str = "propagate",
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused)
        if projection is not None:
            if not (isinstance(projection, str) and projection in _PROJECTIONS):
                raise ValueError(f"projection must be None, 'symmetry' or 'euclidean', got {projection!r}")
            if laws is None:
                raise ValueError(f"projection={projection!r} needs the laws to project onto: pass "
                                 "laws=consopt.find_laws(model, example_inputs)")
        if not (isinstance(on_nonfinite, str) and on_nonfinite in _NONFINITE):
            raise ValueError(f"on_nonfinite must be 'propagate' or 'raise', got {on_nonfinite!r}")
        if laws is not None and not isinstance(laws, LawSet):
            raise TypeError(f"laws must be a consopt.LawSet (e.g. from consopt.find_laws), got {type(laws).__name__}")
        self.laws = laws
        self.projection = projection
        self.on_nonfinite = on_nonfinite
        self._law_names: dict = {}
        self._law_params: list = []
        self._tracker: _LawTracker | None = None
        self.projection_stats = None  # consopt.projection.ProjectionStats of the last projected step
        self._use_fused: bool | None = None  # decided at the first step (devices are final then)
        self._force_triton = False  # tests: run the Triton path on the CPU (TRITON_INTERPRET=1)
        self._flat = None  # FlatGroup per param group on the fused path
        self._compiled = None
        self._published = {}  # id(p) -> the momentum view we put in self.state[p]
        self._published_versions = {}  # group index -> its FlatGroup.version when published
        self._fused_ok = False  # a fused step has completed (kernels compiled and ran)
        self._projector = None  # FlatProjector on the fused path (False: its first use failed)
        self._tensor_projector = None  # TensorProjector elsewhere (symmetry projection)
        self._cpu_update = None  # consopt.compiled_update.CompiledUpdate (tracking_backend="compile")
        self._native = None  # consopt.native.NativeStep (tracking_backend="native")
        self._native_checked = False
        self._step_stats = None  # the native step's statistics of the current parameters
        self._step_measured = None  # the fused step's measurement for the flat projector (`step_laws`)
        self._momentum_transport = "eager"  # (see momentum_transport)
        self._projector_state = None  # a checkpoint's projector state, for the next projector (`_resume`)
        self._last_projector = None  # the projector of the last projected step (what a checkpoint saves)
        self._projector_ran = False  # the flat projector has completed a call (its first use is guarded)
        if laws is not None:
            self._tracker = _LawTracker(laws, self._bind(laws))
            from .native import available as native_available

            if all(p.device.type == "cpu" for p in self._tracker.evaluator.tensors.values()) and native_available():
                self._tracker.evaluator.backend = "native"  # the one-pass CPU step (see tracking_backend)

    # -- binding ---------------------------------------------------------------------------
    def _bind(self, laws: LawSet) -> dict:
        bound = laws.bound
        if bound is None:
            raise ValueError(
                "the LawSet is not bound to parameter tensors; call laws.bind(model) with the model "
                "whose parameters this optimizer updates (consopt.find_laws binds automatically)"
            )
        laws.check_params(bound, what="tensors the laws are bound to")
        held = {}
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                held.setdefault(id(p), (gi, j))
        tensors = {}
        if laws.param_names and not any(id(bound[n]) in held for n in laws.param_names):
            raise ValueError(
                f"none of the law parameters ({laws.param_names[0]!r}, ...) is held by this optimizer: "
                "the laws are bound to other tensors (another model, or a copy of it); call "
                "laws.bind(model) with the model whose parameters this optimizer updates"
            )
        for name in laws.param_names:
            p = bound[name]
            if id(p) not in held:
                raise ValueError(
                    f"law parameter {name!r} is not held by this optimizer: pass every parameter the "
                    "laws use (e.g. model.parameters()), or keep only the families you need with "
                    "laws.subset(names)"
                )
            if p.is_complex():
                raise ValueError(f"law parameter {name!r} is complex ({p.dtype}); conservation laws "
                                 "are tracked for real floating-point parameters only")
            if not p.is_floating_point():
                raise ValueError(f"law parameter {name!r} has dtype {p.dtype}; conservation laws "
                                 "are tracked for floating-point parameters only")
            if p.layout != torch.strided:
                raise ValueError(f"law parameter {name!r} has layout {p.layout}; only dense "
                                 "(strided) parameters can be tracked")
            tensors[name] = p
            self._law_names.setdefault(id(p), name)
        self._law_params = list(tensors.items())
        return tensors

    def __getstate__(self):
        self.sync_momentum()
        state = super().__getstate__()
        for k in ("laws", "projection", "on_nonfinite", "_law_names", "_law_params", "_tracker", "projection_stats",
                  "_momentum_transport"):
            state[k] = getattr(self, k, None)
        state["_use_fused"] = None  # flat storage is rebuilt on the next step
        state["_projector_state"] = self._projector_carry()  # (the projectors are rebuilt too)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        d = self.__dict__
        d.setdefault("laws", None)
        d.setdefault("projection", None)
        d.setdefault("on_nonfinite", "propagate")
        d.setdefault("_law_names", {})
        d.setdefault("_law_params", [])
        d.setdefault("_tracker", None)
        d.setdefault("projection_stats", None)
        d["_momentum_transport"] = d.get("_momentum_transport") or "eager"
        d["_use_fused"], d["_flat"], d["_compiled"], d["_published"] = None, None, None, {}
        d["_published_versions"] = {}
        d["_fused_ok"] = False
        d["_projector"] = None
        d["_tensor_projector"] = None
        d.setdefault("_projector_state", None)
        d["_last_projector"] = None
        d["_projector_ran"] = False
        d["_step_stats"] = None
        d["_step_measured"] = None
        d["_cpu_update"] = None
        d["_native"] = None
        d["_native_checked"] = False
        d.setdefault("_force_triton", False)
        if d["_law_names"] is None:
            d["_law_names"] = {}
        if d["_law_params"] is None:
            d["_law_params"] = []
        if d["_tracker"] is not None:  # ids changed when pickled/copied: rebuild the name map
            d["_law_names"] = {id(p): n for n, p in reversed(d["_tracker"].evaluator.tensors.items())}
            d["_law_params"] = list(d["_tracker"].evaluator.tensors.items())

    # -- the step --------------------------------------------------------------------------
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform one SGD step (torch's update), then record h(θ_t) if laws are tracked.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        found_inf = getattr(self, "found_inf", None)
        tracker = self._tracker
        if tracker is not None:
            self._check_law_grads()
        if self.on_nonfinite == "raise":
            self._raise_on_nonfinite(found_inf)
        if tracker is not None and not tracker.started:
            tracker.reset()  # θ_0: before the first update

        # Dispatch point: the PyTorch path today; a fused kernel (update + law statistics in
        # one pass) slots in here and returns the new law values itself.
        values = None
        self._step_stats = None
        self._step_measured = None
        if self._step_impl() == "fused":
            values = self._fused_step()
            if values is _FALLBACK:
                values = None
                self._torch_step()
        else:
            values = self._native_cpu_step()
            if values is _FALLBACK:
                values = None
                if not self._compiled_cpu_step():
                    self._torch_step()

        if self.projection is not None and tracker is not None:
            if found_inf is None or not bool(found_inf.item()):  # a skipped step moved nothing
                values = self._project(values)

        if tracker is not None:
            tracker.advance(values, found_inf)
        return loss

    def _project(self, values: dict | None = None):
        """Put the parameters back on {h = h(θ_0)} (consopt.projection); momentum is transported.

        "symmetry" on the fused path runs on the flat buffers (`consopt.projection.FlatProjector`:
        the statistics kernels, batched actions, one apply launch per buffer), elsewhere on the
        parameter tensors (`consopt.projection.TensorProjector`: the native or eager statistics,
        batched actions, one native pass per tensor); both return the law values at the projected
        point. "euclidean" is `consopt.projection.project` (re-evaluated by the tracker)."""
        from .projection import TensorProjector, project

        if self.projection == "symmetry" and self._use_fused and self._flat is not None and self._fused_ok:
            projected = self._project_flat(values)
            if projected is not _FALLBACK:
                return projected
        tensors = self._tracker.evaluator.tensors
        buffers = {}
        for name, p in tensors.items():
            buf = self.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                buffers[name] = buf
        if self.projection == "symmetry":
            backend = "native" if self._tracker.evaluator.backend == "native" else "eager"
            proj = self._tensor_projector
            if proj is None or proj.backend != backend:
                proj = self._tensor_projector = TensorProjector(self.laws, tensors, backend=backend)
            self._resume(proj)
            self._last_projector = proj
            stats, self._step_stats = self._step_stats, None
            self.projection_stats = proj(self._tracker.h0, buffers=buffers, values=values,
                                         stats=stats if values is not None else None)
            return proj.values
        self.projection_stats = project(self.laws, tensors, self._tracker.h0, self.projection, buffers=buffers)
        return None  # re-evaluated by the tracker

    def _project_flat(self, values: dict | None = None):
        """The symmetry projection on the flat buffers; _FALLBACK if its first use fails.
        `values`: h after the step, from the fused kernels (lets a step already on the level set
        skip every pass)."""
        if self._projector is False:
            return _FALLBACK
        first = not self._projector_ran
        snapshot = None
        try:
            if self._projector is None:
                self._new_flat_projector()
            if first:
                snapshot = self._snapshot_flat(grads=False)  # first use: kernels compile now
            measured, self._step_measured = self._step_measured, None
            self.projection_stats = self._projector(self._tracker.h0, values=values, measured=measured)
            self._projector_ran = True
            self._last_projector = self._projector
        except Exception as e:  # noqa: BLE001 - only on the first projected step, see above
            if not first:
                raise
            for b in (b for f in self._flat for b in f.buffers):
                b.transport = None  # (the snapshot holds the momentum as it was: nothing is owed)
            self._first_use_failed(snapshot, e, "the flat symmetry projection", "consopt.projection.project")
            self._projector = False
            return _FALLBACK
        return self._projector.values

    def _new_flat_projector(self) -> None:
        from .projection import FlatProjector

        self._projector = FlatProjector(self.laws, self._tracker.evaluator.tensors, self._flat,
                                        lazy_momentum=self._momentum_transport == "lazy")
        self._resume(self._projector)

    def _step_impl(self) -> str:
        """Which implementation applies the update.

        "fused": the Triton kernels of `triton_kernels` over flat buffers (update and every law
        statistic in one pass) — on CUDA with fused=True, or by default (fused=None) when laws
        are tracked. "torch": torch.optim.sgd.sgd, then an eager float64 evaluation of the laws."""
        if self._use_fused is None:
            self._use_fused = self._decide_fused()
        return "fused" if self._use_fused else "torch"

    def _decide_fused(self) -> bool:
        if self.defaults.get("differentiable"):
            return False
        fused = self.defaults.get("fused")
        if fused is False:
            return False
        params = [p for g in self.param_groups for p in g["params"]]
        ok_dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
        if not params or any(p.dtype not in ok_dtypes or p.is_sparse for p in params):
            return False
        for g in self.param_groups:
            if len({p.device for p in g["params"]}) > 1:
                return False
        if self._force_triton:
            return True
        if any(p.device.type != "cuda" for p in params):
            return False
        return bool(fused) or self.laws is not None

    def _fused_step(self) -> dict | None:
        """Apply the update with the fused Triton kernels; return {family: h(θ_t)} (or None)."""
        from .fused import FlatGroup, compile_laws, fused_sgd_step

        if self._flat is None:
            from ._kernels import check_triton_kernels

            check_triton_kernels()
            self._flat = [FlatGroup(g["params"]) for g in self.param_groups]
            self._published = {}
            self._published_versions = {}
            if self._tracker is not None:
                self._compiled = compile_laws(self.laws, self._tracker.evaluator.tensors, self._flat)
        self._sync_momentum_in()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        snapshot = None
        if not self._fused_ok:
            # First fused step: kernels compile now. If that fails (e.g. a Triton version without
            # some feature), restore the buffers and fall back to the PyTorch path for good.
            snapshot = self._snapshot_flat()
        # with the flat symmetry projection the step forms the projector's own (split) statistics:
        # its first measurement then costs no pass, and h = producer − consumer goes to the tracker
        if (self.projection == "symmetry" and self._projector is None and self._projector_state
                and self._tracker is not None and self._tracker.started):
            # a resumed run: its projector measures in this step, as the original's did
            try:
                self._new_flat_projector()
            except Exception:  # noqa: BLE001 - `_project_flat` builds it again and falls back there
                self._projector = None
        proj = self._projector if self.projection == "symmetry" and self._projector else None
        proj = proj if proj is not None and proj.measure_in_step else None
        compiled = proj.step_laws() if proj is not None else self._compiled
        try:
            for group, flat in zip(self.param_groups, self._flat):
                fused_sgd_step(flat, group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                               weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                               maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
                               compiled_laws=compiled, finish=False)
            if proj is not None:
                values, self._step_measured = proj.step_values()
            else:
                values = compiled.finish() if compiled is not None else None
        except Exception as e:  # noqa: BLE001 - only on the very first fused step, see above
            if snapshot is None:
                raise
            self._first_use_failed(snapshot, e, "the fused Triton step", "the PyTorch path")
            self._use_fused = False
            return _FALLBACK
        self._fused_ok = True
        self._sync_momentum_out()
        return values

    def _snapshot_flat(self, grads: bool = True) -> list:
        """Copies of every flat buffer (params, grads, momentum): a first use of the kernels
        that fails must leave nothing half-applied."""
        clone = lambda t: t.clone() if t is not None else None  # noqa: E731
        return [(b.param.clone(), clone(b.grad) if grads else None, clone(b.mom))
                for f in self._flat for b in f.buffers]

    @torch.no_grad()
    def _first_use_failed(self, snapshot: list | None, e: Exception, what: str, instead: str) -> None:
        """Restore the flat buffers from `snapshot` and warn that `instead` takes over."""
        for b, (p0, g0, m0) in zip([b for f in self._flat for b in f.buffers], snapshot or []):
            b.param.copy_(p0)
            if g0 is not None:
                b.grad.copy_(g0)
            if m0 is not None and b.mom is not None:
                b.mom.copy_(m0)
        warnings.warn(f"consopt.SGD: {what} failed on its first use ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using {instead} instead", RuntimeWarning,
                      stacklevel=5)

    def _sync_momentum_in(self) -> None:
        """Adopt momentum buffers that load_state_dict (or the user) put into self.state."""
        for group, flat in zip(self.param_groups, self._flat):
            if group["momentum"] == 0:
                continue
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                buf = st.get("momentum_buffer") if st else None
                mine = self._published.get(id(p))
                if buf is mine:
                    continue
                flat.set_momentum_buffer(i, buf)
                self._published.pop(id(p), None)

    def _sync_momentum_out(self) -> None:
        """Publish the flat momentum views in self.state (torch's state_dict reads them there).
        A group that rebuilt its buffers (a parameter's .data replaced, the model moved) carried
        the momentum into new ones: its views are published again (the old ones are stale)."""
        versions = self._published_versions
        for gi, (group, flat) in enumerate(zip(self.param_groups, self._flat)):
            if group["momentum"] == 0:
                continue
            stale = set()
            if versions.get(gi) != flat.version:
                stale = {id(p) for p in group["params"] if self._published.pop(id(p), None) is not None}
                versions[gi] = flat.version
            for i, p in enumerate(group["params"]):
                if (p.grad is None and id(p) not in stale) or id(p) in self._published:
                    continue
                view = flat.momentum_buffer(i)
                if view is not None:
                    self.state[p]["momentum_buffer"] = view
                    self._published[id(p)] = view

    def _torch_step(self, groups: list | None = None) -> None:
        """torch.optim.SGD's update, verbatim: the functional `torch.optim.sgd.sgd` per group
        (of every group, or of `groups`)."""
        for group in self.param_groups if groups is None else groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffer_list: list[Tensor | None] = []

            has_sparse_grad = self._init_group(group, params, grads, momentum_buffer_list)

            _torch_sgd(
                params,
                grads,
                momentum_buffer_list,
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
                has_sparse_grad=has_sparse_grad,
                foreach=group["foreach"],
                fused=group["fused"],
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
            )

            if group["momentum"] != 0:
                for p, momentum_buffer in zip(params, momentum_buffer_list, strict=True):
                    self.state[p]["momentum_buffer"] = momentum_buffer

    def _native_cpu_step(self):
        """With tracking_backend="native" on the CPU: torch's update and the law statistics in
        one pass (`consopt.native`, bitwise torch's update, checked at its first call), for every
        param group it can take (the others get torch's update); returns {family: h(θ_t)}
        (None: evaluated when read), or _FALLBACK, having changed nothing, where it takes no group
        (or the step must stay in torch's order): then the other paths run."""
        from .compiled_update import CompiledUpdate
        from .native import NativeStep

        tracker = self._tracker
        if tracker is None or tracker.evaluator.backend != "native":
            return _FALLBACK
        if self._native is not None and self._native.disabled is not None:
            return _FALLBACK
        per_group = self._cpu_segments(per_group=True)
        if per_group is None:
            return _FALLBACK
        native = [s is not None and bool(s.params) and NativeStep.accepts(s) for s in per_group]
        if not any(native) or not CompiledUpdate.distinct([s for s, n in zip(per_group, native) if n]):
            return _FALLBACK
        if not all(native) and self._shares_memory(per_group, native):
            return _FALLBACK  # torch's update for every group, in its order
        ev = tracker.evaluator
        if self._native is None:
            self._native = NativeStep(ev.native_needs(), ev.tensors)
        groups = [g for g, n in zip(self.param_groups, native) if n]
        where, taken = self._native.update([s for s, n in zip(per_group, native) if n])
        # the groups it did not take (float16, a first momentum step, non-contiguous, overlapping
        # views, or all of them if it changed nothing): torch's update, before any statistics
        self._torch_step([g for g, n in zip(self.param_groups, native) if not n]
                         + [g for g, t in zip(groups, taken) if not t])
        if where is None:
            return None  # evaluated when read
        stats = self._native.collect(ev.tensors, where)
        if not stats and self._native.needs:
            return None  # updated; a law tensor it cannot read: evaluated when read
        self._step_stats = stats  # (the projection's first measurement; views, valid until the next call)
        values = ev.flat_values_from_stats(stats)
        if not self._native_checked:  # once: the values against the evaluator's own pass
            self._native_checked = True
            ref = ev.values_from_stats(ev._stats_eager({n: p.detach() for n, p in ev.tensors.items()}))
            scale = ev.scale()
            for n in ref:
                v, r = values[n], ref[n]
                tol = 1e-12 * scale[n] + 1e-300
                agree = ((v - r).abs() <= tol) | (v == r) | (v.isnan() & r.isnan())  # (non-finite steps)
                if not bool(agree.all()):
                    warnings.warn(f"consopt: the native law statistics disagree with the eager evaluation for "
                                  f"{n!r}; tracking uses the eager backend", RuntimeWarning, stacklevel=3)
                    ev.backend = "eager"
                    return ref
        return values

    def _shares_memory(self, per_group: list, native: list) -> bool:
        """Whether a group left to torch's update shares memory (params, grads, buffers) with a
        group the native step would take: then the order of the updates matters."""
        from .native import _overlapping

        mine = [t for s, n in zip(per_group, native) if n for lst in (s.params, s.grads, s.bufs) for t in lst]
        theirs = []
        for group, n in zip(self.param_groups, native):
            if not n:
                for p in group["params"]:
                    theirs.append(p)
                    if p.grad is not None and p.grad.layout == torch.strided:
                        theirs.append(p.grad)
                    buf = self.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        theirs.append(buf)
        return _overlapping(mine, theirs)

    def _cpu_segments(self, per_group: bool = False) -> list | None:
        """Every param group's update as a `consopt.compiled_update.Segment` (torch's selection
        of params with gradients), or None where only torch's own update applies (the step is
        being traced, GradScaler, fused/differentiable groups, tensor hyperparameters that need
        grad, sparse gradients, the first step with momentum, dtypes other than float32/float64,
        tensors shared between params, grads and buffers). per_group: a list with None for each
        group that only torch's update can take (None overall only for the step-wide reasons)."""
        from .compiled_update import CompiledUpdate

        if torch.compiler.is_compiling():  # the step itself is being traced: torch's update
            return None
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return None
        segments = []
        for group in self.param_groups:
            seg = self._group_segment(group)
            if seg is not None and not CompiledUpdate.applicable(seg):
                seg = None
            if seg is None and not per_group:
                return None
            segments.append(seg)
        if not per_group and not CompiledUpdate.distinct(segments):
            return None
        return segments

    def _group_segment(self, group):
        """One group's `consopt.compiled_update.Segment`, or None where only torch's update can take it."""
        from .compiled_update import Segment

        if group["differentiable"] or group["fused"]:
            return None
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.requires_grad or lr.numel() != 1:
                return None
            lr = lr.item()
        hyper = [group[k] for k in ("momentum", "dampening", "weight_decay")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [lr] + hyper):
            return None
        params, grads, bufs = [], [], []
        if self._init_group(group, params, grads, bufs):  # torch's selection, as _torch_step's
            return None  # a sparse gradient
        return Segment(params, grads, bufs, float(lr), *map(float, hyper), nesterov=bool(group["nesterov"]),
                       maximize=bool(group["maximize"]), foreach=bool(group["foreach"]))

    def _compiled_cpu_step(self) -> bool:
        """With tracking_backend="compile" on the CPU: torch's update as one compiled graph
        (`consopt.compiled_update`, bitwise torch's, checked at its first call). False when it
        does not apply (see `_cpu_segments`): then torch's own update runs."""
        from .compiled_update import CompiledUpdate

        if self._tracker is None or self._tracker.evaluator.backend != "compile":
            return False
        if self._cpu_update is None:
            self._cpu_update = CompiledUpdate()
        if self._cpu_update.disabled is not None:
            return False
        segments = self._cpu_segments()
        if segments is None:
            return False
        return self._cpu_update(segments)

    def _check_law_grads(self) -> None:
        shapes, strided = self.laws.param_shapes, torch.strided
        for name, p in self._law_params:
            if p.shape != shapes[name]:  # (.data replaced): check_params names it
                self.laws.check_params(dict(self._law_params), what="optimizer's parameters")
            g = p.grad
            if g is not None and g.layout is not strided:
                raise ValueError(f"law parameter {name!r} has a sparse gradient ({g.layout}); consopt "
                                 "tracks laws for dense gradients only (e.g. nn.Embedding(sparse=False))")

    def _param_label(self, gi: int, j: int, p: Tensor) -> str:
        name = self._law_names.get(id(p))
        if name is None and self.laws is not None and self.laws.bound:  # (find_laws binds every parameter)
            name = next((n for n, q in self.laws.bound.items() if q is p), None)
        if name is not None:
            return repr(name)
        names = self.param_groups[gi].get("param_names")
        if names is not None and j < len(names):
            return repr(names[j])
        return f"param_groups[{gi}]['params'][{j}]"

    def _raise_on_nonfinite(self, found_inf: Tensor | None) -> None:
        if found_inf is not None and bool(found_inf.item()):
            return  # a GradScaler found inf/NaN: the fused update skips this step itself
        where, grads = [], []
        for gi, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is not None:
                    where.append((gi, j, p))
                    grads.append(p.grad)
        k = first_nonfinite_grad(grads)
        if k is not None:
            gi, j, p = where[k]
            raise FloatingPointError(
                f"non-finite gradient (NaN or inf) for parameter {self._param_label(gi, j, p)}; "
                "on_nonfinite='raise' stopped the step before any parameter, momentum buffer or "
                "tracking state changed"
            )

    # -- tracking API ----------------------------------------------------------------------
    def reset_tracking(self) -> None:
        """Start tracking afresh: θ_0 := the current parameters (h0, scale0 evaluated now)."""
        if self._tracker is None:
            raise RuntimeError("this optimizer tracks no laws: pass laws=consopt.find_laws(...) to consopt.SGD")
        self._tracker.reset()

    @property
    def tracking_backend(self) -> str | None:
        """How h(θ_t) is computed after each step (None without laws):

        "native" (default where every law parameter is on the CPU and a C++ compiler is found,
        else "eager"): the update and every law statistic in one pass of a C++ kernel
        (`consopt.native`: each element read and written once; row/column sums and the Gram
        matrices of attention heads and other aligned unit groups formed while the parameter is
        in cache; bitwise torch's update, checked against torch's at its first call). Built on
        first use with the system's C++ compiler (5–9 s, then cached); if the build fails, a
        warning and "eager". Param groups it cannot take (float16/bfloat16, non-contiguous
        tensors, the first step with momentum, fused groups, …) get torch's update; the law
        statistics then still come from its statistics-only pass where it can read the tensors.
        "eager": chunked float64 torch ops (``consopt.functional.LawEvaluator``); h(θ_t) is
        evaluated when first read after a step.
        "compile": the per-parameter statistics in one ``torch.compile``d graph (one fused pass
        over each parameter; the first step compiles, which takes seconds; falls back to
        "eager" with a warning if compilation fails). On the CPU the update itself then also
        runs as one compiled graph (`consopt.compiled_update`: one pass per tensor instead of
        torch's two to four, bitwise torch's result, checked against torch's update at its first
        call). All backends match a float64 re-evaluation to ~1e-15 × scale; bitwise
        reproducibility of the deviations (e.g. of a resumed run) holds within a backend.
        """
        return None if self._tracker is None else self._tracker.evaluator.backend

    @tracking_backend.setter
    def tracking_backend(self, value: str) -> None:
        if self._tracker is None:
            raise RuntimeError("this optimizer tracks no laws: pass laws=consopt.find_laws(...) to consopt.SGD")
        self._tracker.evaluator.backend = value

    @property
    def tracked_steps(self) -> int:
        """Number of steps applied since θ_0 (skipped GradScaler steps are not counted)."""
        return 0 if self._tracker is None or not self._tracker.started else self._tracker.num_steps()

    def deviation(self) -> dict:
        """{family: h(θ_t) − h(θ_0)} as float64 tensors, same keys and shapes as ``laws.evaluate``.

        θ_t is the state after the last step. Before the first step (tracking not started) every
        deviation is 0. Without laws: {}. The native CPU step and the fused CUDA step form
        h(θ_t) during the update itself; with tracking_backend "eager" or "compile" it is
        evaluated at the first read after a step (from the parameters as they are then) and
        kept until the next step, so steps that nobody reads cost torch's update only.
        """
        if self._tracker is None:
            return {}
        return self._tracker.deviation()

    def deviation_stats(self) -> dict:
        """Flat {str: float} for loggers. For every family f, with dev = h(θ_t) − h(θ_0):

            f"{f}/max_abs" = max_i |dev_i|
            f"{f}/max_rel" = max_i |dev_i| / max(|h(θ_0)_i|, 1e-12 · scale0_i)

        scale0_i = Σ of the absolute terms of function i at θ_0 (``laws.scale``); where that
        denominator is 0 the ratio is 0 if dev_i = 0, else inf. Plus "step": the number of
        tracked steps. Costs one host sync. Without laws: {}.
        """
        if self._tracker is None:
            return {}
        return self._tracker.stats()

    @property
    def momentum_transport(self) -> str:
        """How `projection="symmetry"` transports the momentum buffers on the fused path.

        "eager" (default): the projection's passes rewrite the momentum with the parameters
        (m ← g·m, a velocity), so `self.state[p]["momentum_buffer"]` always holds the transported
        buffer. "lazy": the diagonal actions (rescale, gate and stream factors; the bulk of the
        passes' traffic) are applied to the parameters only and owed to the momentum as per-slot
        factors, which the next step's kernel multiplies in as it loads the buffer anyway: the
        projection's passes then read and write the parameters alone (8 instead of 16 bytes per
        float32 element). The result is the same: bitwise where each momentum entry is scaled once
        between two steps and no matrix action moves it (eager rounds after each action, lazy
        once), else to the rounding of the composed factors. Between steps
        `self.state[...]["momentum_buffer"]` then holds the untransported buffer: `state_dict()`,
        pickling and `sync_momentum()` apply what is owed first, and so does the flat storage when
        it is rebuilt; a buffer the user or `load_state_dict` puts into `self.state` replaces its
        owed factors. Falls back to eager transport (`momentum_transport_active` says which runs)
        where matrix actions mix the rows that owed factors scale, or for families acted on by
        `consopt.projection.project`'s per-family code. No effect off the fused path (the CPU
        transports eagerly).
        """
        return self._momentum_transport

    @momentum_transport.setter
    def momentum_transport(self, value: str) -> None:
        if not (isinstance(value, str) and value in ("eager", "lazy")):
            raise ValueError(f"momentum_transport must be 'eager' or 'lazy', got {value!r}")
        self._momentum_transport = value
        if self._projector:
            self._projector.set_lazy(value == "lazy")

    @property
    def momentum_transport_active(self) -> str:
        """The transport the projection actually runs: "lazy" only on the fused path, once its
        projector is built (the first projected step), with `momentum_transport = "lazy"` and no
        family that needs eager transport (see `momentum_transport`); else "eager"."""
        return "lazy" if self._projector and self._projector.lazy else "eager"

    def sync_momentum(self) -> None:
        """Apply what a lazy projection owes the momentum buffers (see `momentum_transport`), so
        that `self.state[p]["momentum_buffer"]` holds the transported buffers. Cheap when nothing
        is owed."""
        for f in self._flat or ():
            f.sync_momentum()

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim.SGD's state dict, plus tracking state under the extra key "consopt".

        ``state_dict()["consopt"]`` = {"version", "families", "started", "steps", "h0", "h",
        "scale0"} (float64 tensors per family), and with a symmetry projection "projector" (what
        carries from one projected step to the next: `_ColouredProjector.state`, so that a resumed
        run continues bit for bit); loadable with ``torch.load(weights_only=True)``.
        torch.optim.SGD ignores the extra key.
        """
        self.sync_momentum()
        sd = super().state_dict()
        if self._tracker is not None:
            sd[_STATE_KEY] = self._tracker.state_dict()
            carry = self._projector_carry()
            if carry:
                sd[_STATE_KEY]["projector"] = carry
        return sd

    def _projector_carry(self) -> dict | None:
        """The symmetry projector's state that carries from step to step (`state()`), or the one a
        checkpoint gave that no projector has taken yet."""
        proj = self._last_projector
        return proj.state() if proj is not None else self._projector_state

    def _resume(self, proj) -> None:
        """Hand a loaded checkpoint's projector state to the projector about to run."""
        if self._projector_state is not None:
            proj.load_state(self._projector_state)
            self._projector_state = None

    def load_state_dict(self, state_dict) -> None:
        """torch.optim.SGD's load_state_dict; also restores tracking state if present.

        A state dict without tracking state (e.g. from torch.optim.SGD) restarts tracking at the
        next step. Tracking state is validated before anything is loaded.
        """
        prepared, proj_state = None, {}  # (no projector state in it: the next projection starts afresh)
        if self._tracker is not None and isinstance(state_dict, Mapping):
            saved = state_dict.get(_STATE_KEY)
            prepared = self._tracker.prepare(saved)
            proj_state = saved.get("projector") if saved is not None else None
            if proj_state is not None and not isinstance(proj_state, Mapping):
                raise ValueError(f"malformed consopt projector state in the optimizer state dict: "
                                 f"{type(proj_state).__name__}")
            if proj_state:
                from .projection import _ColouredProjector

                _ColouredProjector.check_state(proj_state)
        super().load_state_dict(state_dict)
        if self._tracker is not None:
            self._tracker.load(prepared)
            self._projector_state = dict(proj_state or {})
