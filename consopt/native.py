"""The native CPU step (tracking_backend="native"): torch's SGD update and the float64 law
statistics in one pass over every parameter.

`consopt/csrc/sgd_stats.cpp` is the CPU counterpart of the fused Triton step: each element
reads p, g, m once, gets torch's update with torch's roundings (every ``add(x, alpha=a)`` of
torch's CPU kernels is a fused multiply-add; ``buf * momentum`` rounds on its own)

    d ← −g if maximize else g;   d ← fma(p, λ, d)                       (weight decay)
    m ← fma(d, 1 − dampening, m · μ);  d ← fma(m, μ, d) if nesterov else m
    p ← fma(d, −lr, p)

and, for every law parameter viewed as [R, C] (R = shape[0]), adds x = float64(p_new) into the
per-row sums Σx, Σx² and into per-block column sums, which a second phase adds up in block order
(no atomics: the result does not depend on the thread count), and forms the Gram matrices of the
aligned unit groups that matrix families read (an attention head's rows, an out_proj's columns)
from the block it just wrote, into the evaluator's arena. `LawEvaluator.values_from_stats` then
forms every family from these, so h(θ_t) costs no second pass over the parameters.

Param groups it cannot take (float16/bfloat16, non-contiguous tensors, views that overlap, the
first step with momentum, fused or differentiable groups, a tensor lr that needs grad, sparse
gradients) take torch's update instead, before the statistics are read; a step whose torch-only
groups share memory with the others takes torch's update for every group, in torch's order.

The library is compiled on first use with the system's C++ compiler (``$CXX`` or c++/g++/clang++,
OpenMP, ``-march=native``; 5–9 s), cached under ``$CONSOPT_CACHE_DIR``, else
``$XDG_CACHE_HOME/consopt`` or ``~/.cache/consopt``, else a private (0700) directory in the
temporary directory. The first call for every layout also runs torch's own update on copies and
compares the bits: a mismatch (another compiler or CPU) puts back the state before the step, torch's
update is applied instead, and the optimizer uses torch's update from then on, with a warning.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["NativeUnavailable", "available", "load", "Layout", "NativeStep", "NativeStats", "SOURCE", "ScaleApply"]

SOURCE = Path(__file__).with_name("csrc") / "sgd_stats.cpp"
# -ffp-contract=fast turns the statistics' a += x·y into FMAs; the update itself is written with
# explicit fma calls and plain products that feed them, which contraction leaves alone (and the
# first call of every layout checks it bit for bit against torch).
CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17",
            "-shared", "-fPIC")
DTYPES = {torch.float32: 0, torch.float64: 1}
# kernel flags (sgd_stats.cpp `dispatch`)
MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV, WRITES_GRAD, STATS_ONLY = 1, 2, 4, 8, 16, 32
_STATS_ITEM = 8192  # elements per work item of a tensor with statistics (at least 32 rows)
_FLAT_ITEM = 32768  # elements per work item of a tensor without
_MAX_LAYOUTS = 16  # checked layouts kept per optimizer (oldest dropped; it is checked again if it returns)


def rows_per_block(shape, row_group: int = 0) -> int:
    """Rows per work item of a tensor with statistics (whole groups of `row_group` rows)."""
    c = 1
    for x in tuple(shape)[1:]:
        c *= x
    br = max(32, _STATS_ITEM // max(c, 1))
    return -(-br // row_group) * row_group if row_group else br


def stage_elements(shape, axis: int, units: int) -> int:
    """Float64 scratch one thread needs to form Grams of `units` rows (axis 0) or columns (axis 1)."""
    shape = tuple(shape)
    r = shape[0] if shape else 1
    c = 1
    for x in shape[1:]:
        c *= x
    return min(rows_per_block(shape, units if axis == 0 else 0), r) * c


class NativeUnavailable(RuntimeError):
    """The native library cannot be built or loaded here (the reason is the message)."""


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def _compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    for c in ("c++", "g++", "clang++"):
        found = shutil.which(c)
        if found:
            return found
    return None


def available() -> bool:
    """Whether the native step can be tried here: built already, or a C++ compiler is found (a
    failing build then warns once and the optimizer falls back to the eager backend)."""
    return _lib is not None or (_error is None and _compiler() is not None)


def cache_dir() -> Path:
    d = os.environ.get("CONSOPT_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "consopt"


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's feature flags where the OS lists them (a cache
    directory shared between machines must not hand one CPU's build to another)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str) -> Path:
    src = SOURCE.read_bytes()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"C++ compiler {cxx!r} does not run: {e}") from e
    key = hashlib.sha256(b"\0".join([src, " ".join(CXXFLAGS).encode(), cxx.encode(), version.encode(),
                                     platform.machine().encode(), _cpu_id().encode()])).hexdigest()[:20]
    name = f"sgd_stats-{key}.so"
    tried = []
    for d, private in ((cache_dir(), False), (Path(tempfile.gettempdir()) / f"consopt-{_uid()}", True)):
        tried.append(str(d))
        out = d / name
        try:  # a cache directory we cannot write: the next candidate
            if private:  # a shared temporary directory: ours alone, or not at all
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                st = d.stat()
                if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o077:
                    continue
            if out.exists():
                return out
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            break
        except OSError:
            continue
    else:
        raise NativeUnavailable(f"no writable private directory for the native library (tried {', '.join(tried)})")
    os.close(fd)
    try:
        try:
            r = subprocess.run([cxx, *CXXFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600)
        except subprocess.SubprocessError as e:  # a compiler that hangs
            raise NativeUnavailable(f"compiling {SOURCE.name} with {cxx} failed: {e}") from e
        if r.returncode != 0:
            raise NativeUnavailable(f"compiling {SOURCE.name} with {cxx} failed: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: concurrent builders leave one complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load() -> ctypes.CDLL:
    """The compiled library (built on first use); NativeUnavailable says why not."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise NativeUnavailable(_error)
        try:
            cxx = _compiler()
            if cxx is None:
                raise NativeUnavailable("no C++ compiler found (set $CXX, or install g++ or clang++)")
            lib = ctypes.CDLL(str(_build(cxx)))
        except NativeUnavailable as e:
            _error = str(e)
            raise
        except OSError as e:
            _error = f"loading the native library failed: {e}"
            raise NativeUnavailable(_error) from e
        fn = lib.consopt_sgd_stats
        P, I64, D, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
        fn.argtypes = [I, I, I64] + [P] * 12 + [I64] + [P] * 4 + [P] * 8 + [I64, P, D, D, D, D, I]
        fn.restype = I
        fn = lib.consopt_scale_apply
        fn.argtypes = [I, I64, P, P, P, P, P, P, I]
        fn.restype = I
        _lib = lib
        return lib


def _i64(values) -> Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def can_scale(t: Tensor) -> bool:
    """Whether `ScaleApply` takes tensor t (CPU, contiguous, float32/float64)."""
    return t.device.type == "cpu" and t.dtype in DTYPES and t.is_contiguous()


class ScaleApply:
    """The diagonal symmetry action of the projection on a fixed list of tensors, in place:
    every element of a tensor (and of its momentum buffer) becomes float64(x) · fa[i] · fb[j]
    rounded once to its dtype (the Triton apply kernel's arithmetic), i / j its index along the
    tensor's first / second factor axis. `specs[t]` = (shape, [(axis, offset of its factors in
    F)] for at most two axes, ascending); `run(ps, ms, F)` with F a contiguous float64 CPU
    vector, `ps` the tensors (one dtype, `can_scale`), `ms` their momentum buffers or None."""

    def __init__(self, specs):
        fa, fb, dims = [], [], []
        for shape, slots in specs:
            shape = tuple(shape)
            slots = list(slots)
            if len(slots) == 2:
                (a, oa), (b, ob) = slots
                fa.append(oa)
                fb.append(ob)
                dims += [math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:b]), shape[b], math.prod(shape[b + 1:])]
            elif slots and slots[0][0] == 0:  # rows: the a-slot
                fa.append(slots[0][1])
                fb.append(-1)
                dims += [1, shape[0], 1, 1, math.prod(shape[1:])]
            elif slots:  # an inner axis: the b-slot (no division per element)
                a, o = slots[0]
                fa.append(-1)
                fb.append(o)
                dims += [1, 1, math.prod(shape[:a]), shape[a], math.prod(shape[a + 1:])]
            else:
                fa.append(-1)
                fb.append(-1)
                dims += [1, 1, 1, 1, math.prod(shape)]
        self.n = len(fa)
        self.shapes = [tuple(shape) for shape, _ in specs]
        self._fa, self._fb, self._dims = _i64(fa), _i64(fb), _i64(dims)
        self._f_need = max([o + shape[a] for shape, slots in specs for a, o in slots] or [0])  # entries of F read

    def run(self, ps, ms, F: Tensor) -> None:
        if self.n == 0:
            return
        if F.dtype != torch.float64 or not F.is_contiguous() or F.device.type != "cpu" or F.numel() < self._f_need:
            raise ValueError("ScaleApply: F must be a contiguous float64 CPU tensor holding every factor slot")
        if len(ps) != self.n or len(ms) != self.n:
            raise ValueError(f"ScaleApply: planned for {self.n} tensors, got {len(ps)} (momentum: {len(ms)})")
        dtype = ps[0].dtype
        for p, m, shape in zip(ps, ms, self.shapes):  # the kernel writes through raw pointers: check all
            if (tuple(p.shape) != shape or p.dtype != dtype or not can_scale(p)
                    or (m is not None and (m.shape != p.shape or m.dtype != dtype or not can_scale(m)))):
                raise ValueError(f"ScaleApply: a tensor of shape {tuple(p.shape)} ({p.dtype}) does not match the "
                                 f"planned {shape} or is not a contiguous {dtype} CPU tensor (momentum likewise)")
        P = torch.tensor([p.data_ptr() for p in ps], dtype=torch.int64)
        M = torch.tensor([0 if m is None else m.data_ptr() for m in ms], dtype=torch.int64)
        rc = load().consopt_scale_apply(DTYPES[dtype], self.n, P.data_ptr(), M.data_ptr(), F.data_ptr(),
                                        self._fa.data_ptr(), self._fb.data_ptr(), self._dims.data_ptr(),
                                        torch.get_num_threads())
        if rc != 0:
            raise NativeUnavailable(f"consopt_scale_apply returned {rc}")
        torch.autograd.graph.increment_version([t for t in list(ps) + list(ms) if t is not None])


class Layout:
    """Work items and float64 statistics buffers for one list of tensors.

    `shapes[i]` is tensor i's shape; `stats[i]` whether its statistics are wanted. A tensor
    with statistics is viewed as [R, C] (R = shape[0], or 1 for a 0-dim tensor) and split into
    blocks of whole rows; after a call, `rows[i]` = (Σ_c x, Σ_c x²) per row and `cols[i]` =
    (Σ_r x, Σ_r x²) per column, x = the tensor's (updated) values in float64 (the plain sums Σx
    only where `sums[i]`, default all; the others stay 0).

    `row_gram[i]` = U (a divisor of R) also forms the Gram matrix of every U consecutive rows,
    into `row_grams[i]` [R/U, U, U]; or = (U, out, offsets): group g's [U, U] goes to the float64
    tensor `out` at element offsets[g] (int64; skipped where < 0). `col_gram[i]` likewise for
    every U consecutive columns (U a divisor of C). A tensor without statistics is processed as
    a flat range."""

    def __init__(self, shapes: list, stats: list, row_gram: list | None = None, col_gram: list | None = None,
                 sums: list | None = None):
        self.shapes = [tuple(s) for s in shapes]
        self.stats = list(stats)
        n_t = len(shapes)
        sums = [1 if x else 0 for x in sums] if sums is not None else [1] * n_t
        row_gram = list(row_gram) if row_gram is not None else [0] * n_t
        col_gram = list(col_gram) if col_gram is not None else [0] * n_t
        Cs, offs, nbs, goffs, cost = [], [], [], [], [0]
        it_t, it_r0, it_r1, it_b = [], [], [], []
        self.rows, self.cols, self.row_grams, self.col_grams = [], [], [], []
        rs_p, rq_p, cs_p, cq_p, rg_p, cg_p, rgo_p, cgo_p = [], [], [], [], [], [], [], []
        keep = []  # gram outputs and offset tables the kernel writes through
        partial = gpartial = stage_max = 0
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        for t, (shape, want) in enumerate(zip(self.shapes, self.stats)):
            n = 1
            for s in shape:
                n *= s
            ru_spec, cu_spec = (row_gram[t], col_gram[t]) if want else (0, 0)
            ru = ru_spec[0] if isinstance(ru_spec, tuple) else int(ru_spec or 0)
            cu = cu_spec[0] if isinstance(cu_spec, tuple) else int(cu_spec or 0)
            if want:
                R = shape[0] if len(shape) else 1
                C = 1
                for s in shape[1:]:
                    C *= s
                if ru and R % ru:
                    raise ValueError(f"row Gram groups of {ru} do not tile {R} rows")
                br = rows_per_block(shape, ru)  # whole groups of rows per block
                if cu and C % cu:
                    raise ValueError(f"column Gram groups of {cu} do not tile {C} columns")
            else:
                R, C = n, 1
                br = _FLAT_ITEM
            nb = (R + br - 1) // br if n else 0
            live = want and nb > 0  # an empty tensor: its (zero) statistics are never written
            rows = (zeros(R), zeros(R)) if want else None
            cols = (zeros(C), zeros(C)) if want else None
            rgram, rg_out, rg_off = self._gram_out(ru_spec, R)
            cgram, cg_out, cg_off = self._gram_out(cu_spec, C)
            self.rows.append(rows)
            self.cols.append(cols)
            self.row_grams.append(rgram)
            self.col_grams.append(cgram)
            keep += [rg_out, rg_off, cg_out, cg_off]
            rs_p.append(rows[0].data_ptr() if live else 0)
            rq_p.append(rows[1].data_ptr() if live else 0)
            cs_p.append(cols[0].data_ptr() if live else 0)
            cq_p.append(cols[1].data_ptr() if live else 0)
            live_ru, live_cu = (ru, cu) if live else (0, 0)
            rg_p.append(rg_out.data_ptr() if live_ru else 0)
            cg_p.append(cg_out.data_ptr() if live_cu else 0)
            rgo_p.append(rg_off.data_ptr() if live_ru else 0)
            cgo_p.append(cg_off.data_ptr() if live_cu else 0)
            row_gram[t], col_gram[t] = live_ru, live_cu
            Cs.append(C)
            offs.append(partial)
            goffs.append(gpartial)
            nbs.append(nb)
            if live:
                partial += nb * 2 * C
                gpartial += nb * C * live_cu
                if live_ru or live_cu:
                    stage_max = max(stage_max, min(br, R) * C)
            # estimated cost per element, for splitting the items between threads: the update
            # (2), the statistics (+1), a Gram's U/2 or U multiply-adds per element (+U/8, +U/4)
            per_elem = 2 + (1 if live else 0) + live_ru // 8 + live_cu // 4
            for b in range(nb):
                it_t.append(t)
                it_r0.append(b * br)
                it_r1.append(min(R, (b + 1) * br))
                it_b.append(b)
                cost.append(cost[-1] + max(1, (it_r1[-1] - it_r0[-1]) * C * per_elem))
        self.n_items = len(it_t)
        self.n_tensors = n_t
        self.stage_max = stage_max
        self._partial = torch.empty(max(partial, 1), dtype=torch.float64)
        self._gpartial = torch.empty(max(gpartial, 1), dtype=torch.float64)
        self._tables = [_i64(Cs), _i64(rs_p), _i64(rq_p), _i64(cs_p), _i64(cq_p), _i64(sums), self._partial,
                        _i64(offs), _i64(nbs), _i64(it_t), _i64(it_r0), _i64(it_r1), _i64(it_b),
                        _i64(row_gram), _i64(rg_p), _i64(rgo_p), _i64(col_gram), _i64(cg_p), _i64(cgo_p),
                        self._gpartial, _i64(goffs), _i64(cost)]
        self._keep = keep
        self._ptrs = [x.data_ptr() for x in self._tables]

    @staticmethod
    def _gram_out(spec, n: int):
        """(own buffer or None, output tensor, offsets) for a Gram request `spec` over n rows/cols."""
        if not spec:
            return None, None, None
        if isinstance(spec, tuple):
            u, out, offsets = spec
            offsets = offsets.to(torch.int64).contiguous()
            if offsets.numel() != n // u or out.dtype != torch.float64 or not out.is_contiguous():
                raise ValueError("Gram output: float64 contiguous tensor and one offset per group expected")
            if offsets.numel() and int(offsets.max()) + u * u > out.numel():
                raise ValueError("Gram output offsets run past the output tensor")
            return None, out, offsets
        u = int(spec)
        own = torch.zeros(n // u, u, u, dtype=torch.float64)
        return own, own, torch.arange(n // u, dtype=torch.int64) * (u * u)

    def run(self, dtype: torch.dtype, flags: int, params: list, grads: list | None, bufs: list | None,
            neg_lr: float = 0.0, mu: float = 0.0, damp1: float = 1.0, lam: float = 0.0) -> None:
        """One kernel call over `params` (contiguous, `dtype`, this layout's shapes): the update
        (unless flags has STATS_ONLY) and the statistics. Bumps autograd's version counters of
        what it wrote."""
        lib = load()
        n = len(params)  # the data pointers of params | grads | bufs (params where none), one array
        table = array.array("q", [t.data_ptr() for ts in (params, grads or params, bufs or params) for t in ts])
        P = table.buffer_info()[0]
        G, M = P + 8 * n, P + 16 * n
        (c, rs, rq, cs, cq, sums, part, offs, nbs, it_t, it_r0, it_r1, it_b, rgu, rg, rgo, cgu, cg, cgo, gpart,
         goffs, cost) = self._ptrs
        rc = lib.consopt_sgd_stats(DTYPES[dtype], flags, self.n_tensors, P, G, M,
                                   c, rs, rq, cs, cq, sums, part, offs, nbs, self.n_items, it_t, it_r0, it_r1, it_b,
                                   rgu, rg, rgo, cgu, cg, cgo, gpart, goffs, self.stage_max, cost,
                                   neg_lr, mu, damp1, lam, torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"consopt native kernel: unsupported flags {flags} / dtype {dtype} (code {rc})")
        if not flags & STATS_ONLY:
            written = list(params) + (list(bufs) if flags & MOMENTUM else [])
            if flags & WRITES_GRAD:
                written += list(grads)
            torch.autograd.graph.increment_version(written)


def kernel_flags(seg) -> int:
    """The kernel flags of a `consopt.compiled_update.Segment`."""
    _, mom, nest, maximize, wd, writes_grad = seg.flags
    return ((MAXIMIZE if maximize else 0) | (WEIGHT_DECAY if wd else 0) | (MOMENTUM if mom else 0)
            | (NESTEROV if nest else 0) | (WRITES_GRAD if writes_grad else 0))


def _contiguous(ts) -> bool:
    for t in ts:
        if not t.is_contiguous():
            return False
    return True


def _span(t: Tensor) -> tuple:
    """[first byte, last byte + 1) that a tensor's elements can touch (any strides)."""
    last = sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlapping(ts, others=None) -> bool:
    """Whether two of the tensors share memory (views of one buffer that overlap); with `others`,
    whether one of `ts` overlaps one of `others`."""
    if others is None:
        spans = sorted(_span(t) for t in ts if t.numel())
        return any(b0 < a1 for (_, a1), (b0, _) in zip(spans, spans[1:]))
    tagged = sorted([(*_span(t), 0) for t in ts if t.numel()] + [(*_span(t), 1) for t in others if t.numel()])
    end = {0: -1, 1: -1}  # furthest end seen per side
    for a0, a1, side in tagged:
        if a0 < end[1 - side]:
            return True
        end[side] = max(end[side], a1)
    return False


class NativeStats:
    """The statistics of a fixed set of law tensors. `needs` = {name: (its `_StatsSpec` or None,
    U of its row Grams, U of its column Grams)} (`LawEvaluator.native_needs`); `stats` turns the
    layouts' buffers into the evaluator's {(name, op, axis): float64 tensor}."""

    def __init__(self, needs: dict):
        self.needs = needs
        self._stats_only: dict = {}  # key -> Layout for law tensors no update touches
        self._views: dict = {}  # layouts used -> (views of their buffers, sums still to form)

    def stats(self, tensors: dict, where: dict) -> dict:
        """{(name, op, axis): float64 tensor} from the layouts in `where` after their kernel call:
        views of the layouts' buffers (valid until their next call), and the sums over the other
        dims of a parameter with more than two (a conv weight's input channels)."""
        from .functional import _axis_from_cols

        key = tuple(map(where.__getitem__, self.needs))  # ((layout, index) per law tensor: by identity)
        cached = self._views.get(key)
        if cached is None:
            if len(self._views) >= 4 * _MAX_LAYOUTS:
                self.forget()
            views, derived = {}, []
            for name, (spec, ru, cu) in self.needs.items():
                layout, i = where[name]
                if spec is not None:
                    (rs, rq), (cs, cq) = layout.rows[i], layout.cols[i]
                    rest = tuple(tensors[name].shape[1:])
                    for op, a in spec.keys():
                        if op == "rest_sum":
                            views[(name, op, a)] = cs
                        elif a == 0:
                            views[(name, op, a)] = rs if op == "sum" else rq
                        elif len(rest) == 1:
                            views[(name, op, a)] = cs if op == "sum" else cq
                        else:
                            derived.append(((name, op, a), cs if op == "sum" else cq, rest))
                if ru:  # written into the evaluator's arena (or the layout's own buffer)
                    views[(name, "gram", 0)] = layout.row_grams[i]
                if cu:
                    views[(name, "gram", 1)] = layout.col_grams[i]
            cached = self._views[key] = (views, derived, [where[n][0] for n in self.needs])  # (keeps layouts alive)
        views, derived, _ = cached
        out = dict(views)
        for k, c, rest in derived:
            out[k] = _axis_from_cols(c, rest, k[2])
        return out

    def forget(self) -> None:
        """Drop the cached views (they keep their layouts alive)."""
        self._views.clear()

    def layout(self, cache: dict, key, shapes: list, names: list) -> Layout:
        """The cached layout for tensors of `shapes` (`names[i]`: the law parameter tensor i
        is, or None)."""
        layout = cache.get(key)
        if layout is None:
            need = [self.needs.get(n) if n is not None else None for n in names]
            layout = Layout(shapes, [x is not None for x in need], [x[1] if x else 0 for x in need],
                            [x[2] if x else 0 for x in need],
                            [bool(x and x[0] is not None and (x[0].sum or x[0].rest_sum)) for x in need])
        return layout

    def collect_rest(self, tensors: dict, where: dict) -> bool:
        """Statistics-only calls for the law tensors not in `where` (one per dtype); False if
        one cannot run natively (not a contiguous float32/float64 CPU tensor)."""
        rest = [n for n in self.needs if n not in where]
        if not rest:
            return True
        by_dtype: dict = {}
        for n in rest:
            t = tensors[n]
            if t.device.type != "cpu" or t.dtype not in DTYPES or not t.is_contiguous():
                return False
            by_dtype.setdefault(t.dtype, []).append(n)
        for dtype, names in by_dtype.items():
            ts = [tensors[n].detach() for n in names]
            key = (dtype, tuple(names), tuple(t.shape for t in ts))
            if key not in self._stats_only and len(self._stats_only) >= _MAX_LAYOUTS:
                self._stats_only.clear()  # e.g. the set of params without grads keeps changing
                self.forget()
            layout = self._stats_only[key] = self.layout(self._stats_only, key, [t.shape for t in ts], names)
            layout.run(dtype, STATS_ONLY, ts, None, None)
            for i, n in enumerate(names):
                where[n] = (layout, i)
        return True


class NativeStep:
    """The native update of one optimizer: per layout (the segments' parameters and which of
    them carry law statistics) a `Layout`, checked bit for bit against torch's update at its
    first call. `disabled` holds the reason once torch's update must be used instead."""

    def __init__(self, needs: dict, law_tensors: dict):
        self._stats = NativeStats(needs)
        self._law_ids = {id(p): n for n, p in law_tensors.items() if n in needs}
        self._layouts: dict = {}
        self.disabled: str | None = None

    @property
    def needs(self) -> dict:
        return self._stats.needs

    @staticmethod
    def accepts(seg) -> bool:
        """Whether the kernel can take this segment: one float32/float64 dtype, contiguous params,
        grads and buffers."""
        dt = seg.params[0].dtype
        if dt not in DTYPES:
            return False
        for p in seg.params:  # (runs every step: plain loops)
            if p.dtype is not dt or not p.is_contiguous():
                return False
        return _contiguous(seg.grads) and _contiguous(seg.bufs)

    def _disable(self, why: str) -> None:
        import warnings

        self.disabled = why
        warnings.warn(f"consopt: the native CPU step is off ({why}); using torch's update", RuntimeWarning,
                      stacklevel=4)

    def update(self, segments: list) -> tuple:
        """Apply the update of the segments it takes; returns (where, taken): `where` maps each
        law parameter it updated to (layout, index), or is None if it changed nothing (off, or
        its first call was undone); taken[i] says whether segments[i] was updated (the others,
        e.g. of parameters that overlap in memory, are left to torch's update). Every segment
        must have passed `accepts`."""
        taken = [False] * len(segments)
        if self.disabled is not None:
            return None, taken
        try:
            load()
        except NativeUnavailable as e:
            self._disable(str(e))
            return None, taken
        work, where = [], {}
        for j, s in enumerate(segments):
            if not s.params:
                continue
            ids = tuple(map(id, s.params))
            names = tuple(map(self._law_ids.get, ids))
            key = (ids, tuple(p.shape for p in s.params), names, s.params[0].dtype, kernel_flags(s))
            first = key not in self._layouts
            if first and _overlapping(s.params + s.grads + s.bufs):
                continue  # views sharing memory: torch's list-by-list update
            layout = self._stats.layout(self._layouts, key, key[1], names)
            work.append((s, layout, first, key))
            taken[j] = True
            for i, n in enumerate(names):
                if n is not None:
                    where[n] = (layout, i)
        if not work:
            return where, taken
        if any(first for *_, first, _ in work):
            if _overlapping([t for s, *_ in work for lst in (s.params, s.grads, s.bufs) for t in lst]):
                return None, [False] * len(segments)  # memory shared across groups
            if not self._first_call(work):
                return None, [False] * len(segments)
        else:
            for s, layout, _, _ in work:
                self._run(s, layout)
        return where, taken

    @staticmethod
    def _run(s, layout: Layout) -> None:
        layout.run(s.params[0].dtype, kernel_flags(s), s.params, s.grads, s.bufs, -s.lr, s.momentum,
                   1 - s.dampening, s.weight_decay)

    def collect(self, law_tensors: dict, where: dict) -> dict:
        """The law statistics after `update` (and torch's update of the segments it did not take):
        the kernel's, and a statistics-only pass over the law parameters it did not update. {}
        if one of those cannot be read natively (the caller evaluates the laws itself)."""
        if not self._stats.collect_rest(law_tensors, where):
            return {}
        return self._stats.stats(law_tensors, where)

    def _first_call(self, work: list) -> bool:
        from .compiled_update import matches_torch, restore, snapshot

        segments = [s for s, *_ in work]
        before = snapshot(segments)
        for s, layout, _, _ in work:
            self._run(s, layout)
        if not matches_torch(segments, before):  # back to the state before the step; torch's update follows
            restore([(s.params, s.grads, s.bufs) for s in segments], before)
            self._disable("its result differs from torch's in the last bit on this machine")
            return False
        limit = max(_MAX_LAYOUTS, 4 * len(work))  # (one layout per param group and step signature)
        for s, layout, _, key in work:
            if len(self._layouts) >= limit:  # e.g. the set of params with grads keeps changing
                self._layouts.pop(next(iter(self._layouts)))
                self._stats.forget()
            self._layouts[key] = layout
        return True
