"""The diagonal symmetry action of the projection mode, in one launch over a flat buffer.

``symmetry_apply_kernel`` rewrites segments of a flat parameter buffer (and, in the same program,
the matching segments of the momentum buffer) as

    θ[e] ← θ[e] · F[oA + sA·iA(e)] · F[oB + sB·iB(e)]  +  c(i0) · D[so(i0) + sk(i0)·(e mod K)]
    m[e] ← m[e] · F[oA + sA·iA(e)] · F[oB + sB·iB(e)]

for every element e (the offset inside its segment) of every tile in an integer table, where

* iA(e) = (e // postA) mod dimA and likewise iB: the index of e along any two axes of the
  tensor (axis a of shape (n_0, …, n_{d−1}) has post = n_{a+1}·…·n_{d−1}, dim = n_a). F is one
  flat float64 buffer of per-(tensor, axis, index) factors with F[0] = 1: a factor that a
  segment does not have is (o, s) = (0, 0). This is the rescale action a_j on producer slices,
  1/a_j on consumer slices, of every diagonal law at once.
* the additive part is the translation action (W → W + 1vᵀ, b → b + t), by rows: i0 = e // K
  (K = numel / n_0), and a per-row table (CT float64 coefficients, RT int64 pairs
  (so, sk)) says which entry of the shift vector D the row adds, scaled by c(i0) (0 for rows
  no translation touches). Momentum is a velocity and a translation does not change it.

``matrix_apply_kernel`` applies the matrix actions (attention heads, linear laws): for every
slice of an integer table, x[i, j] = buf[base + i·si + j·sj] (i < r units, j in [c0, c1)),

    x ← A x,   A = G[goff : goff + r²] as an r×r float64 matrix,

on the parameters and, in the same program, the momentum: one read and one write of each
instead of torch's gather / float64 copy / bmm / round / scatter (about 48 bytes per float32
element and buffer). The product is a float64 ``tl.dot`` of exactly widened values, rounded once
to the element type (fp16/bf16 through fp32, as torch's ``.to()`` does): the result equals the
torch path's ``(A @ x.double()).to(dtype)`` up to the order of the float64 additions.

Arithmetic: the value is widened to float64 (bf16 through its bit pattern), multiplied by the
two factors in that order, and rounded to the buffer's dtype once — through float32 for
fp16/bf16, as torch's ``.to()`` does — so for the multiplicative part the result is bitwise
``(x.double() * fA * fB).to(dtype)``. Segment-local indices use int32 (segments < 2³¹
elements) unless IDX64. No atomics; every element is written by exactly one program.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .sgd_stats import _bits, _ct, _load16_f64, _round_store

# Tile table layout (int64, one row of ACOL per program)
A_BASE, A_E0, A_E1, A_NBLK = range(4)
A_OA, A_SA, A_POSTA, A_DIMA = range(4, 8)
A_OB, A_SB, A_POSTB, A_DIMB = range(8, 12)
A_OC, A_SC, A_KROW, A_MF = range(12, 16)
ACOL = 16

APPLY_BLOCK = 1024  # elements per inner iteration
APPLY_TILE = 16384  # elements per program (the planner's default)

# Matrix-action table layout (int64, one row of MCOL per program)
X_BASE, X_SI, X_SJ, X_C0, X_C1, X_GOFF = range(6)
MCOL = 6
MATRIX_BS = 32  # slice columns per inner iteration (and r padded to R >= 16: tl.dot shapes every dtype takes)
MATRIX_TILE = 512  # slice columns per program
MATRIX_MAX_R = 64  # larger r: the batched torch matmul (an [R, R] float64 block per program)


@triton.jit
def symmetry_apply_kernel(P, M, F, CT, RT, D, TAB, NC: tl.constexpr, BLOCK: tl.constexpr, HAS_M: tl.constexpr,
                          SHIFT: tl.constexpr, BF16: tl.constexpr, F64: tl.constexpr, IDX64: tl.constexpr):
    # Helpers are written out inline: the interpreter re-patches triton.language on every
    # nested @jit call, which would dominate the CPU test time.
    pid = tl.program_id(0)
    tp = TAB + pid * NC
    base = tl.load(tp + 0)
    e0 = tl.load(tp + 1)
    e1 = tl.load(tp + 2)
    nblk = tl.load(tp + 3)
    oa = tl.load(tp + 4)
    sa = tl.load(tp + 5)
    posta = tl.load(tp + 6)
    dima = tl.load(tp + 7)
    ob = tl.load(tp + 8)
    sb = tl.load(tp + 9)
    postb = tl.load(tp + 10)
    dimb = tl.load(tp + 11)
    oc = tl.load(tp + 12)
    sc = tl.load(tp + 13)
    krow = tl.load(tp + 14)
    mf = tl.load(tp + 15)
    if not IDX64:  # segment-local index arithmetic in int32 (cheaper division on the GPU)
        e1 = e1.to(tl.int32)
        posta = posta.to(tl.int32)
        dima = dima.to(tl.int32)
        postb = postb.to(tl.int32)
        dimb = dimb.to(tl.int32)
        krow = krow.to(tl.int32)
    ar = tl.arange(0, BLOCK)
    for j in range(0, nblk):
        start = e0 + j * BLOCK
        if not IDX64:
            start = start.to(tl.int32)
        e = start + ar
        mask = e < e1
        fa = tl.load(F + oa + sa * ((e // posta) % dima), mask=mask, other=1.0)
        fb = tl.load(F + ob + sb * ((e // postb) % dimb), mask=mask, other=1.0)
        if HAS_M:
            mmask = (mask.to(tl.int32) * (mf != 0).to(tl.int32)) != 0
        # load, widened to float64 (bf16 through its bit pattern: a shift into fp32)
        if BF16:
            x = (tl.load(P + base + e, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(
                tl.float32, bitcast=True).to(tl.float64)
            if HAS_M:
                z = (tl.load(M + base + e, mask=mmask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(
                    tl.float32, bitcast=True).to(tl.float64)
        else:
            x = tl.load(P + base + e, mask=mask, other=0).to(tl.float64)
            if HAS_M:
                z = tl.load(M + base + e, mask=mmask, other=0).to(tl.float64)
        y = x * fa * fb
        if SHIFT:
            i0 = e // krow
            ri = oc + sc * i0
            c = tl.load(CT + ri, mask=mask, other=0.0)
            so = tl.load(RT + 2 * ri, mask=mask, other=0)
            sk = tl.load(RT + 2 * ri + 1, mask=mask, other=0)
            moved = c != 0.0
            d = tl.load(D + so + sk * (e % krow), mask=(mask.to(tl.int32) * moved.to(tl.int32)) != 0, other=0.0)
            y = tl.where(moved, y + c * d, y)
        if HAS_M:
            z = z * fa * fb
        # round once to the element type (fp16/bf16 through fp32, as torch's .to() does)
        if F64:
            tl.store(P + base + e, y, mask=mask)
            if HAS_M:
                tl.store(M + base + e, z, mask=mmask)
        elif BF16:  # round to nearest even on the fp32 bit pattern (NaN stays a quiet NaN)
            b = y.to(tl.float32).to(tl.uint32, bitcast=True)
            r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            r = tl.where(y != y, (b >> 16) | 0x40, r)
            tl.store(P + base + e, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
            if HAS_M:
                b = z.to(tl.float32).to(tl.uint32, bitcast=True)
                r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
                r = tl.where(z != z, (b >> 16) | 0x40, r)
                tl.store(M + base + e, r.to(tl.uint16).to(tl.int16, bitcast=True), mask=mmask)
        else:
            tl.store(P + base + e, y.to(tl.float32).to(P.dtype.element_ty), mask=mask)
            if HAS_M:
                tl.store(M + base + e, z.to(tl.float32).to(M.dtype.element_ty), mask=mmask)


def plan_tiles(rows, tile: int = APPLY_TILE, block: int = APPLY_BLOCK) -> np.ndarray:
    """Tile rows from per-segment rows [base, numel, oA, sA, postA, dimA, oB, sB, postB, dimB,
    oC, sC, K, mf]: each segment cut into programs of at most `tile` elements."""
    tile = max(block, (tile // block) * block)
    out = []
    for r in rows:
        base, numel = int(r[0]), int(r[1])
        for e0 in range(0, numel, tile):
            e1 = min(e0 + tile, numel)
            out.append([base, e0, e1, -(-(e1 - e0) // block)] + [int(v) for v in r[2:]])
    return np.asarray(out, dtype=np.int64).reshape(-1, ACOL)


def launch_symmetry_apply(p_flat, m_flat, factors, table, *, coef=None, rowtab=None, shift=None,
                          block: int = APPLY_BLOCK, idx64: bool = False, num_warps: int = 4):
    """One launch over the tiles of `table` (int64 [n, ACOL]) of one flat buffer.

    p_flat / m_flat: the flat parameter and momentum buffers (m_flat None: no momentum);
    factors: float64 factor buffer (F[0] = 1); coef / rowtab / shift: the translation tables
    (float64 per-row coefficients with a leading 0, int64 (so, sk) pairs per row, float64 shift
    vector), or None when no tile of this table translates."""
    n = int(table.shape[0])
    if n == 0:
        return
    shift_on = shift is not None
    if not shift_on:
        coef, rowtab, shift = factors, table, factors  # never read
    P = _bits(p_flat)
    Mb = _bits(m_flat) if m_flat is not None else P
    symmetry_apply_kernel[(n,)](
        P, Mb, factors, coef, rowtab, shift, table, NC=ACOL, BLOCK=block, HAS_M=m_flat is not None,
        SHIFT=shift_on, BF16=p_flat.dtype == torch.bfloat16, F64=p_flat.dtype == torch.float64,
        IDX64=bool(idx64), num_warps=num_warps,
    )


@triton.jit
def _matrix_tile(B, A, off, mask, ident, BF16: tl.constexpr, HALF: tl.constexpr, F64: tl.constexpr):
    """B[off] ← A · B[off] for one [R, BS] block: widened exactly to float64 (16-bit elements
    through 32-bit words, see _load16_f64), a float64 tl.dot, rounded once to the element type
    (fp16/bf16 through fp32, as torch's .to() does). Where A is the identity (`ident`: a skipped
    family) the block is stored as it was: the product would turn an inf into NaNs (0 · inf)."""
    if HALF:
        x = _load16_f64(B, off, mask, BF16)
    else:
        x = tl.load(B + off, mask=mask, other=0).to(tl.float64)
    st, _y = _round_store(_ct(tl.where(ident, x, tl.dot(A, x)), F64), B, BF16, F64)
    tl.store(B + off, st, mask=mask)


@triton.jit
def matrix_apply_kernel(P, M, G, TAB, r, NC: tl.constexpr, R: tl.constexpr, BS: tl.constexpr, HAS_M: tl.constexpr,
                        BF16: tl.constexpr, HALF: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    tp = TAB + pid * NC
    base = tl.load(tp + 0)
    si = tl.load(tp + 1)
    sj = tl.load(tp + 2)
    c0 = tl.load(tp + 3)
    c1 = tl.load(tp + 4)
    go = tl.load(tp + 5)
    ri = tl.arange(0, R)
    rm = ri < r
    A = tl.load(G + go + ri[:, None] * r + ri[None, :], mask=rm[:, None] & rm[None, :], other=0.0)
    eye = tl.where((ri[:, None] == ri[None, :]) & rm[:, None], 1.0, 0.0)
    ident = tl.max(tl.max(tl.abs(A - eye), axis=1), axis=0) == 0
    cs = tl.arange(0, BS)
    for c in range(c0, c1, BS):
        cols = c + cs
        mask = rm[:, None] & (cols < c1)[None, :]
        off = base + ri[:, None] * si + cols[None, :] * sj
        _matrix_tile(P, A, off, mask, ident, BF16, HALF, F64)
        if HAS_M:
            _matrix_tile(M, A, off, mask, ident, BF16, HALF, F64)


def matrix_rows(bases, sels, r: int, si: int, sj: int, S: int, tile: int = MATRIX_TILE) -> list:
    """Table rows [base, si, sj, c0, c1, goff] of slices x[i, j] = buf[base + i·si + j·sj] (r × S),
    slice k acted on by matrix sels[k] of a float64 [n, r, r] stack, cut into programs of at most
    `tile` columns."""
    out = []
    for b0, sel in zip(bases, sels):
        for c0 in range(0, S, tile):
            out.append([int(b0), int(si), int(sj), c0, min(c0 + tile, S), int(sel) * r * r])
    return out


def launch_matrix_apply(p_flat, m_flat, mats, table, r: int, *, num_warps: int | None = None):
    """One launch over the slices of `table` (int64 [n, MCOL]) of one flat buffer: every slice
    x ← A x with A its r×r matrix of `mats` (float64 [k, r, r]); the momentum (m_flat, or None)
    takes the same action. r <= MATRIX_MAX_R."""
    n = int(table.shape[0])
    if n == 0:
        return
    if not 1 <= r <= MATRIX_MAX_R:
        raise ValueError(f"launch_matrix_apply: r = {r} outside 1..{MATRIX_MAX_R}")
    if mats.dtype != torch.float64:
        raise ValueError(f"launch_matrix_apply: the matrices must be float64, got {mats.dtype}")
    R = max(16, triton.next_power_of_2(r))
    if num_warps is None:  # (an [R, R] float64 matrix in registers: 8 warps for R = 64, sized with ptxas)
        num_warps = 8 if R >= 64 else 4
    P = _bits(p_flat)
    Mb = _bits(m_flat) if m_flat is not None else P
    matrix_apply_kernel[(n,)](
        P, Mb, mats.contiguous().reshape(-1), table, r, NC=MCOL, R=R, BS=MATRIX_BS, HAS_M=m_flat is not None,
        BF16=p_flat.dtype == torch.bfloat16, HALF=p_flat.element_size() == 2, F64=p_flat.dtype == torch.float64,
        num_warps=num_warps,
    )
