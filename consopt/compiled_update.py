"""torch.optim.SGD's update as one `torch.compile`d graph on the CPU, bitwise equal to torch's.

torch's CPU step (`torch.optim.sgd.sgd`) makes two to four passes over every parameter
(``buf.mul_(momentum)``, ``buf.add_(grad)``, ``param.add_(buf, alpha=-lr)``, …). Compiled, the
update of every parameter of the optimizer is one graph with one pass per tensor: each element
reads p, g, m and writes p, m once. On a 2-core CPU it takes about half of torch's time (ResNet-18:
7.0 vs 11.7 ms; `benchmarks/bench_cpu.py`), which pays for the law statistics that
`tracking_backend="compile"` evaluates afterwards.

The arithmetic is torch's, operation by operation. Each ``add(x, alpha=a)`` of torch's CPU
kernels is a fused multiply-add (``at::vec::fmadd``), written here with inductor's ``fma`` prim;
every other operation (negation, ``buf * momentum``) rounds as torch's does:

    d ← −g if maximize else g
    d ← fma(p, λ, d)                        if λ ≠ 0            (weight decay)
    m ← fma(d, 1 − dampening, m · μ);  d ← m   if μ ≠ 0   (nesterov: d ← fma(m, μ, d))
    p ← fma(d, −lr, p)

This is checked rather than assumed: the first call of every compiled graph also runs torch's
update on copies and compares the bits; on a mismatch (another CPU or compiler) the step is
undone and torch's own update applied, and the optimizer uses torch's update from then on, with a
warning. Afterwards the
graph only runs under the "fail_on_recompile" stance: a guard failure (a tensor changed stride or
dtype) builds and checks a new graph instead of silently re-running the Python function eagerly,
where the ``fma`` prim would round twice.

Hyperparameters are 0-dim tensor inputs, so changing lr, momentum, dampening or weight decay
(schedulers) does not recompile; the set of parameters with gradients and the flags do.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.sgd import sgd as _torch_sgd

__all__ = ["Segment", "CompiledUpdate", "update_graph", "snapshot", "matches_torch", "restore"]

DTYPES = (torch.float32, torch.float64)
_MAX_BUILDS = 8  # compiled graphs per optimizer before giving up (e.g. grads that keep changing layout)


@dataclass
class Segment:
    """One param group's update: the tensors (params with a gradient), its hyperparameters and
    the flags that shape the graph. `foreach` is the group's effective setting (torch's foreach
    nesterov path adds the momentum into the gradients in place; the graph does the same)."""

    params: list
    grads: list
    bufs: list  # momentum buffers (None before the first step); [] without momentum
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool
    foreach: bool

    @property
    def flags(self) -> tuple:
        mom = self.momentum != 0
        writes_grad = bool(self.foreach and mom and self.nesterov and not self.maximize and self.weight_decay == 0)
        return (len(self.params), mom, bool(self.nesterov and mom), self.maximize, self.weight_decay != 0, writes_grad)

    def hyper_tensors(self, dtype) -> tuple:
        """(−lr, μ, 1 − dampening, λ) as 0-dim tensors of `dtype`, rounded as torch rounds a
        Python scalar for that dtype's kernels."""
        vals = (-self.lr, self.momentum, 1 - self.dampening, self.weight_decay)
        return tuple(torch.tensor(v, dtype=dtype) for v in vals)


def _fma():
    from torch._inductor import inductor_prims  # noqa: F401 - registers torch.ops.prims.fma

    return torch.ops.prims.fma.default


_IDS = iter(range(1 << 62))


def update_graph(flags: tuple):
    """The Python function compiled for segments with these `flags` (per segment: count,
    momentum, nesterov, maximize, weight decay, nesterov-writes-grad). Inputs: per segment the
    lists (params, grads, bufs) and its hyperparameter tensors (−lr, μ, 1 − dampening, λ)."""
    fma = _fma()

    def sgd_update(tensors, hypers):
        for (n, mom, nest, maximize, wd, writes_grad), (ps, gs, bs), (neg_lr, mu, damp1, lam) in zip(
                flags, tensors, hypers):
            for i in range(n):
                p, g = ps[i], gs[i]
                d = -g if maximize else g
                if wd:
                    d = fma(p, lam, d)
                if mom:
                    m = fma(d, damp1, bs[i] * mu)
                    bs[i].copy_(m)
                    if nest:
                        d = fma(m, mu, d)
                        if writes_grad:
                            g.copy_(d)
                    else:
                        d = m
                p.copy_(fma(d, neg_lr, p))

    sgd_update.__code__ = sgd_update.__code__.replace(co_name=f"consopt_sgd_update_{next(_IDS)}")
    return torch.compile(sgd_update, dynamic=False, fullgraph=True,
                         options={"size_asserts": False})


def _bits_equal(a: Tensor, b: Tensor) -> bool:
    a, b = a.contiguous(), b.contiguous()
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a.view(torch.int64), b.view(torch.int64))


class CompiledUpdate:
    """The compiled update of one optimizer: a graph per segment layout, each checked against
    torch's update at its first call. `disabled` holds the reason once torch's update must be
    used instead (never half-applied: a failed call leaves or restores torch's result)."""

    def __init__(self):
        self._fns: dict = {}
        self.builds = 0
        self.disabled: str | None = None
        if not hasattr(torch.compiler, "set_stance"):
            self.disabled = "torch.compiler.set_stance is unavailable (torch too old)"

    @staticmethod
    def applicable(seg: Segment) -> bool:
        if not seg.params:
            return True
        dt = seg.params[0].dtype
        if dt not in DTYPES:
            return False
        strided = torch.strided
        for p, g in zip(seg.params, seg.grads):  # (runs every step: dtypes and layouts are singletons)
            if (not (p.is_cpu and g.is_cpu) or p.dtype is not dt or g.dtype is not dt or g.layout is not strided
                    or g.shape != p.shape):
                return False
        if seg.momentum != 0:
            for b, p in zip(seg.bufs, seg.params):
                if b is None or b.dtype is not dt or b.shape != p.shape:
                    return False  # first step: torch creates the buffers
        return True

    @staticmethod
    def distinct(segments: list) -> bool:
        """No tensor object is passed twice (two parameters sharing one .grad, a gradient that is
        a momentum buffer, …): the graph updates tensors one by one, torch list by list, so shared
        tensors would not give torch's result. Views of one buffer are fine (disjoint memory)."""
        ids = [id(t) for s in segments for lst in (s.params, s.grads, s.bufs) for t in lst]
        return len(ids) == len(set(ids))

    def _disable(self, why: str) -> None:
        self.disabled = why
        warnings.warn(f"consopt: the compiled CPU update is off ({why}); using torch's update", RuntimeWarning,
                      stacklevel=4)

    def __call__(self, segments: list) -> bool:
        """Apply the update of every segment (True), or change nothing (False: take torch's
        path). A graph whose first result differs from torch's is undone (and the compiled
        update disabled) before returning False."""
        if self.disabled is not None:
            return False
        segments = [s for s in segments if s.params]
        if not segments:
            return False
        dtype = segments[0].params[0].dtype
        if any(s.params[0].dtype != dtype for s in segments):
            return False  # one dtype per graph: the hyperparameters are rounded to it
        flags = tuple(s.flags for s in segments)
        key = (flags, dtype)
        tensors = [(s.params, s.grads, s.bufs) for s in segments]
        hypers = [s.hyper_tensors(dtype) for s in segments]
        # every graph built for these flags (one per layout: e.g. two param groups stepped in
        # turn), most recently used first; a graph whose guards fail raises before running
        fns = self._fns.setdefault(key, [])
        for i, fn in enumerate(fns):
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    fn(tensors, hypers)
            except Exception:  # noqa: BLE001 - its guards failed (another layout): try the next
                continue
            fns.insert(0, fns.pop(i))
            return True
        if self.builds >= _MAX_BUILDS:
            self._disable(f"{_MAX_BUILDS} graphs built: the parameters' layout keeps changing")
            return False
        self.builds += 1
        return self._first_call(key, flags, segments, tensors, hypers)

    def _first_call(self, key, flags, segments, tensors, hypers) -> bool:
        before = snapshot(segments)
        try:
            fn = update_graph(flags)
            with torch.compiler.set_stance("default"):
                fn(tensors, hypers)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, unsupported op, …: restore, use torch
            restore(tensors, before)
            self._disable(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}")
            return False
        if not matches_torch(segments, before):  # back to the state before the step; torch's update follows
            restore(tensors, before)
            self._disable("its result differs from torch's in the last bit on this machine")
            return False
        self._fns[key].insert(0, fn)
        return True


def snapshot(segments: list) -> list:
    """Copies of every segment's (params, grads, buffers), for `matches_torch` and `restore`."""
    return [tuple([t.detach().clone() for t in lst] for lst in (s.params, s.grads, s.bufs)) for s in segments]


def matches_torch(segments: list, before: list) -> bool:
    """Whether the segments' live tensors are, bit for bit, torch's update (`torch.optim.sgd.sgd`)
    applied to copies of `before` (their `snapshot` before the step)."""
    for s, seg in zip(segments, before):
        pc, gc, bc = ([t.clone() for t in lst] for lst in seg)
        _torch_sgd(pc, gc, bc, weight_decay=s.weight_decay, momentum=s.momentum, lr=s.lr, dampening=s.dampening,
                   nesterov=s.nesterov, maximize=s.maximize, foreach=s.foreach, fused=False)
        if not all(_bits_equal(a, b) for a, b in zip(s.params + s.grads + s.bufs, pc + gc + bc)):
            return False
    return True


def restore(tensors: list, saved: list) -> None:
    """Put the saved copies back into the live tensors ([(params, grads, bufs)] each); tensors
    already equal are not written (an expanded gradient cannot be)."""
    for live, old in zip(tensors, saved):
        for xs, ys in zip(live, old):
            for x, y in zip(xs, ys):
                if not _bits_equal(x, y):
                    x.copy_(y)
