"""Flat parameter storage and the fused SGD step with conservation-law statistics (SPEC §6, §7).

Three pieces, used by `consopt.SGD` (the optimizer keeps torch's API; this module is functional):

``FlatGroup(params)``
    Moves a parameter group into contiguous flat buffers, one per dtype (params, grads and,
    lazily, momentum), makes every parameter a view into its buffer (``p.data = flat[o:o+n]
    .view_as(p)``) and turns existing grads into views of the grad buffer (a parameter without
    a grad keeps ``grad = None``). Before each step ``prepare()`` checks, with
    one ``data_ptr`` comparison per tensor, that the views still hold: after ``model.to(...)``
    or any ``.data`` replacement it rebuilds (values and momentum are carried over). Grads
    need not be views: after ``zero_grad(set_to_none=True)`` + backward (autograd's fresh
    tensors), under DDP (bucket views) or when assigned by the user, a contiguous grad of the
    parameter's dtype is read in place through a per-segment element offset from the grad
    buffer (an integer table, no copy, no pointer table); any other grad (another dtype,
    non-contiguous) is gathered with one copy (and re-attached as a view unless
    ``reattach_grads=False``). A parameter whose grad is ``None`` is skipped, exactly as torch
    skips it; none is ever skipped silently.

``compile_laws(lawset, params_by_name, groups)``
    Turns a `LawSet` into integer tables: a tile table per (buffer, kernel variant) whose
    tiles follow the law's row/column blocks, scratch slots for every partial statistic, and
    a CSR matrix that maps scratch slots to the entries of ``LawSet.evaluate``'s dict.

``fused_sgd_step(group, lr, momentum, dampening, weight_decay, nesterov, maximize, ...)``
    O(1) launches per group: one update+statistics launch per (dtype, kernel variant) present,
    one Gram launch per dtype for Gram blocks that do not fit one tile, one CSR reduction, and
    a few small torch ops for the rank-1 bias terms of matrix laws. Without laws: one launch
    per dtype.
    Returns the law values at the new parameters (float64, same keys as ``evaluate``).
``law_values_only(compiled)``
    The same statistics without an update (h(θ_0)).

Momentum-buffer existence is tracked per parameter on the device (``hasbuf``): torch's
``state['momentum_buffer'] is None`` ⇔ flag 0, and on a parameter's first step with a grad
the kernel sets ``buf = d_p``. ``FlatGroup.momentum_buffer(i)`` returns the view that torch's
``state['momentum_buffer']`` should hold (or None); ``set_momentum_buffer(i, t)`` loads one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .laws import Family, FamilyValues, LawSet

__all__ = ["FlatBuffer", "FlatGroup", "CompiledLaws", "compile_laws", "fused_sgd_step", "law_values_only", "TILE_TARGET"]

# Elements per tile the planner aims for (GPU). Tests lower it to force multi-tile paths.
TILE_TARGET = 32768
# Segment starts in the flat buffers are aligned to this many elements (64 B for fp32).
ALIGN = 16
# Row-Gram tiles split a row block's columns only beyond this width (each split adds a 64x64 partial).
GRAM_MIN_WIDTH = 4096


def _K():
    """The kernel module, imported lazily (keeps `import consopt` free of triton)."""
    from triton_kernels import sgd_stats

    return sgd_stats


# ---------------------------------------------------------------------------------------
# Segment geometry and tile planning
# ---------------------------------------------------------------------------------------

@dataclass
class _Seg:
    base: int  # element offset in its dtype buffer
    numel: int
    shape: tuple
    n0: int
    K: int  # numel // n0: row length of the [n0, K] view


def _geom(shape, base) -> _Seg:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape) if shape else 1
    n0 = shape[0] if shape else 1
    K = numel // n0 if n0 > 0 else 0
    return _Seg(base, numel, shape, n0, K)


def _cdiv(a, b):
    return -(-a // b)


def _upload(dst: torch.Tensor, arr: np.ndarray):
    """Host array -> existing device tensor without a host sync (pinned, non-blocking on CUDA)."""
    src = torch.from_numpy(np.ascontiguousarray(arr))
    if dst.is_cuda:
        dst.copy_(src.pin_memory(), non_blocking=True)
    else:
        dst.copy_(src)


def _partition(n, cap, bps=(), blocks=()):
    """Split [0, n) into pieces of length <= cap with a cut at every breakpoint in `bps`, keeping
    each block (a, b) inside one piece where possible. Returns (pieces, blocks that straddle)."""
    cuts = sorted({0, n} | {int(b) for b in bps if 0 < b < n})
    blocks = sorted({(int(a), int(b)) for a, b in blocks})
    pieces = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        cur = lo
        while cur < hi:
            end = min(cur + cap, hi)
            # pull the cut back to the start of the first block that would straddle it
            strad = [a for a, b in blocks if cur < a < end < b]
            if strad:
                end = min(strad)
            pieces.append((cur, end))
            cur = end
    starts = np.array([p[0] for p in pieces], dtype=np.int64)
    failed = []
    for a, b in blocks:
        k = int(np.searchsorted(starts, a, side="right")) - 1
        if k < 0 or not (pieces[k][0] <= a and b <= pieces[k][1]):
            failed.append((a, b))
    return pieces, failed


@dataclass
class _Need:
    rowsq: bool = False
    rowsum: bool = False
    colsq: bool = False
    colsum: bool = False
    row_bps: set = field(default_factory=set)
    gram_r: set = field(default_factory=set)  # (a, b) row blocks, units <= GRAM BX
    gram_c: set = field(default_factory=set)  # (a, b) axis-1 blocks, units <= GRAM_COL BY

    @property
    def any(self):
        return self.rowsq or self.rowsum or self.colsq or self.colsum or bool(self.gram_r) or bool(self.gram_c)


@dataclass
class _Tile:
    variant: tuple  # (BX, BY, vec, gram_r, gram_c, colacc, aligned)
    mode: str  # "vec" | "row" | "col"
    x0: int
    x1: int
    nrc: int
    cb: int
    cj: int
    cy: int
    nch: int
    ny: int
    cend: int
    cpitch: int
    k0: int = 0
    k1: int = 1
    o_rsq: int = -1
    o_rsum: int = -1
    o_csq: int = -1
    o_csum: int = -1
    o_gr: int = -1
    o_gc: int = -1
    blocks_r: tuple = ()
    blocks_c: tuple = ()


def _aligned(t: _Tile, g: _Seg) -> bool:
    """Whether the kernel may treat this tile's buffer accesses as groups of 4 contiguous,
    16-byte aligned elements sharing one mask (the `ALIGNED` hints of sgd_stats_kernel): every
    table value the hints name must be a multiple of 4 (elements, so 16 bytes for fp32)."""
    if t.mode == "vec":
        return g.base % 4 == 0 and t.x0 % 4 == 0 and t.x1 % 4 == 0
    if t.mode == "row" and t.cy == 1 and t.cj == t.variant[1]:
        return all(v % 4 == 0 for v in (g.base, g.K, t.cb, t.ny, t.cend, t.variant[1]))
    return False


def _plan_segment(g: _Seg, need: _Need | None, target: int):
    """Tiles of one segment. Returns (tiles, row blocks left for the Gram kernel, col blocks left);
    each tile's variant ends with its `_aligned` flag (aligned and unaligned tiles launch apart)."""
    tiles, big_r, big_c = _plan_tiles(g, need, target)
    for t in tiles:
        t.variant = t.variant + (_aligned(t, g),)
    return tiles, big_r, big_c


def _plan_tiles(g: _Seg, need: _Need | None, target: int):
    K_ = _K()
    need = need or _Need()
    tiles = []
    big_r, big_c = [], []
    if g.numel == 0:
        return tiles, big_r, big_c
    n0, K = g.n0, g.K
    if not need.any:  # update only: the segment as one contiguous vector
        n0, K = g.numel, 1
    if K == 1 and not need.gram_r and not need.gram_c:
        bx, by = K_.VEC
        chunk = bx * by
        cap = max(chunk, (target // chunk) * chunk)
        pieces, _ = _partition(n0, cap, need.row_bps)
        for a, b in pieces:
            tiles.append(_Tile((bx, by, True, False, False, False), "vec", a, b, _cdiv(b - a, chunk), 0, 0, 0, 1, 0,
                               1, 1, 0, 1))
        return tiles, big_r, big_c
    if need.gram_c:
        bx, by = K_.GRAM_COL
        n1 = g.shape[1]
        inner = K // n1
        pieces, failed = _partition(n1, by, (), need.gram_c)
        big_c.extend(failed)
        big_r.extend(sorted(need.gram_r))
        ok = [blk for blk in sorted(need.gram_c) if blk not in failed]
        for a0, a1 in pieces:
            inside = tuple(blk for blk in ok if a0 <= blk[0] and blk[1] <= a1)
            tiles.append(_Tile((bx, by, False, False, True, False), "col", 0, n0, _cdiv(n0, bx), a0 * inner, 1, inner, inner,
                               a1 - a0, K, (a1 - a0) * inner, a0 * inner, a1 * inner, blocks_c=inside))
        return tiles, big_r, big_c
    if need.gram_r:
        bx, by = K_.GRAM
        pieces, failed = _partition(n0, bx, need.row_bps, need.gram_r)
        big_r.extend(failed)
        ok = [blk for blk in sorted(need.gram_r) if blk not in failed]
        width = max(by, _cdiv(max(target // bx, GRAM_MIN_WIDTH), by) * by)
        ksplits = [(k, min(k + width, K)) for k in range(0, K, width)]
        for a, b in pieces:
            inside = tuple(blk for blk in ok if a <= blk[0] and blk[1] <= b)
            for k0, k1 in ksplits:
                tiles.append(_Tile((bx, by, False, True, False, False), "row", a, b, 1, k0, by, 1, _cdiv(k1 - k0, by), by, k1,
                                   k1 - k0, k0, k1, blocks_r=inside))
        return tiles, big_r, big_c
    bx, by = K_.WIDE
    if need.colsq or need.colsum:
        # tall one-column-chunk tiles (COLACC): column sums accumulate over all the tile's rows in
        # registers, so the scratch holds ≈ numel/rows_cap column partials and ≈ numel/BY row
        # partials instead of numel/BX column partials (one per 32-row chunk)
        rows_cap = max(bx, (target // by) // bx * bx)
        pieces, _ = _partition(n0, rows_cap, need.row_bps)
        for a, b in pieces:
            for k0 in range(0, K, by):
                k1 = min(k0 + by, K)
                tiles.append(_Tile((bx, by, False, False, False, True), "row", a, b, _cdiv(b - a, bx), k0, by, 1, 1,
                                   by, k1, k1 - k0, k0, k1))
        return tiles, big_r, big_c
    if K * bx >= target:
        width = max(by, (target // bx // by) * by)
        rows_cap = bx
    else:
        width = K
        rows_cap = bx * max(1, target // (bx * K))
    ksplits = [(k, min(k + width, K)) for k in range(0, K, width)]
    pieces, _ = _partition(n0, rows_cap, need.row_bps)
    for a, b in pieces:
        for k0, k1 in ksplits:
            tiles.append(_Tile((bx, by, False, False, False, False), "row", a, b, _cdiv(b - a, bx), k0, by, 1,
                               _cdiv(k1 - k0, by), by, k1, k1 - k0, k0, k1))
    return tiles, big_r, big_c


def _tile_rows(tiles: Sequence[_Tile], seg_index: int, g: _Seg):
    K_ = _K()
    rows = []
    for t in tiles:
        r = [0] * K_.NCOL
        r[K_.T_SEG] = seg_index
        r[K_.T_BASE] = g.base
        r[K_.T_K] = g.K
        r[K_.T_X0], r[K_.T_X1], r[K_.T_NRC] = t.x0, t.x1, t.nrc
        r[K_.T_CB], r[K_.T_CJ], r[K_.T_CY], r[K_.T_NCH], r[K_.T_NY], r[K_.T_CEND] = t.cb, t.cj, t.cy, t.nch, t.ny, t.cend
        r[K_.T_RSQ], r[K_.T_RSUM], r[K_.T_CSQ], r[K_.T_CSUM] = t.o_rsq, t.o_rsum, t.o_csq, t.o_csum
        r[K_.T_CPITCH], r[K_.T_GR], r[K_.T_GC] = t.cpitch, t.o_gr, t.o_gc
        rows.append(r)
    return rows


def _tables(rows_by_variant: dict, device) -> list:
    out = []
    for variant in sorted(rows_by_variant):
        rows = rows_by_variant[variant]
        if rows:
            out.append((variant, torch.tensor(rows, dtype=torch.int64, device=device)))
    return out


# ---------------------------------------------------------------------------------------
# FlatGroup
# ---------------------------------------------------------------------------------------

class MomentumTransport:
    """A diagonal action owed to a flat momentum buffer (lazy momentum transport, see
    `consopt.projection.FlatProjector`): the buffer's true value is

        m[e] · F[oA + sA·iA(e)] · F[oB + sB·iB(e)]

    per element e of each segment (`fseg` rows (oA, sA, postA, dimA, oB, sB, postB, dimB, on) as
    `triton_kernels.sgd_stats.launch_sgd_stats` reads them; F float64 with F[0] = 1, all ones
    when nothing is owed). The projector multiplies its factors into F; the next fused step
    applies F as it loads the buffer (`scale()`, then `clear()`), `flush` applies it in a
    pass of its own (for readers of the buffer: state_dict, a rebuild)."""

    def __init__(self, F: torch.Tensor, fseg: torch.Tensor, flush_table: torch.Tensor, seg_slots: list,
                 idx64: bool):
        self.F, self.fseg, self.table, self.seg_slots, self.idx64 = F, fseg, flush_table, seg_slots, idx64
        self.on = np.array([b > a for a, b in seg_slots] or [False])  # segments with factor slots
        self.dirty = False  # (host flag: some factor was multiplied in since the last application)
        self._needs = {}  # id(tile table) -> (the table, kept so the id stays its own; any tile with slots?)

    def scale(self, table: torch.Tensor | None = None):
        """(F, fseg) for the step kernel while something is owed (and, given a tile table, some
        tile of it has owed slots: the other tile variants launch without the factor loads), else
        None."""
        if not self.dirty:
            return None
        if table is not None:
            hit = self._needs.get(id(table))
            if hit is None:  # (once per table: its segment column on the host)
                hit = self._needs[id(table)] = (table, bool(self.on[table[:, 0].cpu().numpy()].any()))
            if not hit[1]:
                return None
        return self.F, self.fseg

    def clear(self) -> None:
        """The buffer now holds its true value: nothing is owed."""
        if self.dirty:
            self.F.fill_(1.0)
            self.dirty = False

    def flush(self, mom: torch.Tensor | None) -> None:
        """Apply what is owed to `mom` now (one `triton_kernels.project` launch)."""
        if self.dirty and mom is not None:
            from triton_kernels.project import launch_symmetry_apply

            launch_symmetry_apply(mom, None, self.F, self.table, idx64=self.idx64)
        self.clear()

    def reset_segment(self, k: int) -> None:
        """Segment k's buffer was replaced by a true value (load_state_dict, the user)."""
        a, b = self.seg_slots[k]
        if self.dirty and b > a:
            self.F[a:b].fill_(1.0)


class FlatBuffer:
    """One dtype's flat storage inside a FlatGroup: `param`, `grad`, `mom` (lazy) flat tensors,
    `segs` (host geometry; segment starts aligned to ALIGN elements), `seg_table` (device int64
    [n, 5]: offset, numel, n0, n1, inner), per-segment device flags `active` (grad present) and
    `hasbuf` (momentum buffer exists), and `goff` (grad offsets, see FlatGroup.prepare)."""

    def __init__(self, dtype, device, index, shapes):
        self.dtype = dtype
        self.device = device
        self.index = list(index)  # positions in FlatGroup.params
        self.segs = []
        off = 0
        for shp in shapes:
            off = _cdiv(off, ALIGN) * ALIGN
            g = _geom(shp, off)
            self.segs.append(g)
            off += g.numel
        self.numel = off
        self.param = torch.empty(off, dtype=dtype, device=device)
        self.grad = torch.zeros(off, dtype=dtype, device=device)
        self.mom = None
        n = len(self.index)
        self.active_host = np.zeros(n, dtype=bool)
        self.active = torch.zeros(n, dtype=torch.int32, device=device)
        self.hasbuf = torch.zeros(n, dtype=torch.int32, device=device)
        self.hb_sure = np.zeros(n, dtype=bool)  # flags known to be set
        # element offset of each segment's grad from self.grad (its own base while grads are our views)
        self.goff_host = np.array([g.base for g in self.segs], dtype=np.int64)
        self.goff = torch.from_numpy(self.goff_host.copy()).to(device)
        self.goff_aligned = bool((self.goff_host % 4 == 0).all())  # the kernel's GALIGNED hint
        # the segment table (offset, numel, n0, n1, inner) with [n0, n1, inner] the axis-1 view
        seg_rows = [[g.base, g.numel, g.n0, (g.shape[1] if len(g.shape) > 1 else 1),
                     (g.K // g.shape[1] if len(g.shape) > 1 and g.shape[1] else 1)] for g in self.segs]
        self.seg_table = torch.tensor(seg_rows, dtype=torch.int64).reshape(-1, 5).to(device)
        self.hb_all = n == 0
        self.transport: MomentumTransport | None = None  # owed to `mom` (a lazy projection's)
        self._plain = None
        self._const = {}

    def view(self, flat, k):
        g = self.segs[k]
        return flat[g.base:g.base + g.numel].view(g.shape)

    def ensure_mom(self):
        if self.mom is None:
            self.mom = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        return self.mom

    def const_flags(self, value):
        if value not in self._const:
            self._const[value] = torch.full((len(self.index),), int(value), dtype=torch.int32, device=self.device)
        return self._const[value]

    def plain_tables(self, target):
        if self._plain is None or self._plain[0] != target:
            rows = {}
            for k, g in enumerate(self.segs):
                tiles, _, _ = _plan_segment(g, None, target)
                for t, r in zip(tiles, _tile_rows(tiles, k, g)):
                    rows.setdefault(t.variant, []).append(r)
            self._plain = (target, _tables(rows, self.device))
        return self._plain[1]


class FlatGroup:
    """Contiguous flat storage for one parameter group (one device, any mix of float dtypes).

    params: the group's tensors (order kept; `index` arguments below refer to it).
    names: optional names used in error messages.
    reattach_grads: after gathering a grad that could not be read in place (other dtype,
        non-contiguous), make `p.grad` our view of it (so the next backward accumulates in place).
    """

    def __init__(self, params: Iterable[torch.Tensor], *, names: Sequence[str] | None = None,
                 reattach_grads: bool = True, tile_target: int | None = None):
        self.params = list(params)
        self.names = list(names) if names is not None else [f"param[{i}]" for i in range(len(self.params))]
        if len(self.names) != len(self.params):
            raise ValueError("names must match params one to one")
        seen = set()
        for p, n in zip(self.params, self.names):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{n}: expected a tensor, got {type(p).__name__}")
            if id(p) in seen:
                raise ValueError(f"{n}: a parameter appears twice in one group")
            seen.add(id(p))
        self.reattach_grads = reattach_grads
        self.tile_target = tile_target
        self.version = 0
        self.buffers: list[FlatBuffer] = []
        self._where = {}  # id(p) -> (buffer index, segment index)
        self._build()

    # -- construction ----------------------------------------------------------------------
    @property
    def target(self):
        return self.tile_target or TILE_TARGET

    @property
    def device(self):
        return self._device

    def _check_tensor(self, p, n):
        if not p.is_floating_point():
            what = "complex" if p.is_complex() else str(p.dtype)
            raise TypeError(f"{n}: consopt's fused SGD supports real floating-point parameters, not {what}")
        if p.is_sparse or p.layout != torch.strided:
            raise TypeError(f"{n}: sparse parameters are not supported")

    def _build(self):
        carry = self._carry() if self.buffers else None
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"a FlatGroup holds the tensors of one device, got {sorted(map(str, devices))}")
        self._device = devices.pop() if devices else torch.device("cpu")
        order = {}
        for i, (p, n) in enumerate(zip(self.params, self.names)):
            self._check_tensor(p, n)
            order.setdefault(p.dtype, []).append(i)
        self.buffers = []
        self._where = {}
        with torch.no_grad():
            for dtype, idx in order.items():
                b = FlatBuffer(dtype, self._device, idx, [self.params[i].shape for i in idx])
                for k, i in enumerate(idx):
                    p = self.params[i]
                    v = b.view(b.param, k)
                    v.copy_(p.detach())
                    p.data = v
                    gv = b.view(b.grad, k)
                    if p.grad is not None:
                        gv.copy_(p.grad.detach())
                        p.grad = gv
                    self._where[id(p)] = (len(self.buffers), k)
                self.buffers.append(b)
            if carry is not None:
                for i, p in enumerate(self.params):
                    m, hb = carry.get(id(p), (None, False))
                    if m is not None:
                        bi, k = self._where[id(p)]
                        b = self.buffers[bi]
                        b.view(b.ensure_mom(), k).copy_(m)
                        if hb:
                            b.hasbuf[k] = 1
                            b.hb_sure[k] = True
                for b in self.buffers:
                    b.hb_all = bool(b.hb_sure.all())
        self._pptrs = [p.data_ptr() for p in self.params]
        self._gsig = None
        self._gptrs = [None] * len(self.params)
        for bi, b in enumerate(self.buffers):
            for k, i in enumerate(b.index):
                self._gptrs[i] = b.view(b.grad, k).data_ptr()
        self.version += 1

    def sync_momentum(self) -> None:
        """Apply what a lazy projection owes the momentum buffers (`MomentumTransport.flush`)."""
        for b in self.buffers:
            if b.transport is not None:
                b.transport.flush(b.mom)

    def _carry(self):
        self.sync_momentum()  # the new buffers start with nothing owed
        out = {}
        for b in self.buffers:
            hb = b.hasbuf.cpu().numpy() if b.mom is not None else np.zeros(len(b.index), dtype=np.int32)
            for k, i in enumerate(b.index):
                m = b.view(b.mom, k).detach().clone() if b.mom is not None else None
                out[id(self.params[i])] = (m, bool(hb[k]))
        return out

    # -- per-step checks ---------------------------------------------------------------------
    def check_params(self) -> bool:
        """Rebuild if a parameter is no longer a view into our buffer. Returns True if rebuilt."""
        if [p.data_ptr() for p in self.params] != self._pptrs:
            self._build()
            return True
        return False

    def prepare(self):
        """Before a step: check parameter views, locate grads, refresh the active flags.

        A grad that is our view, or any contiguous grad of the parameter's dtype on the same device
        (autograd's fresh tensors after zero_grad(set_to_none=True), DDP bucket views), is read in
        place through a per-segment element offset (no copy). Others (another dtype, non-contiguous)
        are gathered into the grad buffer with one copy. Returns the number of gathered grads."""
        rebuilt = self.check_params()
        # fast path: the same grad storage as at the last prepare() (our views, or an allocator
        # that hands autograd the same blocks every step) -> flags and offsets are current
        try:
            sig = [0 if p.grad is None else p.grad.data_ptr() for p in self.params]
        except RuntimeError:  # a grad without storage (sparse): the full pass names it
            sig = None
        if not rebuilt and sig is not None and sig == self._gsig:
            return 0
        dst, src, idx = [], [], []
        for bi, b in enumerate(self.buffers):
            act = np.zeros(len(b.index), dtype=bool)
            goff = b.goff_host.copy()
            gbase = b.grad.data_ptr()
            isz = b.grad.element_size()
            for k, i in enumerate(b.index):
                p = self.params[i]
                g = p.grad
                if g is None:
                    continue
                act[k] = True
                if g.layout != torch.strided:
                    raise RuntimeError(f"{self.names[i]}: consopt's fused SGD does not support sparse gradients")
                ptr = g.data_ptr()
                if ptr == self._gptrs[i] and g.dtype == p.dtype and g.is_contiguous():
                    goff[k] = b.segs[k].base
                    continue
                if (g.dtype == p.dtype and g.device == p.device and g.layout == torch.strided
                        and g.shape == p.shape and g.is_contiguous() and (ptr - gbase) % isz == 0):
                    goff[k] = (ptr - gbase) // isz
                    continue
                goff[k] = b.segs[k].base
                n = self.names[i]
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{n}: consopt's fused SGD does not support sparse gradients")
                if g.is_complex():
                    raise RuntimeError(f"{n}: complex gradients are not supported")
                if g.shape != p.shape:
                    raise RuntimeError(f"{n}: gradient shape {tuple(g.shape)} does not match the parameter's "
                                       f"{tuple(p.shape)}")
                if g.device != p.device:
                    raise RuntimeError(f"{n}: gradient on {g.device}, parameter on {p.device}")
                dst.append(b.view(b.grad, k))
                src.append(g.detach())
                idx.append(i)
            if not np.array_equal(act, b.active_host):
                b.active_host = act
                _upload(b.active, act.astype(np.int32))
            if not np.array_equal(goff, b.goff_host):
                b.goff_host = goff
                b.goff_aligned = bool((goff % 4 == 0).all())
                _upload(b.goff, goff)
        if dst:
            with torch.no_grad():
                try:
                    torch._foreach_copy_(dst, src)
                except Exception:  # older torch / mixed dtypes
                    for d, s in zip(dst, src):
                        d.copy_(s)
            if self.reattach_grads:
                for d, i in zip(dst, idx):
                    self.params[i].grad = d
        # a gathered grad left in place must be gathered again next step: no fast path then
        self._gsig = None if (dst and not self.reattach_grads) else \
            [0 if p.grad is None else p.grad.data_ptr() for p in self.params]
        return len(dst)

    # -- momentum buffers <-> torch's state['momentum_buffer'] -------------------------------
    def _locate(self, i):
        bi, k = self._where[id(self.params[i])]
        return self.buffers[bi], k

    def momentum_buffer(self, i: int):
        """The view torch's state['momentum_buffer'] holds for params[i], or None (reads a device flag)."""
        self.check_params()
        b, k = self._locate(i)
        if b.mom is None or not int(b.hasbuf[k]):
            return None
        return b.view(b.mom, k)

    def momentum_buffers(self) -> list:
        self.check_params()
        out = [None] * len(self.params)
        for b in self.buffers:
            if b.mom is None:
                continue
            hb = b.hasbuf.cpu().numpy()
            for k, i in enumerate(b.index):
                if hb[k]:
                    out[i] = b.view(b.mom, k)
        return out

    def set_momentum_buffer(self, i: int, value):
        """Load torch's state['momentum_buffer'] for params[i] (None: the next step is its first)."""
        self.check_params()
        b, k = self._locate(i)
        if b.transport is not None:
            b.transport.reset_segment(k)
        if value is None:
            b.hasbuf[k] = 0
            b.hb_sure[k] = False
            b.hb_all = False
            return
        with torch.no_grad():
            b.view(b.ensure_mom(), k).copy_(value)
        b.hasbuf[k] = 1
        b.hb_sure[k] = True
        b.hb_all = bool(b.hb_sure.all())

    def param_view(self, i):
        b, k = self._locate(i)
        return b.view(b.param, k)

    def grad_view(self, i):
        b, k = self._locate(i)
        return b.view(b.grad, k)

    def locate(self, p):
        """(buffer index, segment index) of tensor `p` in this group, or None."""
        return self._where.get(id(p))

    @property
    def numel(self):
        return sum(b.numel for b in self.buffers)


# ---------------------------------------------------------------------------------------
# Law compilation
# ---------------------------------------------------------------------------------------

def _family_mode(f: Family):
    if f.order == 2:
        return "matrix2" if f.form == "matrix" else "diag2"
    if f.order == 1 and f.form == "diag":
        return "diag1"
    if f.order == 1 and f.form == "vector":
        return "vector1"
    return None


def _contig(col: np.ndarray):
    """(a, b) if the values of `col` are exactly the integers a..b-1 in increasing order."""
    if col.size == 0:
        return None
    a = int(col[0])
    if np.array_equal(col, np.arange(a, a + col.size)):
        return a, a + col.size
    return None


def _contig_set(col: np.ndarray):
    """(a, b) if the set of values of `col` is exactly a..b-1 (any order)."""
    if col.size == 0:
        return None
    s = np.unique(col)
    if s.size == col.size and int(s[-1]) - int(s[0]) + 1 == s.size:
        return int(s[0]), int(s[-1]) + 1
    return None


@dataclass
class _TermPlan:
    key: tuple  # (group index, buffer index, segment index)
    axis: int
    index: np.ndarray
    sign: float
    blocks: list = field(default_factory=list)  # matrix2: [(kind, spec)] kind in {"r","c","big"}
    ranges: list = field(default_factory=list)  # vector1: [(a, b)] per s


def locate_param(groups, params_by_name: Mapping[str, torch.Tensor], name: str) -> tuple:
    """(group index, buffer index, segment index) of law parameter `name` in the FlatGroups."""
    if name not in params_by_name:
        raise KeyError(f"law parameter {name!r} is not among the optimizer's named parameters")
    p = params_by_name[name]
    for gi, g in enumerate(groups):
        loc = g.locate(p)
        if loc is not None:
            return (gi,) + tuple(loc)
    raise KeyError(f"law parameter {name!r} is not held by the optimizer (no param group contains it)")


class CompiledLaws:
    """A LawSet bound to FlatGroups: integer tables for the fused kernels plus a CSR finishing step.

    Rebuilds itself lazily when a group rebuilt its buffers (model moved, .data replaced)."""

    def __init__(self, lawset: LawSet, params_by_name: Mapping[str, torch.Tensor], groups, tile_target=None):
        if isinstance(groups, FlatGroup):
            groups = [groups]
        self.lawset = lawset
        self.params_by_name = dict(params_by_name)
        self.groups = list(groups)
        self.tile_target = tile_target
        self.keys = [f.name for f in lawset.families]
        self._versions = None
        self._compile()

    # -- compilation ---------------------------------------------------------------------
    def _resolve(self, name):
        return locate_param(self.groups, self.params_by_name, name)

    def _classify(self, f: Family, geoms):
        """Per-term plans for family f, or None if it must be evaluated eagerly."""
        K_ = _K()
        mode = _family_mode(f)
        if mode is None:
            return None
        plans = []
        for t in f.terms:
            key = self._resolve(t.param)
            g = geoms[key]
            nd = len(g.shape)
            if nd == 0 or t.groups != 1:  # refined (grouped-conv) axes: not in the kernel tables
                return None
            if not -nd <= t.axis < nd:
                raise IndexError(f"law {f.name!r}: axis {t.axis} out of range for parameter {t.param!r} "
                                 f"of shape {tuple(g.shape)}")
            axis = t.axis % nd
            idx = t.index.detach().cpu().numpy().astype(np.int64)
            if idx.ndim != 2 or idx.shape[0] != f.units:
                return None
            if idx.size and (idx.min() < 0 or idx.max() >= g.shape[axis]):
                raise IndexError(f"law {f.name!r}: term index out of range for parameter {t.param!r} "
                                 f"(axis {t.axis}, size {g.shape[axis]})")
            tp = _TermPlan(key, axis, idx, float(t.sign))
            U, S = idx.shape
            if mode == "vector1":
                if axis != 0:
                    return None
                for s in range(S):
                    r = _contig_set(idx[:, s])
                    if r is None:
                        return None
                    tp.ranges.append(r)
            elif mode == "matrix2":
                if U == 0:
                    return None
                if g.K == 1 and axis == 0:
                    # a bias (one value per row): M_t M_tᵀ = Σ_s b[idx_s] b[idx_s]ᵀ, a rank-1 outer
                    # product formed in the finishing step from the stored values (any index)
                    tp.blocks.append(("outer", None))
                    plans.append(tp)
                    continue
                per_s = [_contig(idx[:, s]) for s in range(S)]
                if all(r is not None for r in per_s):
                    for a, b in per_s:
                        if axis == 0 and U <= K_.GRAM[0]:
                            tp.blocks.append(("r", (a, b)))
                        elif axis == 1 and U <= K_.GRAM_COL[1]:
                            tp.blocks.append(("c", (a, b)))
                        else:
                            tp.blocks.append(("big", (axis, a, U, 1)))
                else:
                    a = int(idx[0, 0])
                    grouped = a + np.arange(U)[:, None] * S + np.arange(S)[None, :]
                    if not np.array_equal(idx, grouped):
                        return None
                    tp.blocks.append(("big", (axis, a, U, S)))
            plans.append(tp)
        return mode, plans

    def _compile(self):
        K_ = _K()
        target = self.tile_target or (self.groups[0].target if self.groups else TILE_TARGET)
        self.lawset.check_params(self.params_by_name, what="optimizer's parameters")
        devices = {g.device for g in self.groups if g.params}
        if len(devices) > 1:
            raise ValueError("law tracking across parameter groups on different devices is not supported")
        self.device = devices.pop() if devices else torch.device("cpu")
        geoms = {}
        for gi, g in enumerate(self.groups):
            for bi, b in enumerate(g.buffers):
                for k, sg in enumerate(b.segs):
                    geoms[(gi, bi, k)] = sg
        self._geoms = geoms

        # 1. classify families, collect per-segment needs
        needs: dict = {}
        fam_plans = []
        self.eager = []
        for f in self.lawset.families:
            c = self._classify(f, geoms)
            if c is None:
                self.eager.append(f)
                continue
            mode, plans = c
            fam_plans.append((f, mode, plans))
            for tp in plans:
                nd = needs.setdefault(tp.key, _Need())
                if mode in ("diag2", "diag1"):
                    if tp.axis == 0:
                        nd.rowsq |= mode == "diag2"
                        nd.rowsum |= mode == "diag1"
                    else:
                        nd.colsq |= mode == "diag2"
                        nd.colsum |= mode == "diag1"
                elif mode == "vector1":
                    nd.colsum = True
                    for a, b in tp.ranges:
                        nd.row_bps.update((a, b))
                else:
                    for kind, spec in tp.blocks:
                        if kind == "r":
                            nd.gram_r.add(spec)
                        elif kind == "c":
                            nd.gram_c.add(spec)
                        elif kind == "outer":
                            nd.rowsum = True

        # 2. plan tiles, allocate scratch slots, build providers
        slot = 0

        def alloc(n):
            nonlocal slot
            s = slot
            slot += n
            return s

        self._prov = {}
        step_rows = {}  # (gi, bi) -> {variant: rows}
        stats_rows = {}
        big_specs = {}  # (gi, bi) -> list of rows for the gram kernel
        self._big = {}  # (key, spec) -> slot function data
        for gi, g in enumerate(self.groups):
            for bi, b in enumerate(g.buffers):
                srows, trows = {}, {}
                for k, sg in enumerate(b.segs):
                    key = (gi, bi, k)
                    nd = needs.get(key)
                    tiles, big_r, big_c = _plan_segment(sg, nd, target)
                    if nd is not None and nd.any:
                        self._prov[key] = self._assign(sg, nd, tiles, alloc)
                        for blk in big_r:
                            self._big[(key, (0, blk[0], blk[1] - blk[0], 1))] = None
                        for blk in big_c:
                            self._big[(key, (1, blk[0], blk[1] - blk[0], 1))] = None
                    for t, r in zip(tiles, _tile_rows(tiles, k, sg)):
                        srows.setdefault(t.variant, []).append(r)
                        if nd is not None and nd.any:
                            trows.setdefault(t.variant, []).append(r)
                step_rows[(gi, bi)] = srows
                stats_rows[(gi, bi)] = trows
        for f, mode, plans in fam_plans:
            if mode != "matrix2":
                continue
            for tp in plans:
                for kind, spec in tp.blocks:
                    if kind == "big":
                        self._big[(tp.key, spec)] = None
        BM = K_.BIG_GRAM_BM
        for (key, spec) in list(self._big):
            gi, bi, k = key
            axis, a, U, S = spec
            sg = geoms[key]
            outer = math.prod(sg.shape[:axis])
            mid = sg.shape[axis]
            post = math.prod(sg.shape[axis + 1:])
            sm = S * post
            nb = _cdiv(U, BM)
            pairs = {}
            rows = big_specs.setdefault((gi, bi), [])
            # vectorise along the longer contraction index
            if S * post >= 16 or S * post >= outer:
                nloop, sloop, nvec, svec = outer, mid * post, S * post, 1
            else:
                nloop, sloop, nvec, svec = S * post, 1, outer, mid * post
            for i in range(nb):
                for j in range(i, nb):
                    out = alloc(BM * BM)
                    pairs[(i, j)] = out
                    r = [0] * K_.GCOL
                    r[K_.G_BASE_A] = sg.base + a * post + i * BM * sm
                    r[K_.G_BASE_B] = sg.base + a * post + j * BM * sm
                    r[K_.G_SM] = sm
                    r[K_.G_NA] = min(BM, U - i * BM)
                    r[K_.G_NB] = min(BM, U - j * BM)
                    r[K_.G_NLOOP], r[K_.G_SLOOP], r[K_.G_NVEC], r[K_.G_SVEC] = nloop, sloop, nvec, svec
                    r[K_.G_OUT] = out
                    rows.append(r)
            self._big[(key, spec)] = pairs

        # 3. CSR: every output entry = Σ ±scratch[slot]; plus rank-1 bias outer products
        outs, slots, coefs = [], [], []
        outer_fams = []
        self._pending_outer = []
        self.layout = []
        n_out = 0
        for f, mode, plans in fam_plans:
            # value()'s shape: (r, r) matrix, (units,) diag, (Σ_t S_t·K_t,) vector (set below)
            shape = (f.units, f.units) if mode == "matrix2" else (f.units,)
            off = n_out
            fo, fs, fc = [], [], []
            col_off = 0
            self._pending_outer = []
            for tp in plans:
                res = self._term_coo(f, mode, tp, off, col_off)
                if res is None:  # alignment not achievable here: evaluate this family eagerly
                    break
                o, s_, c_, width = res
                col_off += width
                fo.append(o), fs.append(s_), fc.append(c_)
            else:
                if mode == "vector1":
                    shape = (col_off,)
                size = int(np.prod(shape)) if shape else 1
                outs += fo
                slots += fs
                coefs += fc
                if self._pending_outer:
                    outer_fams.append((off, f.units, self._pending_outer))
                self.layout.append((f.name, off, tuple(shape)))
                n_out += size
                continue
            self.eager.append(f)
        self.n_out = n_out
        self._where = {name: (off, int(np.prod(shape)) if shape else 1, tuple(shape)) for name, off, shape in self.layout}
        o = np.concatenate(outs) if outs else np.zeros(0, np.int64)
        s = np.concatenate(slots) if slots else np.zeros(0, np.int64)
        c = np.concatenate(coefs) if coefs else np.zeros(0, np.float64)
        order = np.argsort(o, kind="stable")
        o, s, c = o[order], s[order], c[order]
        enc = K_.encode_signed_slots(s, c)
        counts = np.bincount(o, minlength=n_out) if n_out else np.zeros(0, np.int64)
        indptr = np.zeros(n_out + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        B = K_.CSR_BLOCK
        nblk = _cdiv(n_out, B)
        pad = np.zeros(nblk * B, dtype=np.int64)
        pad[:n_out] = counts
        blkmax = pad.reshape(nblk, B).max(1) if nblk else np.zeros(0, np.int64)
        dev = self.device
        self._indptr = torch.from_numpy(indptr).to(dev)
        self._slots = torch.from_numpy(np.ascontiguousarray(enc)).to(dev)
        self._blkmax = torch.from_numpy(blkmax.astype(np.int64)).to(dev)
        self.n_slots = slot
        self.scratch = torch.zeros(max(slot, 1), dtype=torch.float64, device=dev)
        self._step_tables = {k: _tables(v, dev) for k, v in step_rows.items()}
        self._stats_tables = {k: _tables(v, dev) for k, v in stats_rows.items()}
        self._gram_tables = {k: torch.tensor(v, dtype=torch.int64, device=dev) for k, v in big_specs.items() if v}
        self._versions = [g.version for g in self.groups]
        self.eager_names = {f.name for f in self.eager}
        # outer products grouped by units: slots [F, T, U], signs [F, T], output positions [F*U*U]
        self._outer = []
        by_u = {}
        for off, U, terms in outer_fams:
            by_u.setdefault(U, []).append((off, terms))
        for U, fl in sorted(by_u.items()):
            T = max(sum(sl.shape[1] for sl, _ in terms) for _, terms in fl)
            S_ = np.zeros((len(fl), T, U), dtype=np.int64)
            G_ = np.zeros((len(fl), T), dtype=np.float64)
            pos = np.zeros((len(fl), U * U), dtype=np.int64)
            for fi, (off, terms) in enumerate(fl):
                t = 0
                for sl, sign in terms:
                    for col in range(sl.shape[1]):
                        S_[fi, t] = sl[:, col]
                        G_[fi, t] = sign
                        t += 1
                pos[fi] = off + np.arange(U * U)
            self._outer.append((torch.from_numpy(S_).to(dev), torch.from_numpy(G_).to(dev),
                                torch.from_numpy(pos.ravel()).to(dev)))
        self.__dict__.pop("_pending_outer", None)

    def _assign(self, sg: _Seg, nd: _Need, tiles, alloc):
        """Give each tile its scratch slots; return the providers of this segment's statistics."""
        n0, K = sg.n0, sg.K
        prov = {"row": {}, "col": {}, "gr": {}, "gc": {}}
        rows_sq, rows_sum = [], []  # (x0, x1, base)
        parts = {}  # (ra, rb) -> part index
        col_sq, col_sum = [], []  # (part, k0, k1, base_for_k0)
        for t in tiles:
            bx, by = t.variant[0], t.variant[1]
            if nd.rowsq:
                t.o_rsq = alloc(t.x1 - t.x0)
                rows_sq.append((t.x0, t.x1, t.o_rsq))
            if nd.rowsum:
                t.o_rsum = alloc(t.x1 - t.x0)
                rows_sum.append((t.x0, t.x1, t.o_rsum))
            if nd.colsq or nd.colsum:
                if t.mode == "vec" or t.variant[5]:  # one column partial per tile
                    chunks = [(t.x0, t.x1)]
                else:
                    chunks = [(t.x0 + rc * bx, min(t.x0 + (rc + 1) * bx, t.x1)) for rc in range(t.nrc)]
                npart = len(chunks)
                for kind, flag, lst in (("sq", nd.colsq, col_sq), ("sum", nd.colsum, col_sum)):
                    if not flag:
                        continue
                    base = alloc(npart * t.cpitch)
                    if kind == "sq":
                        t.o_csq = base
                    else:
                        t.o_csum = base
                    for rc, ch in enumerate(chunks):
                        pi = parts.setdefault(ch, len(parts))
                        lst.append((pi, t.k0, t.k1, base + rc * t.cpitch))
            if t.blocks_r:
                t.o_gr = alloc(bx * bx)
                for blk in t.blocks_r:
                    prov["gr"].setdefault(blk, []).append((t.o_gr, t.x0, bx))
            if t.blocks_c:
                t.o_gc = alloc(by * by)
                a0 = t.cb // max(t.cy, 1)
                for blk in t.blocks_c:
                    prov["gc"].setdefault(blk, []).append((t.o_gc, a0, by))
        for kind, lst in (("sq", rows_sq), ("sum", rows_sum)):
            if not lst:
                continue
            cnt = np.zeros(n0, dtype=np.int64)
            for x0, x1, base in lst:
                cnt[x0:x1] += 1
            ncs = int(cnt.max())
            R = np.full((n0, ncs), -1, dtype=np.int64)
            fill = np.zeros(n0, dtype=np.int64)
            for x0, x1, base in lst:
                c = fill[x0]
                R[x0:x1, c] = base + np.arange(x1 - x0)
                fill[x0:x1] += 1
            prov["row"][kind] = R
        order = sorted(parts, key=lambda ab: ab)
        remap = {parts[ab]: i for i, ab in enumerate(order)}
        prov["parts"] = np.array(order, dtype=np.int64).reshape(-1, 2)
        for kind, lst in (("sq", col_sq), ("sum", col_sum)):
            if not lst:
                continue
            C = np.full((len(order), K), -1, dtype=np.int64)
            for pi, k0, k1, base in lst:
                C[remap[pi], k0:k1] = base + np.arange(k1 - k0)
            prov["col"][kind] = C
        return prov

    def _gram_slots(self, key, kind, spec):
        """int64 [U, U, n] scratch slots whose sum is block `spec` of the Gram matrix."""
        K_ = _K()
        prov = self._prov.get(key)
        if kind == "r" and prov is not None and spec in prov["gr"]:
            a, b = spec
            U = b - a
            lst = prov["gr"][spec]
            u = np.arange(U)
            out = np.stack([base + (a - x0 + u)[:, None] * bx + (a - x0 + u)[None, :] for base, x0, bx in lst], -1)
            return out
        if kind == "c" and prov is not None and spec in prov["gc"]:
            a, b = spec
            U = b - a
            lst = prov["gc"][spec]
            u = np.arange(U)
            return np.stack([base + (a - a0 + u)[:, None] * by + (a - a0 + u)[None, :] for base, a0, by in lst], -1)
        if kind in ("r", "c"):
            a, b = spec
            spec = (0 if kind == "r" else 1, a, b - a, 1)
        pairs = self._big[(key, spec)]
        U = spec[2]
        BM = K_.BIG_GRAM_BM
        u = np.arange(U)
        bu, ru = u // BM, u % BM
        I, J = np.meshgrid(np.arange(U), np.arange(U), indexing="ij")
        bi, bj = bu[I], bu[J]
        lo = np.minimum(bi, bj)
        hi = np.maximum(bi, bj)
        swap = bi > bj
        rr = np.where(swap, ru[J], ru[I])
        cc = np.where(swap, ru[I], ru[J])
        nb = _cdiv(U, BM)
        table = np.zeros((max(nb, 1), max(nb, 1)), dtype=np.int64)
        for (i, j), out in pairs.items():
            table[i, j] = out
        return (table[lo, hi] + rr * BM + cc)[..., None]

    def _term_coo(self, f, mode, tp: _TermPlan, off, col_off):
        sg = self._geoms[tp.key]
        prov = self._prov.get(tp.key)
        U, S = tp.index.shape
        if mode in ("diag2", "diag1"):
            kind = "sq" if mode == "diag2" else "sum"
            if tp.axis == 0:
                R = prov["row"][kind]
                sl = R[tp.index].reshape(U, -1)
            else:
                C = prov["col"][kind]
                shp = sg.shape
                pre = math.prod(shp[1:tp.axis])
                mid = shp[tp.axis]
                post = math.prod(shp[tp.axis + 1:])
                basec = (np.arange(pre)[:, None] * (mid * post) + np.arange(post)[None, :]).ravel()
                cols = basec[None, None, :] + tp.index[:, :, None] * post  # [U, S, pp]
                sl = C[:, cols]  # [nparts, U, S, pp]
                sl = np.moveaxis(sl, 0, 1).reshape(U, -1)
            if (sl < 0).any():
                return None
            n = sl.shape[1]
            o = (off + np.arange(U))[:, None].repeat(n, 1)
            return o.ravel(), sl.ravel(), np.full(o.size, tp.sign), 0
        if mode == "vector1":
            C = prov["col"]["sum"]
            parts = prov["parts"]
            K = sg.K
            os_, ss_ = [], []
            for s, (a, b) in enumerate(tp.ranges):
                sel = np.nonzero((parts[:, 0] >= a) & (parts[:, 1] <= b))[0]
                if int((parts[sel, 1] - parts[sel, 0]).sum()) != b - a:
                    return None
                sl = C[sel].T  # [K, np]
                if (sl < 0).any():
                    return None
                o = (off + col_off + s * K + np.arange(K))[:, None].repeat(sl.shape[1], 1)
                os_.append(o.ravel())
                ss_.append(sl.ravel())
            o = np.concatenate(os_)
            return o, np.concatenate(ss_), np.full(o.size, tp.sign), S * K
        # matrix2
        os_, ss_ = [], []
        for kind, spec in tp.blocks:
            if kind == "outer":
                R = prov["row"]["sum"]
                if R.shape[1] != 1:
                    return None
                self._pending_outer.append((R[tp.index, 0], tp.sign))  # [U, S] value slots
                continue
            sl = self._gram_slots(tp.key, kind, spec)  # [U, U, n]
            o = (off + np.arange(U * U)).reshape(U, U)[..., None].repeat(sl.shape[2], 2)
            os_.append(o.ravel())
            ss_.append(sl.ravel())
        if not os_:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), 0
        o = np.concatenate(os_)
        return o, np.concatenate(ss_), np.full(o.size, tp.sign), 0

    # -- runtime -------------------------------------------------------------------------
    def ensure_current(self, check_params: bool = True):
        """Recompile if a group rebuilt its buffers (check_params: first re-check every group's views)."""
        if check_params:
            for g in self.groups:
                g.check_params()
        if [g.version for g in self.groups] != self._versions:
            self._compile()

    def group_index(self, group):
        for gi, g in enumerate(self.groups):
            if g is group:
                return gi
        raise KeyError("this FlatGroup is not part of the compiled laws")

    def step_tables(self, gi, bi):
        return self._step_tables.get((gi, bi), [])

    def stats_tables(self, gi, bi):
        return self._stats_tables.get((gi, bi), [])

    def gram_table(self, gi, bi):
        return self._gram_tables.get((gi, bi))

    @torch.no_grad()
    def finish(self) -> dict:
        """Law values from the statistics in scratch (+ eager families): {family name: float64 tensor}."""
        K_ = _K()
        out = torch.empty(self.n_out, dtype=torch.float64, device=self.device)
        K_.launch_csr_sum(self.scratch, self._indptr, self._slots, self._blkmax, out)
        for slots, signs, pos in self._outer:  # Σ_t s_t b_t b_tᵀ: exact fp64 products, fixed order
            a = self.scratch[slots]  # [F, T, U]
            o = torch.einsum("ft,ftu,ftv->fuv", signs, a, a).reshape(-1)
            out[pos] = out[pos] + o
        extra = {}
        if self.eager:
            with torch.no_grad():
                p = {n: t.detach() for n, t in self.params_by_name.items()}
                for f in self.eager:
                    extra[f.name] = f.value(p)
        return FamilyValues(out, self._where, self.keys, extra)


def compile_laws(lawset: LawSet, params_by_name: Mapping[str, torch.Tensor], groups, *,
                 tile_target: int | None = None) -> CompiledLaws:
    """Bind `lawset` to the FlatGroup(s) holding its parameters (see CompiledLaws)."""
    return CompiledLaws(lawset, params_by_name, groups, tile_target=tile_target)


# ---------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------

def _lr_arg(lr, device):
    if torch.is_tensor(lr):
        if lr.requires_grad:
            raise RuntimeError("consopt's fused SGD does not support a differentiable (requires_grad) lr")
        if lr.numel() != 1:
            raise ValueError("lr tensor must hold one value")
        if lr.device != device:
            if lr.device.type == "cpu":
                return float(lr)
            return lr.to(device)
        return lr.reshape(())
    return float(lr)


def _dev_scalar(t, device, name):
    if t is None:
        return None
    if not torch.is_tensor(t):
        return torch.tensor(float(t), dtype=torch.float32, device=device)
    if t.device != device:
        t = t.to(device)
    return t.reshape(-1)


@torch.no_grad()
def fused_sgd_step(group: FlatGroup, lr, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                   nesterov: bool = False, maximize: bool = False, first_step: bool | None = None,
                   grad_scale=None, found_inf=None, compiled_laws: CompiledLaws | None = None,
                   finish: bool | None = None):
    """One torch.optim.SGD step over `group`'s flat buffers (+ law statistics at the new params).

    lr: float or 0-dim tensor (read on the device; no recompilation when it changes).
    first_step: None -> per-parameter torch semantics (a parameter's first step with a grad sets
        buf = d_p); True -> every active parameter starts a fresh buffer; False -> use the buffers.
    grad_scale / found_inf: GradScaler tensors (grads are divided by grad_scale and the unscaled
        grads are written back, like torch's fused SGD; found_inf != 0 leaves params, momentum
        and grads untouched). No host synchronisation.
    compiled_laws: from compile_laws(); the kernels also form the law statistics. Returns the law
        values (dict) when `finish` (default: the compiled laws cover only this group), else None;
        with several groups call `compiled_laws.finish()` after stepping all of them.
    """
    K_ = _K()
    group.prepare()
    dev = group.device
    gi = None
    if compiled_laws is not None:
        compiled_laws.ensure_current(check_params=False)  # this group was checked by prepare()
        gi = compiled_laws.group_index(group)
    lr_a = _lr_arg(lr, dev)
    gs = _dev_scalar(grad_scale, dev, "grad_scale")
    fi = _dev_scalar(found_inf, dev, "found_inf")
    for bi, b in enumerate(group.buffers):
        if b.numel == 0:
            continue
        if momentum != 0:
            b.ensure_mom()
        if first_step is None:
            hb = b.hasbuf
        else:
            hb = b.const_flags(0 if first_step else 1)
        if compiled_laws is not None:
            tables = compiled_laws.step_tables(gi, bi)
            scratch = compiled_laws.scratch
        else:
            tables = b.plain_tables(group.target)
            scratch = b.const_flags(0)  # never written: stats are off
        tr = b.transport if (momentum != 0 and b.transport is not None and b.transport.dirty) else None
        if tr is not None and first_step:  # (buffers restart here; those of untouched segments stay)
            tr.flush(b.mom)
            tr = None
        for (bx, by, vec, gr, gc, ca, al), table in tables:
            owed = tr.scale(table) if tr is not None else None  # a lazy projection's momentum transport
            K_.launch_sgd_stats(b.param, b.grad, b.mom, table, b.active, hb, scratch, block=(bx, by), vec=vec,
                                gram_r=gr, gram_c=gc, colacc=ca, aligned=al, galigned=b.goff_aligned,
                                stats=compiled_laws is not None, update=True, goff=b.goff, lr=lr_a,
                                momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                nesterov=nesterov, maximize=maximize, grad_scale=gs, found_inf=fi,
                                mscale=owed, idx64=owed is not None and tr.idx64)
        if tr is not None:
            tr.clear()
        if compiled_laws is not None:
            gt = compiled_laws.gram_table(gi, bi)
            if gt is not None:
                K_.launch_gram(b.param, gt, scratch)
        if momentum != 0 and not b.hb_all:
            if fi is None:
                torch.maximum(b.hasbuf, b.active, out=b.hasbuf)
                b.hb_sure |= b.active_host
                b.hb_all = bool(b.hb_sure.all())
            else:
                b.hasbuf.copy_(torch.where(fi[0] != 0, b.hasbuf, torch.maximum(b.hasbuf, b.active)))
    if compiled_laws is None:
        return None
    if finish is None:
        finish = len(compiled_laws.groups) == 1
    return compiled_laws.finish() if finish else None


def statistics_pass(b: FlatBuffer, tables, scratch, gram=None, *, mom=None, scale=None, idx64: bool = False):
    """Statistics-only launches over tile tables of buffer `b` (variant, table pairs, as
    `CompiledLaws.stats_tables` gives them) and the Gram kernel's blocks `gram`: the statistics of
    the stored parameters into `scratch`, after the projection's diagonal action `scale` (on `mom`
    too when given; see `triton_kernels.sgd_stats.launch_sgd_stats`) when one is given."""
    K_ = _K()
    for (bx, by, vec, gr, gc, ca, al), table in tables:
        K_.launch_sgd_stats(b.param, None, mom, table, None, None, scratch, block=(bx, by), vec=vec, gram_r=gr,
                            gram_c=gc, colacc=ca, aligned=al, stats=True, update=False, scale=scale, idx64=idx64)
    if gram is not None:  # Gram blocks too large for one tile: from the stored values
        K_.launch_gram(b.param, gram, scratch)


@torch.no_grad()
def law_values_only(compiled_laws: CompiledLaws) -> dict:
    """Law values at the current parameters (no update): h(θ_0) for tracking."""
    compiled_laws.ensure_current()
    for gi, g in enumerate(compiled_laws.groups):
        for bi, b in enumerate(g.buffers):
            statistics_pass(b, compiled_laws.stats_tables(gi, bi), compiled_laws.scratch, compiled_laws.gram_table(gi, bi))
    return compiled_laws.finish()
