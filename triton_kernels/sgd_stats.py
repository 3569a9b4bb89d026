"""Fused SGD step + conservation-law statistics over flat parameter buffers.

Three kernels, all pure functions of tensors and integer tables (no pointer tables, so the
Triton interpreter can run them):

``sgd_stats_kernel``
    One program per *tile* of a tile table. A tile is a window of one tensor segment of a
    flat buffer, viewed as a matrix ``[n0, K]`` (``K`` = numel / n0, row stride ``K``):
    rows ``[x0, x1)`` walked in row chunks of ``BX`` and, inside each row chunk, column
    chunks ``j`` whose columns are ``cb + j*cj + y*cy`` for ``y < ny`` (and ``< cend``).
    ROW tiles use ``cj = BY, cy = 1`` (contiguous column chunks); COL tiles (column Gram
    blocks of a ``[n0, n1, inner]`` view) use ``cj = 1, cy = inner, nch = inner`` so that
    one program holds a block of ``ny`` axis-1 positions and contracts over rows and
    ``inner``. VEC tiles (``rest == 1``: biases, norm affines) flatten the vector over the
    whole ``[BX, BY]`` block.
    Per element it applies ``torch.optim.SGD`` exactly (maximize, weight decay, momentum
    with first-step ``buf = d_p``, dampening, nesterov, float or device-tensor lr,
    GradScaler ``grad_scale``/``found_inf``) computing in fp32 (fp64 for fp64 buffers),
    storing back in the buffer dtype, and then, on the values actually stored, forms in
    float64: per-row sums of squares and sums, per-column partial sums of squares and sums
    (over the rows of one row chunk, or with ``COLACC`` over all the rows of a one-column-chunk
    tile), and optionally the row Gram ``X Xᵀ`` (``GRAM_R``) and
    column Gram ``Xᵀ X`` (``GRAM_C``) of the tile, with ``tl.dot`` on float64 operands
    (inputs are exact fp32/bf16/fp16 values widened to fp64, so every product is exact
    and only the float64 additions round). Every statistic goes to its own slot of a
    float64 scratch buffer: no atomics, deterministic.
    Statistics-only launches may first apply the projection's diagonal action (``SCALE``:
    x ← x · F[oA + sA·iA(e)] · F[oB + sB·iB(e)] per element, parameters and momentum, rounded
    once as ``triton_kernels.project`` does) and form the statistics of the values stored: a
    projection colour and the next measurement in one pass. Update launches may likewise apply
    the transport a lazy projection owes the momentum (``MSCALE``: the same per-element factors,
    on the momentum as it is loaded), so that transport costs no pass of its own.

``gram_kernel``
    Gram blocks that do not fit one tile (units > 64, strided/grouped units, axis >= 2),
    read from the *new* parameters after the update kernel: ``G[u, v] = Σ_{l, c}
    P[a + u*sm + l*s_loop + c*s_vec] * P[b + v*sm + ...]``, one program per 64x64 block pair.

``csr_sum_kernel``
    The fixed-order second stage: ``out[o] = Σ_{k in row o} coef[k] * scratch[slot[k]]``
    (a CSR matrix built once on the host), which turns partial statistics into law values.

bf16 is handled through its bit pattern (int16 views): bf16 -> fp32 is a shift, fp32 -> bf16
rounds to nearest even in integer arithmetic, identical on the GPU and in the interpreter
(whose float -> bf16 cast truncates).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# Tile table layout (int64, one row of NCOL per program)
# ---------------------------------------------------------------------------------------
T_SEG, T_BASE, T_K, T_X0, T_X1, T_NRC, T_CB, T_CJ, T_CY, T_NCH, T_NY, T_CEND = range(12)
T_RSQ, T_RSUM, T_CSQ, T_CSUM, T_CPITCH, T_GR, T_GC = range(12, 19)
NCOL = 20  # padded

# Gram block-pair table layout (int64) for gram_kernel
G_BASE_A, G_BASE_B, G_SM, G_NA, G_NB, G_NLOOP, G_SLOOP, G_NVEC, G_SVEC, G_OUT = range(10)
GCOL = 10

# Block configurations: (BX, BY) elements per program and loop step, and the warps that run
# them. Sized with ptxas (benchmarks/compile_check.py prints registers and spills for sm_90,
# Triton 3.6 and 3.9): the fp64 statistics need ~25 registers per element a thread holds, so
# the old (32, 128) on 4 warps spilled 1.4 KB per thread and a (64, 64) Gram tile on 8 warps
# 8 KB; now WIDE uses 128 registers without spills and GRAM/GRAM_COL ≤ 255 with < 50 bytes.
# Gram tiles need BX, BY >= 16 for tl.dot; row Gram blocks of up to 64 units (GRAM) and column
# Gram blocks of up to 64 positions (GRAM_COL) fit one tile (larger ones go to gram_kernel).
WIDE = (16, 64)
GRAM = (64, 32)
GRAM_COL = (16, 64)
VEC = (32, 32)
WARPS = {WIDE: 8, GRAM: 8, GRAM_COL: 8, VEC: 8}
BIG_GRAM_BM = 64
BIG_GRAM_BC = 32  # 8 warps: no spills (64 spilled 0.5 KB per thread under Triton 3.6)
CSR_BLOCK = 128


@triton.jit
def _band(a, b):
    """a & b for masks where one side may be a scalar (the interpreter mistypes bool splats)."""
    return (a.to(tl.int32) * b.to(tl.int32)) != 0


@triton.jit
def _ct(x, F64: tl.constexpr):
    """Cast to the compute type: fp64 for fp64 buffers, fp32 otherwise."""
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _load_vals(ptr, mask, BF16: tl.constexpr, F64: tl.constexpr):
    if BF16:
        bits = tl.load(ptr, mask=mask, other=0)
        v = (bits.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        v = tl.load(ptr, mask=mask, other=0)
    return _ct(v, F64)


@triton.jit
def _load16_f64(P, off, mask, BF16: tl.constexpr):
    """16-bit elements (bf16 bits or fp16) at P + off as float64, read through 32-bit words.

    Triton 3.6 cannot lower a float64 `tl.dot` whose operands come from a 16-bit load ("fp64
    don't support largeK MMA"); a 32-bit load feeds the same exact values in a layout it can."""
    w = tl.load(P.to(tl.pointer_type(tl.int32), bitcast=True) + (off >> 1), mask=mask, other=0)
    bits = ((w >> ((off & 1) * 16).to(tl.int32)) & 0xFFFF).to(tl.uint32)
    if BF16:
        v = (bits << 16).to(tl.float32, bitcast=True)
    else:
        v = bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return v.to(tl.float64)


@triton.jit
def _round_store(x, PTR, BF16: tl.constexpr, F64: tl.constexpr):
    """(value to store in the buffer's element type, that stored value back in the compute type).

    bf16: round to nearest even on the fp32 bit pattern (NaN stays a quiet NaN)."""
    if BF16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, (b >> 16) | 0x40, r)
        back = (r << 16).to(tl.float32, bitcast=True)
        return r.to(tl.uint16).to(tl.int16, bitcast=True), _ct(back, F64)
    else:
        s = x.to(PTR.dtype.element_ty)
        return s, _ct(s, F64)


@triton.jit
def _seg_factors(FAC, e, mask, f_oa, f_sa, f_pa, f_da, f_ob, f_sb, f_pb, f_db, IDX64: tl.constexpr):
    """The diagonal action's two factors of segment-local elements e (an FSEG row's axes):
    F[oA + sA·((e // postA) % dimA)] and F[oB + sB·((e // postB) % dimB)], 1 where masked."""
    if not IDX64:
        e = e.to(tl.int32)
    fa = tl.load(FAC + f_oa + f_sa * ((e // f_pa) % f_da), mask=mask, other=1.0)
    fb = tl.load(FAC + f_ob + f_sb * ((e // f_pb) % f_db), mask=mask, other=1.0)
    return fa, fb


@triton.jit
def _scalar(hi, mid, lo, F64: tl.constexpr):
    """A host scalar passed as three fp32 parts: fp32 compute uses hi = fp32(x) (what torch
    uses for fp32 tensors); fp64 compute rebuilds x exactly as (hi + mid) + lo."""
    if F64:
        return (tl.cast(hi, tl.float64) + tl.cast(mid, tl.float64)) + tl.cast(lo, tl.float64)
    else:
        return tl.cast(hi, tl.float32)


@triton.jit
def sgd_stats_kernel(
    P, G, M, TILES, ACTIVE, HASBUF, GOFF, SCR, FAC, FSEG,
    lr_hi, lr_mid, lr_lo, LR_PTR, wd_hi, wd_mid, wd_lo, mom_hi, mom_mid, mom_lo, dmp_hi, dmp_mid, dmp_lo,
    GS_PTR, INF_PTR,
    NC: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
    VECM: tl.constexpr, GRAM_R: tl.constexpr, GRAM_C: tl.constexpr, COLACC: tl.constexpr, STATS: tl.constexpr,
    UPDATE: tl.constexpr, USE_MOM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr, LR_FROM_PTR: tl.constexpr, HAS_GS: tl.constexpr, HAS_INF: tl.constexpr,
    BF16: tl.constexpr, F64: tl.constexpr, HAS_GOFF: tl.constexpr, HALF: tl.constexpr, ALIGNED: tl.constexpr,
    GALIGNED: tl.constexpr, SCALE: tl.constexpr, SCALE_M: tl.constexpr, MSCALE: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    tp = TILES + pid * NC
    seg = tl.load(tp + 0)
    base = tl.load(tp + 1)
    K = tl.load(tp + 2)
    x0 = tl.load(tp + 3)
    x1 = tl.load(tp + 4)
    nrc = tl.load(tp + 5)
    cb = tl.load(tp + 6)
    cj = tl.load(tp + 7)
    cy = tl.load(tp + 8)
    nch = tl.load(tp + 9)
    ny = tl.load(tp + 10)
    cend = tl.load(tp + 11)
    o_rsq = tl.load(tp + 12)
    o_rsum = tl.load(tp + 13)
    o_csq = tl.load(tp + 14)
    o_csum = tl.load(tp + 15)
    cpitch = tl.load(tp + 16)
    o_gr = tl.load(tp + 17)
    o_gc = tl.load(tp + 18)
    if ALIGNED:
        # Facts the planner checked for every tile of this table (consopt.fused._aligned): groups
        # of 4 elements are contiguous, 16-byte aligned and share their mask, so Triton can use
        # 128-bit accesses for the parameter and momentum buffers (table values carry no
        # alignment of their own), and for the grads at G + gd + off when GALIGNED.
        base = tl.multiple_of(base, 4)
        if VECM:
            x0 = tl.multiple_of(x0, 4)
            x1 = tl.multiple_of(x1, 4)
        else:
            K = tl.multiple_of(K, 4)
            cb = tl.multiple_of(cb, 4)
            ny = tl.multiple_of(ny, 4)
            cend = tl.multiple_of(cend, 4)

    if SCALE or MSCALE:  # this segment's two factor axes (FSEG row: oA, sA, postA, dimA, oB, sB, postB, dimB, on)
        fp = FSEG + seg * 9
        f_oa = tl.load(fp + 0)
        f_sa = tl.load(fp + 1)
        f_pa = tl.load(fp + 2)
        f_da = tl.load(fp + 3)
        f_ob = tl.load(fp + 4)
        f_sb = tl.load(fp + 5)
        f_pb = tl.load(fp + 6)
        f_db = tl.load(fp + 7)
        f_on = tl.load(fp + 8) != 0
        if not IDX64:  # segment-local index arithmetic in int32 (cheaper division on the GPU)
            f_pa = f_pa.to(tl.int32)
            f_da = f_da.to(tl.int32)
            f_pb = f_pb.to(tl.int32)
            f_db = f_db.to(tl.int32)

    if UPDATE:
        act = tl.load(ACTIVE + seg) != 0
        if HAS_INF:
            act = act & (tl.load(INF_PTR).to(tl.float32) == 0.0)
        # grads may live anywhere on the device (autograd's own tensors after
        # zero_grad(set_to_none=True), DDP buckets): GOFF[seg] is the element offset of the
        # segment's grad from G, so the grad of element `off` is at G + gd + off.
        if HAS_GOFF:
            gd = tl.load(GOFF + seg) - base
            if GALIGNED:  # every grad offset is a multiple of 4 elements (checked on the host each step)
                gd = tl.multiple_of(gd, 4)
        else:
            gd = base * 0
        if USE_MOM:
            hb = tl.load(HASBUF + seg) != 0
            mom = _scalar(mom_hi, mom_mid, mom_lo, F64)
            dmp = _scalar(dmp_hi, dmp_mid, dmp_lo, F64)
        if LR_FROM_PTR:
            lr = _ct(tl.load(LR_PTR), F64)
        else:
            lr = _scalar(lr_hi, lr_mid, lr_lo, F64)
        if HAS_WD:
            wd = _scalar(wd_hi, wd_mid, wd_lo, F64)
        if HAS_GS:
            gs = _ct(tl.load(GS_PTR), F64)

    xs = tl.arange(0, BX)
    ys = tl.arange(0, BY)
    if GRAM_R:
        acc_r = tl.zeros([BX, BX], dtype=tl.float64)
    if GRAM_C:
        acc_c = tl.zeros([BY, BY], dtype=tl.float64)
    if COLACC:  # one column chunk per tile (nch == 1): column sums accumulate over all row chunks
        cacc_sq = tl.zeros([BY], dtype=tl.float64)
        cacc_sum = tl.zeros([BY], dtype=tl.float64)
    if VECM:
        vl = tl.arange(0, BX * BY)
        vsq = tl.zeros([BX * BY], dtype=tl.float64)
        vsum = tl.zeros([BX * BY], dtype=tl.float64)

    for rc in range(0, nrc):
        if VECM:
            lin = rc * (BX * BY) + vl
            rows2 = x0 + lin
            mask = rows2 < x1
            off = base + rows2
        else:
            rows = x0 + rc * BX + xs
            rmask = rows < x1
            rsq = tl.zeros([BX], dtype=tl.float64)
            rsum = tl.zeros([BX], dtype=tl.float64)
        for j in range(0, nch):
            if not VECM:
                if ALIGNED:  # a row tile: cj = BY, cy = 1
                    cols = cb + j * BY + ys
                else:
                    cols = cb + j * cj + ys * cy
                cmask = (ys < ny) & (cols < cend)
                mask = rmask[:, None] & cmask[None, :]
                off = base + rows[:, None] * K + cols[None, :]
            p = _load_vals(P + off, mask, BF16, F64)
            if SCALE:
                # the projection's diagonal action, applied before the statistics are formed:
                # x · F[oA + sA·iA(e)] · F[oB + sB·iB(e)] in float64, rounded once to the element
                # type (through fp32 for fp16/bf16), as triton_kernels.project does
                fa, fb = _seg_factors(FAC, off - base, mask, f_oa, f_sa, f_pa, f_da, f_ob, f_sb, f_pb, f_db, IDX64)
                smask = _band(mask, f_on)
                pst, ps = _round_store(_ct(p.to(tl.float64) * fa * fb, F64), P, BF16, F64)
                tl.store(P + off, pst, mask=smask)
                p = tl.where(f_on, ps, p)
                if SCALE_M:  # the momentum takes the same action (a velocity: v' = g v)
                    z = _load_vals(M + off, smask, BF16, F64).to(tl.float64) * fa * fb
                    zst, _z = _round_store(_ct(z, F64), M, BF16, F64)
                    tl.store(M + off, zst, mask=smask)
            if UPDATE:
                um = _band(mask, act)
                g = _load_vals(G + gd + off, um, BF16, F64)
                if HAS_GS:
                    g = g / gs
                    gst, _g_stored = _round_store(g, G, BF16, F64)
                    tl.store(G + gd + off, gst, mask=um)  # torch's fused SGD writes the unscaled grad back
                if MAXIMIZE:
                    g = -g
                if HAS_WD:
                    g = tl.fma(p, wd, g)
                if USE_MOM:
                    if MSCALE:
                        # the transport the projection left owed to this buffer (lazy momentum):
                        # m · fA · fB in float64, rounded once as triton_kernels.project rounds it, on
                        # every element with a buffer, whether or not this step updates it
                        hm = _band(mask, hb)
                        mbuf = _load_vals(M + off, hm, BF16, F64)
                        fa, fb = _seg_factors(FAC, off - base, hm, f_oa, f_sa, f_pa, f_da, f_ob, f_sb, f_pb, f_db,
                                              IDX64)
                        zst, zv = _round_store(_ct(mbuf.to(tl.float64) * fa * fb, F64), M, BF16, F64)
                        mbuf = tl.where(f_on, zv, mbuf)
                        # elements this step leaves alone (no grad, a skipped GradScaler step) keep it
                        tl.store(M + off, zst, mask=_band(_band(hm, f_on), act.to(tl.int32) == 0))
                    else:
                        mbuf = _load_vals(M + off, _band(um, hb), BF16, F64)
                    buf = tl.where(hb, tl.fma(g, dmp, mbuf * mom), g)
                    bst, _b_stored = _round_store(buf, M, BF16, F64)
                    tl.store(M + off, bst, mask=um)
                    if NESTEROV:
                        g = tl.fma(buf, mom, g)
                    else:
                        g = buf
                pn = tl.fma(g, -lr, p)
                pst, pn = _round_store(pn, P, BF16, F64)
                tl.store(P + off, pst, mask=um)
                p = tl.where(um, pn, p)
            if STATS:
                x = p.to(tl.float64)
                xx = x * x
                if VECM:
                    vsq += xx
                    vsum += x
                    tl.store(SCR + o_rsq + lin, xx, mask=_band(mask, o_rsq >= 0))
                    tl.store(SCR + o_rsum + lin, x, mask=_band(mask, o_rsum >= 0))
                else:
                    rsq += tl.sum(xx, axis=1)
                    rsum += tl.sum(x, axis=1)
                    if COLACC:
                        cacc_sq += tl.sum(xx, axis=0)
                        cacc_sum += tl.sum(x, axis=0)
                    else:
                        if ALIGNED:
                            cpos = rc * cpitch + j * BY + ys
                        else:
                            cpos = rc * cpitch + j * cj + ys * cy
                        tl.store(SCR + o_csq + cpos, tl.sum(xx, axis=0), mask=_band(cmask, o_csq >= 0))
                        tl.store(SCR + o_csum + cpos, tl.sum(x, axis=0), mask=_band(cmask, o_csum >= 0))
                    if GRAM_R or GRAM_C:
                        xg = x
                        if HALF:  # the Gram operands re-read through 32-bit words (see _load16_f64)
                            if UPDATE or SCALE:
                                tl.debug_barrier()  # this program's stores above are visible to all its threads
                            xg = _load16_f64(P, off, mask, BF16)
                        if GRAM_R:
                            acc_r += tl.dot(xg, tl.trans(xg))
                        if GRAM_C:
                            acc_c += tl.dot(tl.trans(xg), xg)
        if STATS:
            if not VECM:
                rpos = rows - x0
                tl.store(SCR + o_rsq + rpos, rsq, mask=_band(rmask, o_rsq >= 0))
                tl.store(SCR + o_rsum + rpos, rsum, mask=_band(rmask, o_rsum >= 0))
    if STATS:
        if COLACC:
            cm0 = (ys < ny) & ((cb + ys * cy) < cend)
            tl.store(SCR + o_csq + ys * cy, cacc_sq, mask=_band(cm0, o_csq >= 0))
            tl.store(SCR + o_csum + ys * cy, cacc_sum, mask=_band(cm0, o_csum >= 0))
        if VECM:
            tl.store(SCR + o_csq, tl.sum(vsq, axis=0), mask=o_csq >= 0)
            tl.store(SCR + o_csum, tl.sum(vsum, axis=0), mask=o_csum >= 0)
        if GRAM_R:
            tl.store(SCR + o_gr + xs[:, None] * BX + xs[None, :], acc_r, mask=_band(xs[:, None] >= 0, o_gr >= 0))
        if GRAM_C:
            tl.store(SCR + o_gc + ys[:, None] * BY + ys[None, :], acc_c, mask=_band(ys[:, None] >= 0, o_gc >= 0))


@triton.jit
def gram_kernel(P, TAB, SCR, GC: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, BF16: tl.constexpr,
                HALF: tl.constexpr):
    pid = tl.program_id(0)
    tp = TAB + pid * GC
    base_a = tl.load(tp + 0)
    base_b = tl.load(tp + 1)
    sm = tl.load(tp + 2)
    na = tl.load(tp + 3)
    nb = tl.load(tp + 4)
    nloop = tl.load(tp + 5)
    sloop = tl.load(tp + 6)
    nvec = tl.load(tp + 7)
    svec = tl.load(tp + 8)
    out = tl.load(tp + 9)
    ms = tl.arange(0, BM)
    cs = tl.arange(0, BC)
    acc = tl.zeros([BM, BM], dtype=tl.float64)
    for l in range(0, nloop):
        for c0 in range(0, nvec, BC):
            cc = c0 + cs
            cm = cc < nvec
            coff = l * sloop + cc * svec
            oa = base_a + ms[:, None] * sm + coff[None, :]
            ob = base_b + ms[:, None] * sm + coff[None, :]
            ma = (ms < na)[:, None] & cm[None, :]
            mb = (ms < nb)[:, None] & cm[None, :]
            if HALF:
                a = _load16_f64(P, oa, ma, BF16)
                b = _load16_f64(P, ob, mb, BF16)
            else:
                a = _load_vals(P + oa, ma, BF16, True)
                b = _load_vals(P + ob, mb, BF16, True)
            acc += tl.dot(a, tl.trans(b))
    tl.store(SCR + out + ms[:, None] * BM + ms[None, :], acc)


@triton.jit
def csr_sum_kernel(SCR, INDPTR, SLOTS, BLKMAX, OUT, n_out, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    o = pid * BLOCK + tl.arange(0, BLOCK)
    om = o < n_out
    start = tl.load(INDPTR + o, mask=om, other=0)
    end = tl.load(INDPTR + o + 1, mask=om, other=0)
    nmax = tl.load(BLKMAX + pid)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for j in range(0, nmax):
        k = start + j
        km = k < end
        s = tl.load(SLOTS + k, mask=km, other=0)  # slot, or -(slot + 1) for a negative term
        neg = s < 0
        v = tl.load(SCR + tl.where(neg, -s - 1, s), mask=km, other=0.0)
        acc += tl.where(neg, -v, v)
    tl.store(OUT + o, acc, mask=om)


# ---------------------------------------------------------------------------------------
# Launch helpers (pure functions of tensors and tables)
# ---------------------------------------------------------------------------------------

def _bits(t):
    """bf16 buffers travel as their int16 bit patterns."""
    if t is not None and t.dtype == torch.bfloat16:
        return t.view(torch.int16)
    return t


def split_scalar(x: float):
    """(hi, mid, lo) fp32 parts: hi = fp32(x) (what torch uses for fp32 tensors) and
    (hi + mid) + lo == x exactly in float64 (what fp64 buffers use)."""
    hi = float(np.float32(x))
    mid = float(np.float32(x - hi))
    lo = float(np.float32(x - hi - mid))
    return hi, mid, lo


def launch_sgd_stats(p_flat, g_flat, m_flat, tiles, active, hasbuf, scratch, *, block, vec, gram_r, gram_c,
                     stats, update, colacc=False, aligned=False, galigned=False, goff=None, lr=0.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False, grad_scale=None, found_inf=None, scale=None, mscale=None, idx64=False,
                     num_warps=None):
    """One launch over the rows of `tiles` (int64 [n, NCOL]) of one flat buffer.

    `scale` (statistics-only launches): (factors, seg_table) — the projection's diagonal action
    applied to every element before its statistics are formed, on the parameters and (when
    `m_flat` is given) the momentum: x ← x · F[oA + sA·iA(e)] · F[oB + sB·iB(e)] with F a float64
    factor buffer and seg_table int64 [n_segments, 9] rows (oA, sA, postA, dimA, oB, sB, postB,
    dimB, on) as in `triton_kernels.project` (segments with on = 0 are read, not written).
    `mscale` (update launches with momentum): (factors, seg_table) in the same layout — the
    transport a lazy projection owes the momentum buffer (`consopt.fused.MomentumTransport`),
    applied to every element with a buffer as it is loaded (m ← m · fA · fB, rounded once, bitwise
    what applying it in a pass of its own and then stepping gives), and stored for elements this
    step does not update.
    `idx64`: segment-local indices need int64 (a segment of ≥ 2³¹ elements).

    `goff` (int64 [n_segments], optional): element offset of each segment's grad relative to
    `g_flat` (default: the grad of segment s sits at the segment's own base in `g_flat`).
    `aligned`: every tile satisfies consopt.fused._aligned (the kernel then uses 128-bit accesses);
    `galigned`: moreover every entry of `goff` is a multiple of 4 (grads get them too).

    `lr` is a float or a 0-dim tensor on the buffer's device (read in-kernel); momentum,
    dampening, weight_decay are runtime scalars (no recompilation when they change;
    `momentum != 0`, `weight_decay != 0`, nesterov and maximize are compile-time flags)."""
    n = int(tiles.shape[0])
    if n == 0:
        return
    if scale is not None and update:
        raise ValueError("launch_sgd_stats: `scale` applies to statistics-only launches (update=False)")
    bx, by = block
    bf16 = p_flat.dtype == torch.bfloat16
    f64 = p_flat.dtype == torch.float64
    use_mom = bool(update and momentum != 0)
    has_wd = bool(update and weight_decay != 0)
    lr_ptr = lr if torch.is_tensor(lr) else None
    lr3 = (0.0, 0.0, 0.0) if lr_ptr is not None else split_scalar(float(lr))
    wd3 = split_scalar(float(weight_decay))
    mo3 = split_scalar(float(momentum))
    dm3 = split_scalar(1.0 - float(dampening))
    P = _bits(p_flat)
    dummy = scratch
    G = _bits(g_flat) if update else P
    scale_m = scale is not None and m_flat is not None
    Mb = _bits(m_flat) if (use_mom or scale_m) else P
    mscale_on = use_mom and mscale is not None
    fac, fseg = scale if scale is not None else (mscale if mscale_on else (scratch, tiles))
    kw = {"num_warps": num_warps if num_warps is not None else WARPS.get((bx, by), 4 if bx * by <= 1024 else 8)}
    sgd_stats_kernel[(n,)](
        P, G, Mb, tiles, active if update else tiles, hasbuf if use_mom else tiles,
        goff if (update and goff is not None) else tiles, scratch, fac, fseg,
        *lr3, lr_ptr if lr_ptr is not None else dummy, *wd3, *mo3, *dm3,
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        NC=NCOL, BX=bx, BY=by, VECM=bool(vec), GRAM_R=bool(gram_r), GRAM_C=bool(gram_c),
        COLACC=bool(colacc and stats), STATS=bool(stats),
        UPDATE=bool(update), USE_MOM=use_mom, NESTEROV=bool(update and nesterov and use_mom),
        MAXIMIZE=bool(update and maximize), HAS_WD=has_wd, LR_FROM_PTR=lr_ptr is not None,
        HAS_GS=bool(update and grad_scale is not None), HAS_INF=bool(update and found_inf is not None),
        BF16=bf16, F64=f64, HAS_GOFF=bool(update and goff is not None), HALF=p_flat.element_size() == 2,
        ALIGNED=bool(aligned), GALIGNED=bool(aligned and galigned and update and goff is not None),
        SCALE=scale is not None, SCALE_M=scale_m, MSCALE=mscale_on, IDX64=bool(idx64), **kw,
    )


def launch_gram(p_flat, table, scratch, num_warps=None):
    n = int(table.shape[0])
    if n == 0:
        return
    kw = {"num_warps": 8 if num_warps is None else num_warps}
    gram_kernel[(n,)](_bits(p_flat), table, scratch, GC=GCOL, BM=BIG_GRAM_BM, BC=BIG_GRAM_BC,
                      BF16=p_flat.dtype == torch.bfloat16, HALF=p_flat.element_size() == 2, **kw)


def encode_signed_slots(slots: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """CSR entries: slot for a + term, -(slot + 1) for a - term; int32 when the slots fit."""
    enc = np.where(signs > 0, slots, -slots - 1)
    small = enc.size == 0 or (enc.min() >= -(2 ** 31) and enc.max() < 2 ** 31)
    return enc.astype(np.int32 if small else np.int64)


def launch_csr_sum(scratch, indptr, slots, blkmax, out):
    """out[o] = Σ_{k in [indptr[o], indptr[o+1])} ±scratch[|slots[k]|] in fixed order (deterministic)."""
    n_out = int(out.numel())
    if n_out == 0:
        return
    grid = (triton.cdiv(n_out, CSR_BLOCK),)
    csr_sum_kernel[grid](scratch, indptr, slots, blkmax, out, n_out, BLOCK=CSR_BLOCK)
