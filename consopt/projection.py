"""Projection back onto the conserved level set {h(θ) = h(θ_0)}.

Two modes (SPEC §4, `consopt.SGD(..., projection=...)`):

* ``"symmetry"``: act with each law's own symmetry group, so the network's function is unchanged:
    - diagonal families (rescale, gate, diagonal stream): unit j's producer slices × a_j, its
      consumer slices ÷ a_j, with u = a_j² the positive root of p u² − h₀ u − c = 0
      (p, c: the producer and consumer sums of squares) — closed form;
    - matrix families (linear, stream, attention QK/VO): producers M_p → A M_p, consumers
      M_c → A⁻ᵀ M_c with A = Π (I + X_i), X_i symmetric, Newton steps on A P Aᵀ − A⁻ᵀ C A⁻¹ = H₀
      whose linearisation X S + S X = R (S = P + C) is a Lyapunov equation solved in S's eigenbasis;
    - translation: W → W + 1vᵀ, b → b + t (exact in one step); per-channel bias: b = h₀;
    - approximate scale laws: the producer slice × √(h₀ / h).
  This generalises ENorm (Stock et al., ICLR 2019) from balancing to restoring h(θ₀) exactly.
* ``"euclidean"``: the nearest point (Euclidean) on the level set, for comparison:
  P' = (I − Λ)⁻¹ P, C' = (I + Λ)⁻¹ C with the Lagrange multiplier Λ (a scalar per unit for
  diagonal laws, a symmetric matrix for matrix laws) found by Newton iterations; the linear
  (translation) and scale cases coincide with the symmetry projection.

Families share parameters (a layer's rows belong to one law, its columns to the next), so
rounds over all families repeat until every residual is below `tol` × the family's scale
(`tol` is raised to 2 × the machine epsilon of float32/bf16/fp16 parameters: their stored values
cannot get much closer; rounds also stop when the residual stops shrinking).

Momentum buffers are transported by the symmetry action itself: a buffer is a velocity
(−Δθ/τ), and under a linear change of coordinates θ' = gθ velocities map as v' = g v, so each
buffer slice is multiplied by the same factor (a_j, 1/a_j, A, A⁻ᵀ) as its parameter slice;
translations leave velocities unchanged. The Euclidean projection is not a group action and
leaves momentum buffers as they are.

A unit whose producer or consumer side is all zero (a dead unit) cannot be rescaled onto the
level set: it is skipped and counted, never turned into NaN.

`project` works on any parameter tensors, family by family (eager torch ops, plain Gauss–Seidel):
the reference. `consopt.SGD(projection="symmetry")` runs the same actions batched by colours of
families (`_ColouredProjector`: families of one colour share no parameter entry, so their actions
are computed at once and commute), in over-relaxed Gauss–Seidel rounds:

* `TensorProjector` on the parameter tensors (the CPU path, and CUDA off the fused path): the
  statistics from one `LawEvaluator` pass per colour (the native C++ statistics on the CPU), one
  native apply pass per tensor (`consopt.native.ScaleApply`), a bmm per matrix slice pattern;
* `FlatProjector` on the flat buffers of the fused path (`consopt.fused`): the statistics from the
  fused statistics kernels and one `triton_kernels.project` launch per buffer; a colour of
  diagonal families only is applied inside the next statistics pass, and the first measurement
  is the fused step's own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np
import torch

from .laws import Family, FamilyValues, LawSet, Term


@dataclasses.dataclass
class ProjectionStats:
    rounds: int = 0
    skipped: int = 0  # units / directions that could not be moved onto the level set
    max_residual: float = 0.0  # max over families of max |h − h₀| / scale after the last round
    converged: bool = True
    relaxation: float = 1.0  # the over-relaxation factor ω of the last rounds (1: plain Gauss–Seidel)


def _read(term, p):
    return term.slices(p).to(torch.float64)


def _write(term, p, m):
    """Write the [units, K] float64 slice `m` back into parameter `p` (in p's dtype)."""
    idx = term.index.to(p.device)
    view = p.movedim(term.axis, 0)
    if term.groups > 1:  # refined axis (grouped conv): position j·G + g is block g of slice j
        G = term.groups
        view = view.view(view.shape[0], G, view.shape[1] // G, *view.shape[2:])
        shape = (idx.shape[0], idx.shape[1]) + tuple(view.shape[2:])
        view[idx // G, idx % G] = m.reshape(shape).to(p.dtype)
        return
    shape = (idx.shape[0], idx.shape[1]) + tuple(view.shape[1:])
    view[idx] = m.reshape(shape).to(p.dtype)


class _Slices:
    """The family's slices of the current parameters (and buffers), split by sign."""

    def __init__(self, fam: Family, params: dict, buffers: dict | None):
        self.fam = fam
        self.params = params
        self.buffers = buffers or {}
        self.m = [_read(t, params[t.param]) for t in fam.terms]
        self.b = [(_read(t, self.buffers[t.param]) if t.param in self.buffers else None) for t in fam.terms]

    def sums(self):
        pos = [m for m, t in zip(self.m, self.fam.terms) if t.sign > 0]
        neg = [m for m, t in zip(self.m, self.fam.terms) if t.sign < 0]
        return pos, neg

    def store(self):
        for t, m, b in zip(self.fam.terms, self.m, self.b):
            _write(t, self.params[t.param], m)
            if b is not None:
                _write(t, self.buffers[t.param], b)


def _gram(ms, matrix: bool):
    if not ms:
        return None
    if matrix:
        return sum(m @ m.T for m in ms)
    return sum((m * m).sum(1) for m in ms)


def _diag_symmetry(s: _Slices, h0, euclid: bool):
    pos, neg = s.sums()
    p = _gram(pos, False)
    c = _gram(neg, False)
    if euclid:
        # nearest point: x/(1−λ), y/(1+λ) with p/(1−λ)² − c/(1+λ)² = h₀ (Newton from λ = 0)
        lam = torch.zeros_like(p)
        for _ in range(60):
            f = p / (1 - lam) ** 2 - c / (1 + lam) ** 2 - h0
            df = 2 * p / (1 - lam) ** 3 + 2 * c / (1 + lam) ** 3
            step = torch.where(df > 0, f / df, torch.zeros_like(f))
            lam = (lam - step).clamp(-0.9, 0.9)
            if float(step.abs().max()) < 1e-17:
                break
        ok = (p + c > 0) & torch.isfinite(lam)
        up, down = torch.where(ok, 1 / (1 - lam), torch.ones_like(lam)), torch.where(ok, 1 / (1 + lam), torch.ones_like(lam))
        move_buffers = False
    else:
        a, ok = _rescale(p, c, h0)
        up, down = a, 1 / a
        move_buffers = True
    for i, t in enumerate(s.fam.terms):
        f = up if t.sign > 0 else down
        s.m[i] = s.m[i] * f[:, None]
        if move_buffers and s.b[i] is not None:
            s.b[i] = s.b[i] * f[:, None]
    return ok


def _rescale(p, c, h0):
    """The unit scale a of the symmetry action onto ‖a·prod‖² − ‖cons/a‖² = h₀ (p, c: the producer
    and consumer sums of squares): u = a² is the positive root of p u² − h₀ u − c = 0 (u = −c/h₀
    when the producer side is zero). Returns (a, ok); a = 1 where no positive root exists."""
    disc = h0 * h0 + 4 * p * c
    root = torch.sqrt(disc.clamp_min(0))
    # h₀ < 0: the conjugate form 2c / (√disc − h₀), free of the cancellation in h₀ + √disc when
    # 4pc ≪ h₀² (a small producer against a large consumer: a BatchNorm's affine feeding a wide
    # conv left 5e-12 in float64); it is −c/h₀ when p = 0
    u = torch.where(h0 < 0, 2 * c / (root - h0),
                    torch.where(p > 0, (h0 + root) / (2 * p).clamp_min(1e-300), -c / h0))
    ok = (p + c > 0) & torch.isfinite(u) & (u > 0)
    return torch.where(ok, torch.sqrt(torch.where(ok, u, torch.ones_like(u))), torch.ones_like(u)), ok


_LYAP_INEXACT = 1e-3  # relative Lyapunov residual accepted from a cached eigenbasis (inexact Newton)


def _pcg(matvec, b: torch.Tensor, pre: torch.Tensor, done, max_iter: int, check_every: int = 1) -> torch.Tensor:
    """Conjugate gradients on A x = b (A symmetric PSD, applied by `matvec`), preconditioned by
    the diagonal `pre` (x ← pre·x), from x = 0: until `done(r)` holds for the residual r = b − Ax
    (asked every `check_every` iterations: the only host syncs, with the curvature's sign), a
    direction of non-positive curvature turns up (no step along it), or after `max_iter` products."""
    x = torch.zeros_like(b)
    r = b.clone()
    z = pre * r
    q = z.clone()
    rz = (r * z).sum()
    alive = torch.ones((), dtype=torch.bool, device=b.device)  # no non-positive curvature met yet
    for it in range(max_iter):
        if it % check_every == 0 and (done(r) or not bool(alive)):
            break
        Aq = matvec(q)
        qAq = (q * Aq).sum()
        alive = alive & (qAq > 0)  # (from then on no step is taken)
        alpha = torch.where(alive, rz / torch.where(qAq > 0, qAq, 1), 0)
        x = x + alpha * q
        r = r - alpha * Aq
        z = pre * r
        rz_new = (r * z).sum()
        q = z + torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1), 0) * q
        rz = rz_new
    return x


def _joint_rescale(p, c, h0, couplings, tol: float = 1e-14, newton: int = 30):
    """The rescale actions of coupled diagonal families at once: log-scales d (a = e^d per unit)
    with h(d) = h₀, by Newton's method (preconditioned conjugate gradients inside) on the unit scales.

    A unit's producer sum p and consumer sum c split into the parts in tensors scaled along one
    axis only (they move as e^{±2d_u}) and the parts in `couplings`, tensors scaled along two
    axes (a layer's rows by its units, its columns by the previous layer's, or both by one family).
    Each coupling is (Q, ua, sa, ub, sb), batched over k tensors of one shape: Q [k, n_a, n_b] the
    squares of a tensor's entries summed per (slot i of axis a, slot j of axis b), in float32 or
    float64; ua / ub the unit owning each slot (−1: none), sa / sb its sign (+1 producer, −1
    consumer, 0 none). Entry (i, j) moves by e^{2 sa_i d(ua_i) + 2 sb_j d(ub_j)}, so h_u = (own-axis
    parts) + Σ σ · (a row or column sum of the weighted Q); the sums are taken as the exact float64
    marginals of Q plus Q times (weight − 1), so Q's own precision only touches the correction.
    The Jacobian is the Hessian of the convex potential ½‖g·θ‖² − ⟨h₀, d⟩, so Newton converges
    quadratically where Gauss–Seidel over the units converges linearly at the rate the couplings
    set (ρ ≈ 0.46 for a LayerNorm feeding an MLP). Each Newton step is scaled as a whole to
    |Δd| ≤ 0.5 and halved while it does not lower max |h − h₀| / (p + c); the iteration stops at
    `tol`. Conjugate gradients stop at a residual ≤ 1e-3 of Newton's (inexact Newton) or ≤ tol / 10.
    Units with no positive root (`_rescale`'s ok) keep d = 0. Returns (a, ok); if the solve does
    not lower the residual, `_rescale`'s per-unit closed form instead."""
    a_sep, ok = _rescale(p, c, h0)
    n = p.numel()
    if n == 0:
        return a_sep, ok
    dev = p.device
    # all couplings' owned slots as one scatter: (unit, sign) per slot, axis a then b of each batch
    sgn, pos, tgt = [], [], []
    for _, ua, sa, ub, sb in couplings:
        u = torch.cat([ua.reshape(-1), ub.reshape(-1)])
        sgn.append(torch.cat([sa.reshape(-1), sb.reshape(-1)]))
        pos.append(torch.nonzero(u >= 0).reshape(-1))  # index tensors: no boolean masks (no syncs)
        tgt.append(u.index_select(0, pos[-1]))
    tgt = torch.cat(tgt)

    def scatter(vals):  # Σ over the owned slots of each coupling into the units
        out = torch.zeros(n, dtype=torch.float64, device=dev)
        return out.index_add_(0, tgt, torch.cat([v.reshape(-1).index_select(0, q) for v, q in zip(vals, pos)]))

    def mv(Q, w):  # Q [k, na, nb] @ w [k, nb] in Q's dtype, returned in float64
        return (Q @ w.to(Q.dtype)[..., None])[..., 0].to(torch.float64)

    def vm(w, Q):  # w [k, na] @ Q
        return (w.to(Q.dtype)[:, None, :] @ Q)[:, 0].to(torch.float64)

    marg = [(Q.sum(2, dtype=torch.float64), Q.sum(1, dtype=torch.float64)) for Q, *_ in couplings]
    rows0 = [torch.cat([ra.reshape(-1), rb.reshape(-1)]) for ra, rb in marg]
    pq = scatter([torch.where(sg > 0, r, torch.zeros_like(r)) for r, sg in zip(rows0, sgn)])
    cq = scatter([torch.where(sg < 0, r, torch.zeros_like(r)) for r, sg in zip(rows0, sgn)])
    p1, c1 = (p - pq).clamp_min(0), (c - cq).clamp_min(0)  # the own-axis parts
    scale = (p + c).clamp_min(1e-300)
    okf = ok.to(torch.float64)

    def state(d):
        """weights, the coupled row / column sums, h and the diagonal parts of the Jacobian at d."""
        ws = []
        for (Q, ua, sa, ub, sb), (ra, rb) in zip(couplings, marg):
            wa = torch.exp(2 * sa * d[ua.clamp_min(0)])  # sa = 0 where unowned: weight 1
            wb = torch.exp(2 * sb * d[ub.clamp_min(0)])
            ws.append((wa, wb, ra + mv(Q, wb - 1), rb + vm(wa - 1, Q)))
        e = torch.exp(2 * d)
        terms = [torch.cat([(wa * qwb).reshape(-1), (wb * qwa).reshape(-1)]) for wa, wb, qwb, qwa in ws]
        h = p1 * e - c1 / e + scatter([sg * t for sg, t in zip(sgn, terms)])
        own = 2 * (p1 * e + c1 / e)
        return ws, h, own, own + scatter([2 * t for t in terms])

    def jv(v, ws, own):
        vals = []
        for (Q, ua, sa, ub, sb), (wa, wb, qwb, qwa) in zip(couplings, ws):
            dwa = 2 * sa * v[ua.clamp_min(0)] * wa
            dwb = 2 * sb * v[ub.clamp_min(0)] * wb
            vals.append(torch.cat([(2 * v[ua.clamp_min(0)] * wa * qwb + sa * wa * mv(Q, dwb)).reshape(-1),
                                   (2 * v[ub.clamp_min(0)] * wb * qwa + sb * wb * vm(dwa, Q)).reshape(-1)]))
        return own * v + scatter(vals)

    def residual(h):
        r = (h0 - h) * okf
        return r, float((r.abs() / scale).max())

    d = torch.zeros(n, dtype=torch.float64, device=dev)
    ws, h, own, diag = state(d)
    r, res = residual(h)
    res0 = res
    for _ in range(newton):
        if res <= tol:
            break
        stop = max(tol / 10, 1e-3 * res)
        x = _pcg(lambda q: jv(q, ws, own) * okf, r, okf / diag.clamp_min(1e-300),  # J x = r
                 lambda rr: float((rr.abs() / scale).max()) <= stop, 200, check_every=4)
        big = float(x.abs().max()) if n else 0.0
        if big > 0.5:
            x = x * (0.5 / big)
        for _ in range(6):  # backtracking: take the step only where it lowers the residual
            trial = state(d + x)
            r_t, res_t = residual(trial[1])
            if res_t < res:
                d = d + x
                (ws, h, own, diag), r, res = trial, r_t, res_t
                break
            x = x / 2
        else:
            break  # no descent: stop (a floor of the float arithmetic, or a hard case)
    if res > res0:  # never worse than the separate closed forms
        return a_sep, ok
    a = torch.where(ok, torch.exp(d), torch.ones_like(d))
    return a, ok & torch.isfinite(a)


def _eigh(S):
    """torch.linalg.eigh, on the host for CUDA batches of r > 32: torch's CUDA dispatch (2.10)
    loops cuSOLVER's syevd over the batch above r = 32 (about 2 ms per 64 × 64 matrix: GPT-2's
    288 heads would take ~0.5 s), where LAPACK on the host takes ~0.3 ms per matrix on one core."""
    if S.is_cuda and S.shape[-1] > 32 and S.shape[0] > 1:
        lam, U = torch.linalg.eigh(S.cpu())
        return lam.to(S.device), U.to(S.device)
    return torch.linalg.eigh(S)


class _LyapBasis:
    """The eigenbasis U of a batch S [n, r, r] and the Lyapunov operator's inverse in it: X S + S X
    = R is Y ∘ (λ_i + λ_j) = UᵀRU for Y = UᵀXU. `inv` = 1/(λ_i + λ_j), 0 on dropped directions
    (λ_i + λ_j ≈ 0, `tiny`; `dropped`: whether any, known on the host). `iters`: the conjugate
    gradient iterations the last solve from this basis took (where the next one first checks)."""

    def __init__(self, S):
        lam, self.U = _eigh(S)
        denom = lam[..., :, None] + lam[..., None, :]
        self.tiny = denom.abs() <= 1e-12 * lam.abs().amax(-1).clamp_min(1e-300)[..., None, None]
        self.inv = torch.where(self.tiny, torch.zeros_like(denom), 1 / torch.where(self.tiny, torch.ones_like(denom), denom))
        self.dropped = bool(self.tiny.any())
        self.iters = 0

    @classmethod
    def restore(cls, U, inv, tiny, iters: int) -> "_LyapBasis":
        """A basis saved by `_ColouredProjector.state`."""
        b = cls.__new__(cls)
        b.U, b.inv, b.tiny, b.iters = U, inv, tiny, int(iters)
        b.dropped = bool(tiny.any())
        return b

    def into(self, M):
        """UᵀMU, symmetrised."""
        M = torch.bmm(torch.bmm(self.U.mT, M), self.U)
        return (M + M.mT) / 2

    def out(self, Y):
        """UYUᵀ."""
        return torch.bmm(torch.bmm(self.U, Y), self.U.mT)

    def solve(self, R):
        """X with X S + S X = R for the basis's own S (dropped directions zeroed)."""
        return self.out(self.into(R) * self.inv)


_PCG_MAX = 8  # conjugate gradient iterations from a cached basis before S is decomposed afresh
_PCG_REFRESH = 4  # a solve that took more: the next one decomposes (the basis follows S)


def _lyapunov(S, R, cache: dict | None = None, key=None, inexact: float = _LYAP_INEXACT):
    """Solve X S + S X = R for symmetric X (S symmetric PSD; a batch [..., r, r] solves each).
    Directions with λ_i + λ_j ≈ 0 are dropped. Returns (X, the dropped directions' mask).

    With `cache`, the eigenbasis of an earlier S₀ (same key) preconditions conjugate gradients on
    the Lyapunov operator L(X) = X S + S X, symmetric positive definite on symmetric X for S ≻ 0,
    in that basis: L₀⁻¹ is elementwise there, and one iteration costs one r × r product. While S
    is within ~10 % of S₀ they gain about 10× per iteration (attention heads over 20 training
    steps; the plain refinement X ← X + L₀⁻¹(R − L(X)) stalls there). Accepted at a relative
    residual ≤ `inexact` (an inexact Newton step: the next round's residual absorbs it), first
    checked after as many iterations as the last solve took (one host sync per solve as a rule).
    After `_PCG_MAX` iterations S is decomposed again; after more than `_PCG_REFRESH` the next
    solve decomposes. `eigh` (slow on CUDA, `_eigh`) so runs once in many steps."""
    shape, r = S.shape, S.shape[-1]
    S, R = S.reshape(-1, r, r), R.reshape(-1, r, r)
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit.U.shape == S.shape and not hit.dropped:
        # (a basis with dropped directions cannot tell whether S has gained them back: decompose)
        St, res = hit.into(S), hit.into(R)
        r0 = res.flatten(1).norm(dim=1).clamp_min(1e-300)
        Y = res * hit.inv  # exact for S = S₀
        LY = torch.bmm(Y, St)
        res = res - (LY + LY.mT)
        z = res * hit.inv
        p, rz = z, (res * z).sum((1, 2), keepdim=True)
        check = hit.iters
        for it in range(_PCG_MAX + 1):
            if it == check:
                if float((res.flatten(1).norm(dim=1) / r0).max()) <= inexact:
                    hit.iters = it
                    if it > _PCG_REFRESH:
                        del cache[key]
                    return hit.out(Y).reshape(shape), hit.tiny.reshape(shape)
                check += 1
            if it == _PCG_MAX:
                break
            Lp = torch.bmm(p, St)
            Lp = Lp + Lp.mT
            alpha = rz / (p * Lp).sum((1, 2), keepdim=True).clamp_min(1e-300)
            Y = Y + alpha * p
            res = res - alpha * Lp
            z = res * hit.inv
            rz_next = (res * z).sum((1, 2), keepdim=True)
            p = z + (rz_next / rz.clamp_min(1e-300)) * p
            rz = rz_next
    basis = _LyapBasis(S)
    if cache is not None:
        cache[key] = basis
    return basis.solve(R).reshape(shape), basis.tiny.reshape(shape)


def _newton_action(Xw: torch.Tensor, eye: torch.Tensor) -> tuple:
    """([A; A⁻ᵀ] [2n, r, r], bad [n]) of the steps A = I + Xw of a batch: producers move by A,
    consumers by A⁻ᵀ; a singular or non-finite step is not taken (I in its place, flagged bad)."""
    n = Xw.shape[0]
    A = eye + Xw
    inv = torch.linalg.inv_ex(A)
    step = torch.cat([A, inv.inverse.mT])
    bad = (inv.info != 0) | ~torch.isfinite(step.view(2, n, -1)).all(2).all(0)
    return torch.where(bad.repeat(2)[:, None, None], eye, step), bad


def _identity(g: torch.Tensor) -> torch.Tensor:
    """bool [n, 1, 1]: which of the matrices g [n, r, r] are exactly the identity (a skipped
    family's action: applied as no product at all, since 0 · inf would give NaN)."""
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    return (g == eye).flatten(1).all(1)[:, None, None]


def _matrix_step(s: _Slices, h0, euclid: bool):
    pos, neg = s.sums()
    P = _gram(pos, True)
    C = _gram(neg, True) if neg else torch.zeros_like(P)
    if not bool(torch.isfinite(P).all() and torch.isfinite(C).all()):
        return False  # a non-finite slice: skipped and counted (a product would spread it)
    R = h0 - (P - C)
    R = (R + R.T) / 2
    X, tiny = _lyapunov(P + C, R)
    r = X.shape[0]
    eye = torch.eye(r, dtype=X.dtype, device=X.device)
    if euclid:
        # P' = (I − Λ)⁻¹ P ≈ (I + X) P, C' = (I + Λ)⁻¹ C ≈ (I − X) C to first order; exact inverses keep it a
        # Newton step on the Lagrange conditions.
        up = torch.linalg.inv(eye - X)
        down = torch.linalg.inv(eye + X)
        move_buffers = False
    else:
        up = eye + X
        down = torch.linalg.inv(eye + X).T  # A⁻ᵀ
        move_buffers = True
    for i, t in enumerate(s.fam.terms):
        g = up if t.sign > 0 else down
        s.m[i] = g @ s.m[i]
        if move_buffers and s.b[i] is not None:
            s.b[i] = g @ s.b[i]
    return not bool(tiny.any())


def _translation(s: _Slices, h0):
    fam = s.fam
    if not all(bool(torch.isfinite(m).all()) for m in s.m):
        return False  # a non-finite entry: skipped and counted (a shift would spread it)
    if fam.form == "diag":
        if len(fam.terms) == 1 and fam.terms[0].sign > 0 and s.m[0].shape[1] == 1:  # per-channel bias: set it
            s.m[0] = h0[:, None].to(s.m[0].dtype).expand_as(s.m[0]).clone()
            return True
        # h_u = Σ_t s_t Σ_k m_t[u, k] (e.g. Σ b_A − Σ b_B): shift each of unit u's n entries by s_t (h₀ − h)_u / n
        h = sum(t.sign * m.sum(1) for t, m in zip(fam.terms, s.m))
        d = (h0 - h) / sum(m.shape[1] for m in s.m)
        for i, t in enumerate(fam.terms):
            s.m[i] = s.m[i] + t.sign * d[:, None]
        return True
    off = 0
    for i, t in enumerate(fam.terms):
        m = s.m[i]
        k = m.shape[1]
        target = h0[off:off + k] * t.sign
        s.m[i] = m + (target - m.sum(0))[None, :] / m.shape[0]
        off += k
    return True


def _scale(s: _Slices, h0):
    pos, _ = s.sums()
    n = _gram(pos, False)
    ok = (n > 0) & (h0 > 0)
    a = torch.where(ok, torch.sqrt(torch.where(ok, h0 / n.clamp_min(1e-300), torch.ones_like(n))), torch.ones_like(n))
    for i in range(len(s.m)):
        s.m[i] = s.m[i] * a[:, None]
        if s.b[i] is not None:
            s.b[i] = s.b[i] * a[:, None]
    return ok


def _act(f: Family, params: dict, buffers: dict | None, h0, euclid: bool = False):
    """One family's action (in place on `params`, `buffers`); returns its ok flag(s)."""
    s = _Slices(f, params, buffers)
    target = h0.to(torch.float64).to(s.m[0].device)
    if f.order == 1:
        ok = _translation(s, target)
    elif f.kind == "scale":
        ok = _scale(s, target)
    elif f.form == "matrix":
        ok = _matrix_step(s, target, euclid)
    else:
        ok = _diag_symmetry(s, target, euclid)
    s.store()
    return ok


def project(laws: LawSet, params: dict, h0: dict, mode: str = "symmetry", buffers: dict | None = None,
            tol: float = 1e-12, max_rounds: int = 100) -> ProjectionStats:
    """Move `params` (name -> tensor, changed in place) onto {h = h0} for every family of `laws`.

    `buffers` (name -> momentum buffer) are transported with the symmetry action. Returns stats."""
    if mode not in ("symmetry", "euclidean"):
        raise ValueError(f"projection must be 'symmetry' or 'euclidean', got {mode!r}")
    euclid = mode == "euclidean"
    stats = ProjectionStats()
    # Parameters stored in float32/bf16 cannot hold h(θ_0) closer than their own rounding: aim for
    # that floor instead of iterating to max_rounds on every step.
    eps = max(torch.finfo(params[n].dtype).eps for n in laws.param_names) if laws.param_names else 0.0
    tol = max(tol, 2 * eps) if eps > torch.finfo(torch.float64).eps else tol
    with torch.no_grad():
        scales = {f.name: f.value(params, absolute=True) for f in laws.families}
    if euclid:
        return _euclidean(laws, params, h0, scales, tol, max_rounds)
    scales = {k: v.clamp_min(1e-300) for k, v in scales.items()}
    history = []
    with torch.no_grad():
        for rnd in range(max_rounds):
            ok = {}
            for f in laws.families:
                ok[f.name] = _act(f, params, buffers, h0[f.name], euclid)
            stats.rounds = rnd + 1
            # units that cannot move (dead) are counted and left out of the residual
            stats.skipped = sum(int((~v).sum()) if torch.is_tensor(v) else int(not v) for v in ok.values())
            res = 0.0
            for f in laws.families:
                r = (f.value(params) - h0[f.name].to(torch.float64)).abs() / scales[f.name]
                v = ok[f.name]
                if torch.is_tensor(v):
                    r = r[v]
                elif not v:
                    continue
                res = max(res, float(r.max()) if r.numel() else 0.0)
            stats.max_residual = res
            if res <= tol:
                break
            history.append(res)
            if len(history) >= 4 and history[-1] > 0.9 * history[-4]:
                break  # stagnating at the storage precision
        stats.converged = stats.max_residual <= tol
    return stats


def _jjt_diagonal(fams, shapes: dict, scales: dict, device) -> torch.Tensor:
    """The diagonal of J Jᵀ (J: the Jacobian of every law function), ‖∇h_i‖², from the absolute
    scales (`Family.value(absolute=True)`), exact where a family's slices share no entry:
    a diagonal law 4 Σ|terms|; matrix entry (i, j) A_ii + A_jj, on the diagonal 4 A_ii
    (A = Σ_t |M_t||M_t|ᵀ); a linear law the number of entries it sums."""
    out = []
    for f in fams:
        sc = scales[f.name].to(device)
        if f.order == 2 and f.form == "matrix":
            a = torch.diagonal(sc)
            dg = a[:, None] + a[None, :] + torch.diag(2 * a)
        elif f.order == 2:
            dg = 4 * sc
        elif f.form == "vector":
            dg = torch.cat([torch.full((t.width(shapes[t.param]),), float(t.units), dtype=torch.float64,
                                       device=device) for t in f.terms])
        else:
            dg = torch.full_like(sc.reshape(-1), float(sum(t.width(shapes[t.param]) for t in f.terms)))
        out.append(dg.reshape(-1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)


class _LawJacobian:
    """J·δ and Jᵀ·λ of every law function at θ, in closed form: each law is a quadratic or linear
    form in slices M_t of the parameters (h = Σ_t s_t M_t M_tᵀ, its row sums, or sums of M_t), so
    per term J·δ needs one gather of δ's slices D_t (matrix: s_t (M_t D_tᵀ + D_t M_tᵀ); diagonal:
    2 s_t Σ_k M_t ∘ D_t; linear: s_t Σ D_t) and Jᵀ·λ one scatter-add (matrix: s_t (Λ + Λᵀ) M_t;
    diagonal: 2 s_t λ_u M_t[u]; linear: s_t λ). The slices of θ are gathered once. Families with
    grouped-convolution terms are not covered (`supported`)."""

    def __init__(self, fams, theta: dict):
        self.fams = fams
        self.theta = theta
        self.M = [[t.slices(theta[t.param]) for t in f.terms] for f in fams]

    @staticmethod
    def supported(fams) -> bool:
        return all(t.groups == 1 and (f.order == 2 and f.form in ("matrix", "diag") or f.order == 1
                                      and f.form in ("diag", "vector")) for f in fams for t in f.terms)

    def jv(self, delta: dict) -> torch.Tensor:
        out = []
        for f, Ms in zip(self.fams, self.M):
            acc = []
            for t, M in zip(f.terms, Ms):
                D = t.slices(delta[t.param])
                if f.order == 2 and f.form == "matrix":
                    v = M @ D.T
                    v = v + v.T
                elif f.order == 2:
                    v = 2 * (M * D).sum(1)
                else:
                    v = D.sum(1) if f.form == "diag" else D.sum(0)
                acc.append(v * float(t.sign))
            out.append((torch.cat(acc) if f.form == "vector" else sum(acc[1:], acc[0])).reshape(-1))
        return torch.cat(out)

    def jtv(self, lam: torch.Tensor) -> dict:
        g = {n: torch.zeros_like(x) for n, x in self.theta.items()}
        off = 0
        for f, Ms in zip(self.fams, self.M):
            U = f.units
            n_f = U * U if f.form == "matrix" else (sum(M.shape[1] for M in Ms) if f.form == "vector" else U)
            lf = lam[off:off + n_f]
            off += n_f
            col = 0
            for t, M in zip(f.terms, Ms):
                s_ = float(t.sign)
                if f.order == 2 and f.form == "matrix":
                    L = lf.view(U, U)
                    G = s_ * ((L + L.T) @ M)
                elif f.order == 2:
                    G = (2 * s_) * lf[:, None] * M
                elif f.form == "diag":
                    G = (s_ * lf)[:, None].expand_as(M)
                else:
                    k = M.shape[1]
                    G = (s_ * lf[col:col + k])[None, :].expand_as(M)
                    col += k
                view = g[t.param].movedim(t.axis, 0)
                idx = t.index.to(view.device)
                view.index_add_(0, idx.reshape(-1), G.reshape((idx.numel(),) + tuple(view.shape[1:])))
        return g


def _euclidean(laws: LawSet, params: dict, h0: dict, scales: dict, tol: float, max_iter: int) -> ProjectionStats:
    """argmin ‖θ − θ_t‖ s.t. h(θ) = h₀, by Gauss–Newton on the KKT conditions θ = θ_t + J(θ)ᵀλ.

    Each outer step linearises the constraints at θ and solves J Jᵀ λ = h₀ − h(θ) − J(θ_t − θ)
    by conjugate gradients with matrix-free products — in closed form (`_LawJacobian`), or
    torch.func jvp / vjp for grouped-convolution terms — preconditioned by the diagonal of J Jᵀ
    (`_jjt_diagonal`: 65 → 35 iterations per step on the Transformer of benchmarks/bench_cpu.py),
    so the result is the joint nearest point over all families, not a sequence of per-family
    projections. Per step on the CPU: ResNet-18 1.5 s, the Transformer 2.5–5 s (autograd without
    the preconditioner: 10 s and 20–50 s)."""
    from torch.func import jvp, vjp

    names = laws.param_names
    theta_t = {n: params[n].detach().to(torch.float64).clone() for n in names}
    stats = ProjectionStats()
    dev = theta_t[names[0]].device if names else torch.device("cpu")
    # what no nearby point reaches is skipped and counted, as the symmetry mode skips it: diagonal
    # units that `_rescale` skips (dead, non-finite, or one side empty with h₀ beyond it: h = −c < 0
    # < h₀ only reaches 0 along the gradient); matrix and linear families with a non-finite entry
    # or a function whose gradient vanishes (a dead row), whole, as `_matrix_step` does. The rest
    # is projected with those rows left out of the system.
    fams, keep, jjt = [], [], []
    for f in laws.families:
        g2 = _jjt_diagonal([f], laws.param_shapes, scales, dev)
        if f.order == 2 and f.form == "diag":
            pos, neg = _Slices(f, params, None).sums()
            p, c = _gram(pos, False), _gram(neg, False)
            p, c = (p if p is not None else torch.zeros_like(c)), (c if c is not None else torch.zeros_like(p))
            live = _rescale(p, c, h0[f.name].to(p))[1].to(dev) & (g2 > 0)
            stats.skipped += int((~live).sum())
        elif bool((torch.isfinite(g2) & (g2 > 0)).all() and torch.isfinite(scales[f.name]).all()):
            live = torch.ones_like(g2, dtype=torch.bool)
        else:
            stats.skipped += 1
            continue
        fams.append(f)
        keep.append(live)
        jjt.append(g2)
    if not fams:
        return stats
    keep, jjt = torch.cat(keep), torch.cat(jjt)
    target = torch.cat([h0[f.name].to(torch.float64).reshape(-1).to(dev) for f in fams])
    scale = torch.cat([scales[f.name].reshape(-1).to(dev) for f in fams]).clamp_min(1e-300)
    quad = torch.cat([torch.full((scales[f.name].numel(),), f.order == 2, dtype=torch.bool) for f in fams]).to(
        dev) & keep  # order-1 laws are finished exactly below
    fin = {n: torch.isfinite(v) for n, v in theta_t.items()}
    zero = torch.zeros((), dtype=torch.float64, device=dev)

    def h_of(th):
        return torch.cat([f.value(th).reshape(-1) for f in fams])

    pre = torch.where(keep, 1 / jjt.clamp_min(1e-300), torch.zeros_like(jjt))  # Jacobi preconditioner

    theta = {n: v.clone() for n, v in theta_t.items()}
    closed = _LawJacobian.supported(fams)
    for it in range(min(max_iter, 30)):
        if closed:  # J and Jᵀ in closed form (autograd's jvp / vjp otherwise)
            jac = _LawJacobian(fams, theta)
            hv = h_of(theta)
            vjp_fn, jv = (lambda v: (jac.jtv(v),)), jac.jv
        else:
            hv, vjp_fn = vjp(h_of, theta)
            jv = lambda v: jvp(h_of, (theta,), (v,))[1]  # noqa: E731
        stats.rounds = it + 1
        res = ((hv - target).abs() / scale)[quad]
        stats.max_residual = float(res.max()) if res.numel() else 0.0
        if stats.max_residual <= tol and it > 0:
            break
        # (torch.where, not a product with the mask: skipped rows of non-finite units hold NaN)
        diff = {n: torch.where(fin[n], theta_t[n] - theta[n], zero) for n in names}
        rhs = torch.where(keep, target - hv - jv(diff), zero)
        # preconditioned CG on J Jᵀ λ = rhs (PSD; consistent even where symmetric entries repeat)
        stop = 1e-30 + 1e-20 * float(rhs @ rhs)  # ‖r‖ ≤ 1e-10 ‖rhs‖: Gauss–Newton re-linearises anyway
        lam = _pcg(lambda q: torch.where(keep, jv(vjp_fn(q)[0]), zero), rhs, pre, lambda r: float(r @ r) <= stop,
                   max(50, 4 * rhs.numel()))
        (jt,) = vjp_fn(lam)
        theta = {n: theta_t[n] + torch.where(fin[n], jt[n], zero) for n in names}
    if not all(bool((torch.isfinite(theta[n]) | ~fin[n]).all()) for n in names):
        stats.converged = False  # (a failed solve: leave the parameters as they were, never NaN)
        stats.max_residual = float("inf")
        return stats
    with torch.no_grad():
        for n in names:
            params[n].copy_(theta[n].to(params[n].dtype))
        # Linear (order-1) laws: finish with their exact nearest-point correction, a shift that the
        # solver above only reaches to its tolerance relative to all functions together (a law
        # whose value is ~0, such as a zero key bias, would otherwise keep a tiny relative error).
        for f in fams:
            if f.order == 1:
                sl = _Slices(f, params, None)
                _translation(sl, h0[f.name].to(torch.float64).to(sl.m[0].device))
                sl.store()
    hv = h_of({n: params[n].detach().to(torch.float64) for n in names})
    res = ((hv - target).abs() / scale)[keep]
    stats.max_residual = float(res.max()) if res.numel() else 0.0
    stats.converged = stats.max_residual <= tol
    return stats


# ---------------------------------------------------------------------------------------------
# The symmetry projection on the fused path's flat storage
# ---------------------------------------------------------------------------------------------

def _kind(f: Family) -> str | None:
    """How the flat projector acts with family f: "diag" (x a / ÷ a), "matrix" (A / A⁻ᵀ), "shift"."""
    if f.order == 1 and f.form in ("diag", "vector"):
        return "shift"
    if f.order == 2 and f.form == "matrix":
        return "matrix"
    if f.order == 2 and f.form == "diag":
        return "diag"  # rescale, gate, diagonal stream, approximate scale (c = 0)
    return None


def _split(families) -> list:
    """Producer and consumer halves of every quadratic family as separate families with all signs
    +1 (``name|+``: p or P, ``name|-``: c or C); linear (translation) families unchanged."""
    out = []
    for f in families:
        if f.order == 1:
            out.append(f)
            continue
        for tag, sgn in (("|+", 1), ("|-", -1)):
            terms = [Term(t.param, t.axis, t.index, +1, t.groups) for t in f.terms if t.sign * sgn > 0]
            if terms:
                out.append(Family(f.name + tag, f.kind, f.form, f.order, terms, f.modules, f.approximate))
    return out


class _Stats:
    """Producer/consumer statistics of a list of families: every quadratic family split into its
    producer and consumer halves (`_split`), evaluated by `make_eval(split LawSet)` (a callable
    returning {name: float64 tensor}: the fused statistics kernels, or a `LawEvaluator`)."""

    def __init__(self, laws: LawSet, families, make_eval, device):
        split = _split(families)
        self.laws = LawSet(split, laws.param_shapes)
        self.evaluate = make_eval(self.laws)
        self.device = device
        self.names = [f.name for f in split]
        self.off = {}
        n = 0
        for f in split:
            self.off[f.name] = n
            n += math.prod(f.shape(laws.param_shapes))
        self.zero = n  # values() appends one 0 here: the consumer side of a family without one
        self._gather = {}  # id(a FamilyValues layout) -> (that layout, positions of values() in its flat vector)

    def values(self, stats: dict | None = None, vals: dict | None = None) -> torch.Tensor:
        """float64 [n + 1]: every split family's values, concatenated, then 0. `stats`: the
        statistics {(name, op, axis): tensor} of the current parameters, already computed (a
        `LawEvaluator`'s `values_from_stats`; Gram matrices are formed from the parameters);
        `vals`: the split families' values themselves, already computed (a folded pass)."""
        if vals is None:
            ev = self.evaluate  # (a LawEvaluator writes one vector: gathered below in one op)
            if hasattr(ev, "flat_values"):
                vals = ev.flat_values() if stats is None else ev.flat_values_from_stats(stats)
            else:
                vals = ev() if stats is None else ev.values_from_stats(stats)
        z = torch.zeros(1, dtype=torch.float64, device=self.device)
        if isinstance(vals, FamilyValues) and not vals.extra:  # one gather instead of a view per family
            idx = self._gather.get(id(vals.where))
            if idx is None or idx[0] is not vals.where:
                pos = np.concatenate([vals.where[n][0] + np.arange(vals.where[n][1]) for n in self.names]
                                     + [np.array([vals.flat.numel()])])
                idx = self._gather[id(vals.where)] = (vals.where, torch.as_tensor(pos, device=self.device))
            return torch.cat([vals.flat, z])[idx[1]]
        return torch.cat([vals[n].reshape(-1) for n in self.names] + [z])

    def index(self, f: Family, tag: str, size: int) -> np.ndarray:
        """Positions in values() of family f's `tag` half ("|+", "|-", or "" for order 1)."""
        o = self.off.get(f.name + tag)
        return np.full(size, self.zero, np.int64) if o is None else o + np.arange(size, dtype=np.int64)


def _factor_cols(fac: dict, shape) -> list:
    """A segment's two factor axes as the apply kernels read them: (o, s, post, dim) per axis, its
    slots in F from `fac` {axis: offset}, (0, 0, 1, 1) for an axis without factors."""
    cols = []
    for axis in sorted(fac)[:2] + [None] * (2 - len(fac)):
        cols += [0, 0, 1, 1] if axis is None else [fac[axis], 1, math.prod(shape[axis + 1:]), shape[axis]]
    return cols


_IDX64_FROM = 2 ** 31 - 2 ** 20  # segments this large need int64 segment-local indices (the kernels' IDX64)


def _factor_table(segs, facs) -> tuple:
    """(FSEG rows, int64 indices needed) of one flat buffer's segments, as the SCALE/MSCALE
    launches read them (`launch_sgd_stats`): segment k's factor axes from facs[k] ({axis: slot
    offset}, empty for none; `_factor_cols`), switched on where it has factors and elements."""
    fseg = np.zeros((max(len(segs), 1), 9), np.int64)
    fseg[:, [2, 3, 6, 7]] = 1
    big = False
    for k, (sg, fac) in enumerate(zip(segs, facs)):
        fseg[k, :8] = _factor_cols(fac, sg.shape)
        fseg[k, 8] = int(bool(fac) and sg.numel > 0)
        big |= bool(fac) and sg.numel >= _IDX64_FROM
    return fseg, big


def _offsets(shape, axis: int, index: np.ndarray) -> np.ndarray:
    """Element offsets inside a tensor of `shape` of the term slice movedim(axis, 0)[index]: [U, W]."""
    ar = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    return np.moveaxis(ar, axis, 0)[index].reshape(index.shape[0], -1)


def _affine(q: np.ndarray):
    """(si, sj) > 0 when the slice pattern q[i, j] (offsets of unit i, entry j) is i·si + j·sj."""
    r, S = q.shape
    si = int(q[1, 0]) if r > 1 else 1
    sj = int(q[0, 1]) if S > 1 else 1
    if not np.array_equal(q, np.arange(r)[:, None] * si + np.arange(S)[None, :] * sj) or si <= 0 or sj <= 0:
        return None
    return si, sj


def _as_strided(q: np.ndarray, bases: list):
    """(size, stride, offset) of one strided view [L, n, r, S] covering every slice of a
    matrix-action group, when the slice pattern q[i, j] (offsets of unit i, entry j) is affine and
    the sorted slice bases are b0 + l·sL + k·sb (k < n heads in order within each of L equally
    spaced layers); else None (an index gather then)."""
    aff = _affine(q)
    if aff is None:
        return None
    r, S = q.shape
    si, sj = aff
    b = np.asarray(bases, dtype=np.int64)
    d = np.diff(b)
    n = int(np.argmax(d != d[0])) + 1 if len(d) and (d != d[0]).any() else len(b)  # first run of equal steps
    if len(b) % n:
        return None
    grid = b.reshape(-1, n)
    sb = int(d[0]) if n > 1 else 1
    sl = int(grid[1, 0] - grid[0, 0]) if len(grid) > 1 else 1
    if sb <= 0 or sl <= 0 or not np.array_equal(grid, b[0] + sl * np.arange(len(grid))[:, None] + sb * np.arange(n)):
        return None
    return (len(grid), n, r, S), (sl, sb, si, sj), int(b[0])


class _Relaxation:
    """The over-relaxation factor ω of each round of one projection call, from the residuals
    measured after each round (`_ColouredProjector` docstring).

    plain: ω = 1 while two successive rounds of this phase contract alike (rate ρ, from three
      residuals), then ω = 2 / (1 + √(1 − ρ)) ("estimated");
    carried: the (ω, ρ) of the last converged call, from the second round; dropped for a fresh
      estimate as soon as a round grows or contracts worse than ρ (the rate has changed);
    estimated: kept unless the residual grows twice in a row ("off": ω = 1 to the end).
    """

    def __init__(self, enabled: bool, carried):
        self.enabled = enabled
        self.carried = carried  # (ω, ρ) or None
        self.omega, self.rho = 1.0, None
        self.mode = "plain"
        self.start = 0  # index in the history where the current phase began

    def next(self, history: list) -> float:
        if not self.enabled or self.mode == "off":
            return 1.0
        n = len(history)
        if self.mode == "plain":
            if n == 1 and self.carried is not None:
                (self.omega, self.rho), self.mode, self.start = self.carried, "carried", n
                return self.omega
            h = history[self.start:]
            if len(h) >= 3:
                r1, r2 = h[-2] / h[-3], h[-1] / h[-2]
                if 0.1 < r2 < 0.95 and abs(r2 - r1) <= 0.2 * r2:  # a steady Gauss–Seidel rate ρ = r2
                    self.omega, self.rho = 2.0 / (1.0 + math.sqrt(1.0 - r2)), r2
                    self.mode, self.start = "estimated", n
            return self.omega
        k = n - self.start  # rounds measured under this ω
        grew = k >= 1 and history[-1] > history[-2]
        if self.mode == "carried" and (grew or (k >= 2 and history[-1] > self.rho * history[-2])):
            self.mode, self.omega, self.rho, self.start = "plain", 1.0, None, n  # estimate afresh
        elif self.mode == "estimated" and grew and k >= 2 and history[-2] > history[-3]:
            self.mode, self.omega = "off", 1.0
        return self.omega


class _ColouredProjector:
    """The symmetry projection by colours of families, shared by `FlatProjector` (the fused
    path's flat buffers and Triton kernels) and `TensorProjector` (the parameter tensors
    themselves). Subclasses say where a parameter lives (`_key`, `_key_shape`), where the
    statistics come from (`_make_stats`), and how the actions are applied (`_plan_apply`,
    `_apply`); the colouring, the action tables, the actions and the rounds are here.

    Rounds are Gauss–Seidel sweeps in colour order, over-relaxed once their rate is known: the
    level set is where the gradient of the convex potential Φ = ½‖g·θ‖² − ⟨h₀, log g⟩ of the
    group action vanishes (h is the moment map; for diagonal families Φ is a sum of exponentials
    of the log-scales), each family's action solves its own block exactly, and SOR
    (diagonal: a ← a^ω, matrix: A = I + ωX) with ω = 2 / (1 + √(1 − ρ)) from the measured
    Gauss–Seidel rate ρ (Young's optimum for consistently ordered systems) cuts the rounds by
    about 2× (e.g. ρ = 0.45 → 0.15 per round on the Transformer of benchmarks/bench_cpu.py).
    ρ is taken once two successive rounds contract alike, and carried to the next call while it
    fits (`_Relaxation`).

    Diagonal families share the first colour when no slot is owned twice and no tensor is scaled
    along more than two axes and some tensor is scaled along two (`joint_diag`), and are solved
    together (`_joint_rescale`: Newton on the unit log-scales, the tensors scaled along two axes
    coupling them through their per-slot sums of squares) in every round where a coupled unit is
    off the level set (else the per-unit closed form). A chain of rescale laws (an MLP, a LayerNorm
    feeding an MLP) then lands in one round instead of converging at the rate of its coupling.
    """

    relax = True  # over-relax the rounds once their rate is measured
    joint_diag = True  # diagonal families in one colour, solved together (`_joint_rescale`)
    eliminate = True  # later colours' row translations folded into colour 0's closed form
    matrix_newton = 2  # Newton steps per matrix family and round (on its Grams, composed), while
    # the previous call took one round (the matrix families then decide the rounds; where couplings
    # to other colours decide them, as LayerNorm gains feeding attention heads, one step per round
    # costs less: 153 against 179 ms per projected step for benchmarks/bench_cpu.py's Transformer)

    def __init__(self, laws: LawSet, params_by_name):
        self.laws = laws
        self.params_by_name = dict(params_by_name)
        self.values: dict | None = None
        self._h0_key = None
        self._last = None  # (scale, ok) of the last measured call: the skip test of the next one
        self._carry = None  # (ω, ρ) the last converged call ended with (`_Relaxation`)
        self._prev_rounds = None  # rounds of the last call that took any (`matrix_newton`)
        names = laws.param_names
        self._dev = self.params_by_name[names[0]].device if names else torch.device("cpu")
        self._build()

    # -- where parameters live, statistics, applying (the subclasses) ----------------------
    def _key(self, name):
        raise NotImplementedError

    def _key_shape(self, key) -> tuple:
        raise NotImplementedError

    def _excluded(self, f: Family, kind: str, fp) -> bool:
        """Families the subclass's tables cannot express (acted on with `project`'s code)."""
        return False

    def _make_stats(self, fams) -> _Stats:
        raise NotImplementedError

    def _plan_apply(self, plan: dict, fams, seg_fac: dict, uo: dict, nu: int, do: dict) -> None:
        raise NotImplementedError

    def _apply(self, plan: dict, F: torch.Tensor, G: dict, D) -> torch.Tensor | None:
        """Act with (F, G, D) on the parameters and momentum; return the statistics that come
        next (the next colour's, or the measurement after the last colour) when the apply pass
        formed them itself (a folded colour), else None."""
        raise NotImplementedError

    def _buffers(self) -> dict:
        """name -> momentum buffer (the fallback families transport it with `project`'s code)."""
        return {}

    def _current(self) -> None:
        """Rebuild the tables if the parameters' storage changed."""

    def _first_measurement(self) -> torch.Tensor:
        """The statistics of every family at the start of a call."""
        return self._measure.values()

    # -- construction ----------------------------------------------------------------------
    def _T(self, a) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64), device=self._dev)

    def _footprint(self, f: Family):
        """[(key, axis, index array [U, S], sign)] of f's terms, axes normalised."""
        out = []
        for t in f.terms:
            key = self._key(t.param)
            nd = len(self._key_shape(key))
            out.append((key, t.axis % max(nd, 1), t.index.detach().cpu().numpy().astype(np.int64), t.sign))
        return out

    @staticmethod
    def _self_overlap(fp, kind) -> bool:
        """Do f's own terms overlap (or need more than the kernel's two axes per tensor)?"""
        by_key = {}
        for key, axis, idx, _ in fp:
            by_key.setdefault(key, {}).setdefault(axis, []).append(idx.reshape(-1))
        for axes in by_key.values():
            if len(axes) > (2 if kind == "diag" else 1):
                return True
            for lst in axes.values():
                allidx = np.concatenate(lst)
                if np.unique(allidx).size != allidx.size:
                    return True
        return False


    def _build(self):
        laws = self.laws
        fams = list(laws.families)
        self._fps = {f.name: self._footprint(f) for f in fams}
        self._fallback_fams, flat = [], []
        for f in fams:
            kind = _kind(f)
            fp = self._fps[f.name]
            bad = (kind is None or any(t.groups != 1 for t in f.terms) or self._self_overlap(fp, kind)
                   or any(len(self._key_shape(key)) == 0 for key, *_ in fp) or self._excluded(f, kind, fp))
            (self._fallback_fams if bad else flat).append(f)
        self.fallback = [f.name for f in self._fallback_fams]
        colours = self._colour(flat)
        self.colours = [[f.name for f in c] for c in colours]
        # measurement layout: every family's functions, in laws order (the layout of h0)
        shapes = laws.param_shapes
        self._meas_off, off = {}, 0
        self._shape = {}
        for f in fams:
            shp = tuple(f.shape(shapes))
            self._shape[f.name] = shp
            self._meas_off[f.name] = off
            off += math.prod(shp)
        self._n_meas = off
        # unit layout of the ok flags: diag units, one per matrix / translation family
        self._unit_off, u = {}, 0
        for f in fams:
            self._unit_off[f.name] = u
            u += f.units if _kind(f) == "diag" else 1
        self._n_units = u
        self._fam_where = {f.name: (self._meas_off[f.name], math.prod(self._shape[f.name]), self._shape[f.name])
                           for f in fams}  # (`_by_family`)
        self._fam_names = [f.name for f in fams]
        self._measure = self._make_stats(fams)
        self._mat_elim = self._matrix_eliminations(colours) if self.eliminate else {}
        self._plans = []
        for ci, c in enumerate(colours):
            self._plans.append(self._plan(c, self._colour_stats(ci, colours)))
        if self._plans:
            self._plans[0]["elim"] = self._plan_elimination(colours) if self.eliminate else None
            self._plans[0]["mcouple"] = self._plan_matrix_coupling(colours)
        self._build_measurement(fams)

    def _colour_stats(self, ci: int, colours: list) -> _Stats:
        """Where colour ci's actions read their statistics: the measurement for colour 0 (it
        measures every family), its own statistics pass for the others (with the translations
        its matrix families take into account, `_matrix_eliminations`)."""
        if ci == 0:
            return self._measure
        extra = {g.name: g for f in colours[ci] for g, *_ in self._mat_elim.get(f.name, ())}
        return self._make_stats(list(colours[ci]) + [g for n, g in extra.items() if n not in {f.name for f in colours[ci]}])

    def _matrix_eliminations(self, colours) -> dict:
        """{matrix family: [(translation family g, its value entries per unit [r], K, side)]}: the
        translations of later colours that shift the slices of one of its terms uniformly.

        A matrix family's term slices M [r, K] (r units) and a translation g whose value entry for
        unit i is exactly Σ_k M_ik, of this term alone, and whose shift adds d_i = (h₀_g − Σ_k M_ik)/K
        to each of the K entries: the out_proj columns of an attention head's VO law against the
        translation of out_proj's rows (a producer feeding a LayerNorm: every row of a column), or
        the key bias inside a QK law against its own translation (K = 1). After the matrix action M →
        G M (G = A or A⁻ᵀ) the shift gives M' = G M + d 1ᵀ, so the side's Gram becomes
        G (M Mᵀ − s sᵀ/K) Gᵀ + h₀_g h₀_gᵀ/K (s = M 1), whatever G: the Newton step solves against
        that (`_actions`), and the family and the translation both land in the round, where
        Gauss–Seidel between them converged linearly. As `_plan_elimination`, only a better first
        guess: the rounds still stop on the residual."""
        out = {}
        later = {}  # translation family -> its colour
        for ci, c in enumerate(colours):
            for f in c:
                if _kind(f) == "shift" and f not in self._fallback_fams:
                    later[f.name] = (ci, f)
        if not later:
            return out
        colour_of = {f.name: ci for ci, c in enumerate(colours) for f in c}
        # (key, axis, slice index) -> (g, entry, K): one translation entry summing one whole slice
        whole = {}
        for ci, g in later.values():
            terms = self._shift_terms(g)
            for key, axis, idx, sign, K, col, _ in terms:
                shape = self._key_shape(key)
                U, S = idx.shape
                if S != 1:
                    continue
                if g.form == "vector" and len(shape) == 2 and U == shape[axis] and \
                        np.array_equal(np.sort(idx[:, 0]), np.arange(shape[axis])):
                    # entry col + k sums every index along `axis` at position k of the other axis
                    for k in range(K):
                        whole[(key, 1 - axis, k)] = (g, col + k, U, ci)
                elif g.form == "diag" and len(terms) == 1:
                    for u in range(U):  # unit u's function: the whole slice idx[u] along `axis`
                        whole[(key, axis, int(idx[u, 0]))] = (g, u, K, ci)
        for c in colours:
            for f in c:
                if _kind(f) != "matrix":
                    continue
                for key, axis, idx, sign in self._fps[f.name]:
                    if idx.shape[1] != 1:
                        continue
                    hits = [whole.get((key, axis, int(i))) for i in idx[:, 0]]
                    if any(h is None for h in hits) or len({(h[0].name, h[2]) for h in hits}) != 1:
                        continue
                    g, _, K, cg = hits[0]
                    if cg > colour_of[f.name]:
                        out.setdefault(f.name, []).append((g, np.array([h[1] for h in hits]), K, sign))
        return out

    def _colour(self, fams) -> list:
        """Greedy colouring of the conflict graph (shared elements) in the families' order."""
        owners = {}  # (key, axis) -> [(family index, set of indices)]
        keys_of = []
        for i, f in enumerate(fams):
            ks = {}
            for key, axis, idx, _ in self._fps[f.name]:
                ks.setdefault((key, axis), set()).update(idx.reshape(-1).tolist())
            keys_of.append(ks)
        nbrs = [set() for _ in fams]
        for i, ks in enumerate(keys_of):
            for (key, axis), idx in ks.items():
                nd = len(self._key_shape(key))
                for (key2, axis2), lst in owners.items():
                    if key2 != key:
                        continue
                    for j, idx2 in lst:
                        if (axis2 != axis and nd > 1) or (axis2 == axis and not idx.isdisjoint(idx2)):
                            nbrs[i].add(j)
                            nbrs[j].add(i)
            for ka, idx in ks.items():
                owners.setdefault(ka, []).append((i, idx))
        diag = [i for i, f in enumerate(fams) if _kind(f) == "diag"]
        self._joint = self.joint_diag and bool(diag) and self._joint_ok([fams[i] for i in diag])
        in_diag = set(diag)
        order = diag + [i for i in range(len(fams)) if i not in in_diag] if self._joint else list(range(len(fams)))
        # a translation that shares a tensor with a matrix family comes after it in the sweep, where
        # the matrix action's Newton step can take the shift that follows into account
        # (`_matrix_eliminations`): matrix families first among the rest
        order = [i for i in order if _kind(fams[i]) != "shift"] + [i for i in order if _kind(fams[i]) == "shift"]
        colour_of = {}
        colours = []
        for i in order:
            if self._joint and _kind(fams[i]) == "diag":
                c = 0  # solved together (`_joint_rescale`): their actions commute
            else:
                used = {colour_of[j] for j in nbrs[i] if j in colour_of}
                c = 0
                if _kind(fams[i]) == "shift":
                    c = 1 + max((colour_of[j] for j in nbrs[i] if j in colour_of and _kind(fams[j]) == "matrix"),
                                default=-1)
                while c in used:
                    c += 1
            colour_of[i] = c
            while c >= len(colours):
                colours.append([])
            colours[c].append(fams[i])
        return colours

    def _joint_ok(self, diag) -> bool:
        """Whether the diagonal families should share one colour: no slot owned twice, at most two
        scaled axes per tensor (the apply tables), and some tensor scaled along two axes (else they
        are not coupled to each other and the colouring stays as it was)."""
        slots, axes = {}, {}
        for f in diag:
            for key, axis, idx, _ in self._fps[f.name]:
                s_ = slots.setdefault((key, axis), set())
                flat = idx.reshape(-1).tolist()
                if not s_.isdisjoint(flat):
                    return False
                s_.update(flat)
                axes.setdefault(key, set()).add(axis)
        return all(len(a) <= 2 for a in axes.values()) and any(len(a) == 2 for a in axes.values())


    def _plan(self, fams, st: _Stats) -> dict:
        """Index tables of one colour: statistics -> actions -> the subclass's apply tables."""
        T = self._T
        plan = {"stats": st, "diag": None, "mat": {}, "shift": None}
        diag = [f for f in fams if _kind(f) == "diag"]
        mats = [f for f in fams if _kind(f) == "matrix"]
        shifts = [f for f in fams if _kind(f) == "shift"]
        # -- diagonal families: unit u of family f is entry uo[f] + u of a, 1/a
        uo, nu = {}, 0
        for f in diag:
            uo[f.name] = nu
            nu += f.units
        if diag:
            plan["diag"] = dict(
                p=T(np.concatenate([st.index(f, "|+", f.units) for f in diag])),
                c=T(np.concatenate([st.index(f, "|-", f.units) for f in diag])),
                h0=T(np.concatenate([self._meas_off[f.name] + np.arange(f.units) for f in diag])),
                ok=T(np.concatenate([self._unit_off[f.name] + np.arange(f.units) for f in diag])),
                n=nu)
        plan["couple"] = []
        if diag and self._joint:  # tensors scaled along two axes: the couplings of `_joint_rescale`
            owners = {}  # (param name, axis) -> (unit of each slot or -1, its sign or 0)
            for f in diag:
                for t, (key, axis, idx, sign) in zip(f.terms, self._fps[f.name]):
                    n_ax = self._key_shape(key)[axis]
                    u_arr, s_arr = owners.setdefault((t.param, axis), (np.full(n_ax, -1, np.int64), np.zeros(n_ax)))
                    u_arr[idx.reshape(-1)] = uo[f.name] + np.repeat(np.arange(idx.shape[0]), idx.shape[1])
                    s_arr[idx.reshape(-1)] = sign
            axes_of = {}
            for name, axis in owners:
                axes_of.setdefault(name, []).append(axis)
            F64 = lambda a: torch.as_tensor(np.stack(a), dtype=torch.float64, device=self._dev)  # noqa: E731
            batches = {}  # (n_a, n_b) -> the tensors of that coupling shape, batched
            for name, axs in axes_of.items():
                if len(axs) == 2:
                    a, b = sorted(axs)
                    shp = self._key_shape(self._key(name))
                    e = batches.setdefault((shp[a], shp[b]), dict(names=[], axes=[], ua=[], sa=[], ub=[], sb=[]))
                    e["names"].append(name)
                    e["axes"].append((a, b))
                    for k, v in zip(("ua", "sa", "ub", "sb"), owners[(name, a)] + owners[(name, b)]):
                        e[k].append(v)
            for e in batches.values():
                plan["couple"].append(dict(names=e["names"], axes=e["axes"], ua=T(np.stack(e["ua"])), sa=F64(e["sa"]),
                                           ub=T(np.stack(e["ub"])), sb=F64(e["sb"])))
            units = np.unique(np.concatenate([np.stack(e[k]).reshape(-1) for e in batches.values() for k in ("ua", "ub")]))
            plan["coupled_units"] = T(units[units >= 0])
        # -- matrix families, batched by size r
        by_r = {}
        for f in mats:
            by_r.setdefault(f.units, []).append(f)
        for r, fl in by_r.items():
            plan["mat"][r] = self._mat_tables(fl, st)
        # -- translation: D = h0 − h for every function of the colour's translation families
        do, nd = {}, 0
        if shifts:
            tv, th = [], []
            for f in shifts:
                n = math.prod(self._shape[f.name])
                do[f.name] = nd
                nd += n
                tv.append(st.index(f, "", n))
                th.append(self._meas_off[f.name] + np.arange(n))
            plan["shift"] = dict(v=T(np.concatenate(tv)), h0=T(np.concatenate(th)), n=len(shifts),
                                 fam=T(np.concatenate([np.full(math.prod(self._shape[f.name]), i)
                                                       for i, f in enumerate(shifts)])),
                                 ok=T([self._unit_off[f.name] for f in shifts]))
        # -- diagonal factor slots: F = ext[F_src], one slot per (key, axis, index); ext = [1, a, 1/a]
        seg_fac, nf = {}, 1  # key -> {axis: slot offset in F}; F[0] = 1
        for f in diag:
            for key, axis, idx, sign in self._fps[f.name]:
                slots = seg_fac.setdefault(key, {})
                if axis not in slots:
                    slots[axis] = nf
                    nf += self._key_shape(key)[axis]
        src = np.zeros(nf, np.int64)  # F[i] = ext[src[i]], ext = [1, a, 1/a]: untouched entries are 1
        for f in diag:
            for key, axis, idx, sign in self._fps[f.name]:
                u = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
                src[seg_fac[key][axis] + idx.reshape(-1)] = 1 + uo[f.name] + u + (0 if sign > 0 else nu)
        plan["F_src"] = T(src)
        plan["seg_fac"], plan["src"] = seg_fac, src  # (host copies: `_plan_elimination`, `_plan_fold`)
        self._plan_apply(plan, fams, seg_fac, uo, nu, do)
        return plan

    def _mat_tables(self, fl: list, st: _Stats) -> dict:
        """Index tables of the matrix families `fl` (one size r) in the statistics `st`: their
        Grams P, C and h₀, the translations that follow them (`_matrix_eliminations`)."""
        T = self._T
        r = fl[0].units
        rr = r * r
        el = [(i, g, ent, K, side) for i, f in enumerate(fl) for g, ent, K, side in self._mat_elim.get(f.name, ())]
        elim = None
        if el:  # per eliminated term: its family's position, the translation's values, K, the side
            gs = list({e[1].name: e[1] for e in el}.values())
            elim = dict(fam=T([[g.name for g in gs].index(e[1].name) for e in el]), finite=self._finite_tables(gs, st),
                        pos=T([e[0] for e in el]),
                        v=T(np.stack([st.index(g, "", math.prod(self._shape[g.name]))[ent] for _, g, ent, _, _ in el])),
                        h0=T(np.stack([self._meas_off[g.name] + ent for _, g, ent, _, _ in el])),
                        K=torch.tensor([float(e[3]) for e in el], dtype=torch.float64, device=self._dev),
                        prod=torch.tensor([e[4] > 0 for e in el], device=self._dev))
        return dict(elim=elim,
                    P=T(np.concatenate([st.index(f, "|+", rr) for f in fl])),
                    C=T(np.concatenate([st.index(f, "|-", rr) for f in fl])),
                    h0=T(np.concatenate([self._meas_off[f.name] + np.arange(rr) for f in fl])),
                    ok=T([self._unit_off[f.name] for f in fl]), n=len(fl), pos={f.name: i for i, f in enumerate(fl)})

    def _plan_matrix_coupling(self, colours) -> list | None:
        """Tables with which colour 0's diagonal closed form anticipates the matrix actions of
        later colours on the tensors it scales along their other axis.

        A LayerNorm's gains rescale the columns of an attention in_proj whose rows the heads' QK
        and VO actions move: the heads' actions, which follow in the round, change the columns'
        sums of squares by Δ_j = Σ_t Σ_i ((G_t M_t)² − M_t²)_ij (M_t: a term's rows, G_t = A or
        A⁻ᵀ), and Gauss–Seidel between the two converged at a rate of about 0.15 per round. Here
        each batch of matrix families predicts its Newton step from the measurement (`_actions`:
        the same Lyapunov solve, on the same cached basis), the Δ_j it makes are formed from the
        parameters (one product per term and head batch), and the diagonal units solve against
        p + Δp, c + Δc. Only a better first guess, as `_plan_elimination`: the matrix families
        still take their own step from fresh statistics, and the rounds stop on the residual.
        Two-dimensional tensors whose other axis colour 0 scales."""
        if not self._plans or self._plans[0]["diag"] is None or not self.eliminate:
            return None
        plan0 = self._plans[0]
        seg_fac, src, nu = plan0["seg_fac"], plan0["src"], plan0["diag"]["n"]
        out = []
        for ci in range(1, len(colours)):
            for r, m in self._plans[ci]["mat"].items():
                fams = sorted(m["pos"], key=m["pos"].get)
                by_f = {f.name: f for f in colours[ci]}
                groups = {}  # (param, axis, sign) -> [(position in the batch, rows)], slot table
                for name in fams:
                    f = by_f[name]
                    for t, (key, axis, idx, sign) in zip(f.terms, self._fps[name]):
                        shape = self._key_shape(key)
                        other = 1 - axis
                        if len(shape) != 2 or other not in seg_fac.get(key, {}):
                            continue
                        slots = src[seg_fac[key][other] + np.arange(shape[other])]
                        e = groups.setdefault((t.param, axis, sign), dict(pos=[], rows=[], slots=slots,
                                                                           base=seg_fac[key][other]))
                        for s_ in range(idx.shape[1]):  # (a unit's S slices, e.g. grouped-query heads, each moved by A)
                            e["pos"].append(m["pos"][name])
                            e["rows"].append(idx[:, s_])
                if not groups:
                    continue
                by_k = {}  # the groups stacked by the length K of their slices: one product per K
                for (param, axis, sign), e in groups.items():
                    by_k.setdefault(e["slots"].size, []).append((param, axis, sign, e))
                stacks = []
                for K, gl in by_k.items():
                    pos = np.concatenate([e["pos"] for *_, e in gl])
                    prod = np.concatenate([np.full(len(e["pos"]), sign > 0) for _, _, sign, e in gl])
                    fslots = np.concatenate([np.tile(e["base"] + np.arange(K), (len(e["pos"]), 1)) for *_, e in gl])
                    slots = np.concatenate([np.tile(e["slots"], (len(e["pos"]), 1)) for *_, e in gl]).reshape(-1)
                    on = np.nonzero(slots > 0)[0]  # columns colour 0 scales: unit (+ nu on a consumer side)
                    u = slots[on] - 1
                    stacks.append(dict(parts=[(param, axis, self._T(np.concatenate(e["rows"]))) for param, axis, _, e in gl],
                                       pos=self._T(pos), prod=torch.as_tensor(prod, device=self._dev),
                                       fslots=self._T(fslots), on=self._T(on), unit=self._T(u % nu),
                                       to_p=torch.as_tensor(u < nu, device=self._dev)))
                out.append(dict(tables=self._mat_tables([by_f[n] for n in fams], self._measure), r=r, ci=ci,
                                stacks=stacks))
        return out or None

    coupled_iters = 3  # inner iterations of the predicted diagonal / matrix coupling (`_coupled_sums`)

    def _coupled_sums(self, plan: dict, v: torch.Tensor, H0: torch.Tensor, p, c, h0) -> tuple:
        """(p, c) of colour 0's units with what the later colours' matrix actions will add to
        their sums of squares (`_plan_matrix_coupling`): the coupled linearised system, by a few
        inner Gauss–Seidel iterations on tiny tensors and one product per term and iteration,
        instead of rounds over every parameter. Each iteration: the units' closed form against the
        current prediction; the Grams of the matrix families after those factors,
        P + M diag(f² − 1) Mᵀ (f: a column's factor); their Newton step (`_lyapunov`, the colour's
        cached basis); the sums of squares it changes, Σ_i ((G M)² − M²)_ij."""
        dev = v.device
        n = p.numel()
        one = torch.ones(1, dtype=torch.float64, device=dev)
        mats = []  # per batch and stack: the slices M [E, r, K] in float64, once per call
        for b in plan["mcouple"]:
            ms = []
            for s in b["stacks"]:
                parts = []
                for param, axis, rows in s["parts"]:
                    x = self.params_by_name[param].detach().index_select(axis, rows)
                    parts.append((x if axis == 0 else x.mT).reshape(-1, b["r"], x.shape[1 - axis]))
                M = torch.cat(parts) if len(parts) > 1 else parts[0]
                # (float32 weights stay float32: the products only predict corrections of ~1e-3
                # relative size, whose own 1e-7 relative error does not matter)
                ms.append(M if M.dtype in (torch.float32, torch.float64) else M.float())
            mats.append(ms)
        pre = []  # per batch: the Grams and the Newton step without the units' factors
        for b in plan["mcouple"]:
            r = b["r"]
            P, C, h0m = self._grams(b["tables"], v, H0, r)
            eig = self._plans[b["ci"]].setdefault("eig", {})  # (the colour's own cache, looked up now:
            X, _ = _lyapunov(P + C, h0m - (P - C), eig, r, self._lyap_tol)  # `load_state` replaces it)
            pre.append((P, C, h0m, X, eig))
        dp = torch.zeros(n, dtype=torch.float64, device=dev)
        dc = torch.zeros(n, dtype=torch.float64, device=dev)
        for it in range(self.coupled_iters):
            F = None
            if it:  # (unrelaxed: the prediction is of the coupled solution; ω relaxes the result)
                a = _rescale(p + dp, c + dc, h0)[0]
                F = torch.cat([one, a, 1 / a])[plan["F_src"]]
            dp, dc = torch.zeros_like(dp), torch.zeros_like(dc)
            for b, ms, (P, C, h0m, X, eig) in zip(plan["mcouple"], mats, pre):
                r = b["r"]
                if F is not None:  # the Grams after the units' factors, and the step's change by them
                    dR = torch.zeros_like(P)  # −(ΔP − ΔC): the right side's change (S's is second order)
                    for s, M in zip(b["stacks"], ms):
                        dG = torch.bmm(M * (F[s["fslots"]] ** 2 - 1).to(M.dtype)[:, None, :], M.mT).double()
                        dR = dR.index_add(0, s["pos"], torch.where(s["prod"][:, None, None], -dG, dG))
                    basis = eig.get(r)
                    if basis is not None and basis.U.shape == P.shape:
                        X = X + basis.solve(dR)  # (the cached basis's solver, S's change neglected: a guess)
                    else:
                        X, _ = _lyapunov(P + C, h0m - (P - C) + dR, eig, r, self._lyap_tol)
                eye = torch.eye(r, dtype=torch.float64, device=dev)
                step, bad = _newton_action(X, eye)
                # producers: E = A − I, consumers: A⁻ᵀ − I (0 for a step not taken); a column m
                # of M gains Σ (GM)² − M² = mᵀ Q m, Q = GᵀG − I = EᵀE + E + Eᵀ (r × r, tiny)
                E = torch.stack([torch.where(bad[:, None, None], 0, X), step[X.shape[0]:] - eye])
                Q = E.mT @ E + E + E.mT
                for s, M in zip(b["stacks"], ms):
                    Qs = torch.where(s["prod"][:, None, None], Q[0][s["pos"]], Q[1][s["pos"]]).to(M.dtype)
                    delta = (torch.bmm(Qs, M) * M).sum(1).double().reshape(-1)[s["on"]]
                    dp.index_add_(0, s["unit"], torch.where(s["to_p"], delta, 0))
                    dc.index_add_(0, s["unit"], torch.where(s["to_p"], 0, delta))
        p2, c2 = p + dp, c + dc
        use = (p2 > 0) & (c2 >= 0)
        return torch.where(use, p2, p), torch.where(use, c2, c)

    def _grams(self, m: dict, v: torch.Tensor, H0: torch.Tensor, r: int, plain: bool = False) -> tuple:
        """(P, C, h₀) [n, r, r] of a batch of matrix families from statistics `v`, with the
        translations that follow them taken in (`_matrix_eliminations`; not with `plain`, nor for
        the families in m["plain"], whose eliminated Grams lost a direction: `_actions`)."""
        n = m["n"]
        P = v[m["P"]].view(n, r, r)
        C = v[m["C"]].view(n, r, r)
        h0m = H0[m["h0"]].view(n, r, r)
        el = m["elim"]
        if el is not None and not plain:
            s, t = v[el["v"]], H0[el["h0"]]
            live = self._finite_in(el["finite"], v)[el["fam"]]  # (a skipped translation does not shift)
            if m.get("plain") is not None:
                live = live & ~m["plain"][el["pos"]]
            live = live[:, None, None]
            ss = torch.where(live, s[:, :, None] * s[:, None, :] / el["K"][:, None, None], 0)
            tt = torch.where(live, t[:, :, None] * t[:, None, :] / el["K"][:, None, None], 0)
            zero = torch.zeros_like(ss)
            P = P.index_add(0, el["pos"], torch.where(el["prod"][:, None, None], -ss, zero))
            C = C.index_add(0, el["pos"], torch.where(el["prod"][:, None, None], zero, -ss))
            h0m = h0m.index_add(0, el["pos"], torch.where(el["prod"][:, None, None], -tt, tt))
        return P, C, h0m

    def _finite_tables(self, fams: list, st: _Stats) -> dict:
        """Index tables telling, from statistics `st`, whether each of the translation families
        `fams` has only finite values (a family with a non-finite one is skipped, so an
        elimination must not expect its shift): `_finite_in`."""
        sizes = [math.prod(self._shape[g.name]) for g in fams]
        return dict(v=self._T(np.concatenate([st.index(g, "", n) for g, n in zip(fams, sizes)])),
                    fam=self._T(np.repeat(np.arange(len(fams)), sizes)), n=len(fams))

    def _finite_in(self, tab: dict, v: torch.Tensor) -> torch.Tensor:
        """bool [families]: every value in `v` of the families of `_finite_tables` finite."""
        return self._finite(v[tab["v"]], tab["fam"], tab["n"])

    @staticmethod
    def _finite(x: torch.Tensor, fam: torch.Tensor, n: int) -> torch.Tensor:
        """bool [n]: whether every value x[i] of family fam[i] is finite (with `_finite_tables`:
        x = v[tab["v"]], fam = tab["fam"], n = tab["n"])."""
        bad = torch.zeros(n, dtype=torch.float64, device=x.device)
        return bad.index_add(0, fam, (~torch.isfinite(x)).double()) == 0

    def _shift_terms(self, f: Family) -> list:
        """Per term of translation family f: (key, axis, idx, sign, K, col, coef) — K entries per
        slice (along the term's axis), col its first entry in f's values (vector form: the terms
        one after the other, S·K each), coef the share of its function's shift an element takes
        (vector form: sign / U over the U slices summed into an entry; diag form: sign / n over a
        unit's n elements in all terms)."""
        fp = self._fps[f.name]
        widths = [math.prod(self._key_shape(key)) // self._key_shape(key)[axis] for key, axis, _, _ in fp]
        n_el = sum(idx.shape[1] * w for (_, _, idx, _), w in zip(fp, widths))
        out, col = [], 0
        for (key, axis, idx, sign), K in zip(fp, widths):
            U, S = idx.shape
            out.append((key, axis, idx, sign, K, col, sign / U if f.form == "vector" else sign / n_el))
            if f.form == "vector":
                col += S * K
        return out

    def _plan_elimination(self, colours) -> dict | None:
        """Tables that fold the translations of later colours into colour 0's diagonal closed form.

        A translation (vector form) shifts rows of a tensor W whose columns are diagonal slices
        (a classifier's weight: its rows by the cross-entropy translation, its columns by the
        stream law of the features it reads). Gauss–Seidel between the two converges linearly
        (3–9 rounds for the ResNets of benchmarks/bench_step.py), but the shift that follows the
        rescale in the same round is known in closed form: with S = Σ_rows W[:, j] (U rows) and the
        shift d = (h₀_t − S/a)/U per row, a consumer column's Σ (W/a + d)² = (Q − S²/U)/a² + h₀_t²/U
        (producer: a²(Q − S²/U) + h₀_t²/U). So unit j's closed form takes c − S²/U and h₀ + h₀_t²/U
        (producer: p − S²/U, h₀ − h₀_t²/U) and lands, after the translation colour's exact shift,
        on both level sets in one round. Used where W is scaled along axis 1 only; each entry of the
        translation function sums the U rows of one term (vector form). Anything else coupled is
        left to the rounds (this only makes the first guess better; the rounds stop on the
        residual as before)."""
        if not self._plans or self._plans[0]["diag"] is None:
            return None
        plan = self._plans[0]
        nu = plan["diag"]["n"]
        st = self._measure
        v_idx, h_idx, unit, prod, rows, fam, fams = [], [], [], [], [], [], []
        for c in colours[1:]:
            for f in c:
                if _kind(f) != "shift" or f.form != "vector" or f in self._fallback_fams:
                    continue
                vpos = st.index(f, "", math.prod(self._shape[f.name]))
                n_before = len(v_idx)
                for key, axis, idx, sign, K, col, _ in self._shift_terms(f):
                    shape = self._key_shape(key)
                    U, S = idx.shape
                    fac = plan["seg_fac"].get(key, {})
                    if axis == 0 and len(shape) >= 2 and set(fac) == {1}:
                        post = math.prod(shape[2:])
                        k = np.arange(K)
                        src = plan["src"][fac[1] + (k // post) % shape[1]]  # per column: 1 + unit (+ nu)
                        for s_ in range(S):
                            e = col + s_ * K + k
                            on = src > 0
                            v_idx.append(vpos[e[on]])
                            h_idx.append(self._meas_off[f.name] + e[on])
                            u = src[on] - 1
                            unit.append(u % nu)
                            prod.append(u < nu)
                            rows.append(np.full(int(on.sum()), U, np.int64))
                            fam.append(np.full(int(on.sum()), len(fams), np.int64))
                if len(v_idx) > n_before:
                    fams.append(f)
        if not v_idx:
            return None
        T = self._T
        cat = np.concatenate
        pr = cat(prod).astype(np.float64)
        return dict(v=T(cat(v_idx)), h0=T(cat(h_idx)), unit=T(cat(unit)),
                    prod=torch.as_tensor(pr, device=self._dev),
                    rows=torch.as_tensor(cat(rows).astype(np.float64), device=self._dev),
                    fam=T(cat(fam)), finite=self._finite_tables(fams, st))

    def _build_measurement(self, fams):
        """Index tables that turn the colour-0 statistics into h, scale and residual of every function."""
        st = self._measure
        T = self._T
        ip, ic, exp = [], [], []
        mat_j, ii, jj = [], [], []
        self._trans = []
        for f in fams:
            n = math.prod(self._shape[f.name])
            o = self._meas_off[f.name]
            k = _kind(f)
            if f.order == 1:
                ip.append(st.index(f, "", n))
                ic.append(np.full(n, st.zero, np.int64))
                self._trans.append(f)
            else:
                ip.append(st.index(f, "|+", n))
                ic.append(st.index(f, "|-", n))
            if k == "diag":
                exp.append(self._unit_off[f.name] + np.arange(n))
            else:
                exp.append(np.full(n, self._unit_off[f.name], np.int64))
            if f.order == 2 and f.form == "matrix":
                r = f.units
                u, v = np.meshgrid(np.arange(r), np.arange(r), indexing="ij")
                mat_j.append(o + (u * r + v).reshape(-1))
                ii.append(o + (u * r + u).reshape(-1))
                jj.append(o + (v * r + v).reshape(-1))
        cat = lambda l: np.concatenate(l) if l else np.zeros(0, np.int64)  # noqa: E731
        self._ip, self._ic, self._exp = T(cat(ip)), T(cat(ic)), T(cat(exp))
        self._mat_j, self._ii, self._jj = T(cat(mat_j)), T(cat(ii)), T(cat(jj))
        self._trans_j = T(cat([self._meas_off[f.name] + np.arange(math.prod(self._shape[f.name]))
                               for f in self._trans]))


    # -- one call ----------------------------------------------------------------------------
    def _h0_flat(self, h0: dict) -> torch.Tensor:
        """h0 in the measurement layout (cached while the same tensors are passed)."""
        key = tuple(id(h0[f.name]) for f in self.laws.families)
        if self._h0_key != key:
            dev = self._dev
            self._h0 = torch.cat([h0[f.name].reshape(-1).to(device=dev, dtype=torch.float64)
                                  for f in self.laws.families]) if self.laws.families else \
                torch.zeros(0, dtype=torch.float64, device=dev)
            self._h0_key = key
            self._h0_ref = h0  # keep the tensors alive so their ids stay theirs
        return self._h0

    def _translation_scale(self) -> torch.Tensor:
        """Σ |slices| of every translation function at the current point (a few ops per term)."""
        parts = []
        for f in self._trans:
            acc = None
            for t in f.terms:
                m = t.slices(self.params_by_name[t.param].detach())
                v = m.abs().sum(0 if f.form == "vector" else 1, dtype=torch.float64)
                if f.form == "vector":
                    acc = v if acc is None else torch.cat([acc, v])
                else:
                    acc = v if acc is None else acc + v
            parts.append(acc)
        return torch.cat(parts) if parts else None


    @torch.no_grad()
    def __call__(self, h0: dict, *, tol: float = 1e-12, max_rounds: int = 100,
                 values: dict | None = None, measured: torch.Tensor | None = None) -> ProjectionStats:
        """Project onto {h = h0}. `values`: h at the current point if already known (the step's
        own statistics): when it is already within `tol` (by the scales of the previous call)
        nothing is read or written (rounds = 0). `measured`: the first measurement itself (the
        statistics of every family at the current point, as `FlatProjector.step_values` gives
        them), when the step formed it."""
        self._current()
        laws = self.laws
        H0 = self._h0_flat(h0)
        dev = H0.device
        eps = max(torch.finfo(self.params_by_name[n].dtype).eps for n in laws.param_names) if laws.param_names else 0.0
        tol = max(tol, 2 * eps) if eps > torch.finfo(torch.float64).eps else tol
        self._tol = tol
        stats = ProjectionStats()
        if values is not None and self._last is not None and measured is None:
            last_scale, last_ok = self._last
            if isinstance(values, FamilyValues) and values.where is self._fam_where:
                H = values.flat  # (`step_values`: already in the measurement layout)
            else:
                H = torch.cat([values[f.name].reshape(-1).to(device=dev, dtype=torch.float64) for f in laws.families]) \
                    if laws.families else H0
            r = torch.where(last_ok[self._exp], (H - H0).abs() / last_scale, torch.zeros_like(H))
            res = float(r.max()) if r.numel() else 0.0
            if res <= tol:  # already on the level set (e.g. a step whose drift is below the storage precision)
                stats.max_residual, stats.skipped, stats.converged = res, int((~last_ok).sum()), True
                self.values = self._by_family(H)  # (H: `values` in the measurement layout)
                return stats
        self._newton = self.matrix_newton if self._prev_rounds is None or self._prev_rounds <= 1 else 1
        ok = torch.ones(self._n_units, dtype=torch.bool, device=dev)
        if measured is not None and self._last is not None:
            # round 0 is the skip test (one host sync less): units skipped last time stay out of its
            # residual, as above; every round's actions set their flags afresh
            ok = self._last[1].clone()
        history = []
        scale = None
        sor = _Relaxation(self.relax, self._carry)
        omega = 1.0
        nxt = None  # statistics an apply pass formed on the way (`_apply`)
        for rnd in range(max_rounds + 1):
            if rnd == 0:
                v = measured if measured is not None else self._first_measurement()
            else:
                v = nxt if nxt is not None else self._measure.values()
            S = v[self._ip] + v[self._ic]
            H = v[self._ip] - v[self._ic]
            if scale is None:  # Σ |terms| at the start of the call, as project() measures it
                scale = S.clone()
                if self._mat_j.numel():
                    scale[self._mat_j] = torch.sqrt((S[self._ii] * S[self._jj]).clamp_min(0))
                if self._trans:
                    scale[self._trans_j] = self._translation_scale()
                scale = scale.clamp_min(1e-300)
            r = torch.where(ok[self._exp], (H - H0).abs() / scale, torch.zeros_like(H))
            res_t = r.max() if r.numel() else torch.zeros((), dtype=torch.float64, device=dev)
            res, skipped = torch.stack([res_t, (~ok).sum().to(torch.float64)]).tolist()
            # the Lyapunov solves' accuracy: enough for this round's Newton step to land within tol
            # (its error is about that relative residual times the current one), at most _LYAP_INEXACT
            self._lyap_tol = min(_LYAP_INEXACT, max(0.5 * tol / max(res, 1e-300), 1e-13))
            stats.max_residual, stats.skipped = res, int(skipped)
            if rnd == max_rounds or res <= tol:
                break
            if rnd > 0:
                history.append(res)
                if len(history) >= 4 and history[-1] > 0.9 * history[-4]:
                    break  # stagnating at the storage precision
                omega = sor.next(history)
            for ci, plan in enumerate(self._plans):
                vc = v if ci == 0 else (nxt if nxt is not None else plan["stats"].values())
                nxt = self._apply(plan, *self._actions(plan, vc, H0, ok, omega))
            if self._fallback_fams:
                nxt = None  # (never folded past the fallback families: they act after the colours)
                bufs = self._buffers()
                for f in self._fallback_fams:
                    o = _act(f, self.params_by_name, bufs, h0[f.name])
                    u0 = self._unit_off[f.name]
                    if torch.is_tensor(o) and _kind(f) == "diag":  # per unit
                        ok[u0:u0 + f.units] = o.reshape(-1).to(dev)
                    else:  # one flag for the family
                        ok[u0] = bool(o.all()) if torch.is_tensor(o) else bool(o)
            stats.rounds = rnd + 1
        stats.converged = stats.max_residual <= tol
        stats.relaxation = omega
        if stats.rounds > 0:
            self._carry = (sor.omega, sor.rho) if stats.converged and sor.omega > 1.0 else None
            self._prev_rounds = stats.rounds
        self.values = self._by_family(H)
        self._last = (scale, ok) if scale is not None else None
        return stats

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        """What one call hands to the next, so that a resumed run projects bit for bit as the
        original would (`consopt.SGD.state_dict`): the relaxation (ω, ρ) and the last call's rounds
        (`_Relaxation`, `matrix_newton`), its scale and skip flags (the skip test), the cached
        Lyapunov bases (`_lyapunov`). Tensors, ints and lists only (``weights_only=True``)."""
        d = {"colours": [list(c) for c in self.colours], "fallback": list(self.fallback),
             "prev_rounds": -1 if self._prev_rounds is None else int(self._prev_rounds)}
        if self._carry is not None:
            d["carry"] = torch.tensor(self._carry, dtype=torch.float64)
        if self._last is not None:
            d["scale"], d["ok"] = self._last[0].detach().clone(), self._last[1].clone()
        d["bases"] = {f"{ci}:{r}": {"U": b.U.clone(), "inv": b.inv.clone(), "tiny": b.tiny.clone(), "iters": b.iters}
                      for ci, plan in enumerate(self._plans) for r, b in plan.get("eig", {}).items()}
        return d

    @staticmethod
    def check_state(d) -> None:
        """Raise ValueError unless `d` has the form `state()` gives (a checkpoint is checked before
        anything is loaded; whether it fits this projector's colours is decided by `load_state`)."""
        def need(ok, what):
            if not ok:
                raise ValueError(f"malformed consopt projector state in the optimizer state dict: {what}")
        if not d:
            return
        need(isinstance(d.get("colours"), list) and all(isinstance(c, list) for c in d["colours"]), "'colours'")
        need(isinstance(d.get("fallback"), list), "'fallback'")
        need(isinstance(d.get("prev_rounds"), int), "'prev_rounds'")
        if "carry" in d:
            need(torch.is_tensor(d["carry"]) and d["carry"].numel() == 2, "'carry'")
        if "scale" in d or "ok" in d:
            need(all(torch.is_tensor(d.get(k)) and d[k].dim() == 1 for k in ("scale", "ok")), "'scale' / 'ok'")
        bases = d.get("bases", {})
        need(isinstance(bases, Mapping), "'bases'")
        for key, b in bases.items():
            parts = key.split(":") if isinstance(key, str) else []
            need(len(parts) == 2 and all(x.isdigit() for x in parts), f"basis key {key!r}")
            need(isinstance(b, Mapping) and all(torch.is_tensor(b.get(k)) and b[k].dim() == 3 for k in ("U", "inv", "tiny"))
                 and isinstance(b.get("iters"), int), f"basis {key!r}")

    def load_state(self, d) -> None:
        """Continue from `state()` (an empty dict: start afresh). A state of other colours
        (other laws, or a projector that acts with other code) is not applied: the next call
        starts afresh, as a new projector would."""
        self._carry = self._prev_rounds = self._last = None
        for plan in self._plans:
            plan.pop("eig", None)
        if not d or d.get("colours") != self.colours or d.get("fallback") != self.fallback:
            return
        dev = self._dev
        if "scale" in d:
            scale, ok = d["scale"].to(device=dev, dtype=torch.float64), d["ok"].to(device=dev, dtype=torch.bool)
            if scale.shape != (self._n_meas,) or ok.shape != (self._n_units,):
                return
            self._last = (scale, ok)
        if "carry" in d:
            self._carry = tuple(float(x) for x in d["carry"])
        self._prev_rounds = None if int(d["prev_rounds"]) < 0 else int(d["prev_rounds"])
        for key, b in d.get("bases", {}).items():
            ci, r = (int(x) for x in key.split(":"))
            if ci < len(self._plans) and r in self._plans[ci]["mat"]:
                self._plans[ci].setdefault("eig", {})[r] = _LyapBasis.restore(
                    b["U"].to(dev), b["inv"].to(dev), b["tiny"].to(dev), b["iters"])

    def _by_family(self, H: torch.Tensor) -> FamilyValues:
        """{family name: its values} from h in the measurement layout (views made when read)."""
        return FamilyValues(H, self._fam_where, self._fam_names)

    def _coupling(self, cp: dict) -> tuple:
        """(Q, ua, sa, ub, sb) of the tensors of one coupling shape, scaled along two axes a < b, at
        the current point: Q[k, i, j] the sum of squares of tensor k's entries with index i along a
        and j along b (float64 for float64 tensors, else float32: `_joint_rescale` takes its exact
        marginals in float64 and uses Q itself only for small corrections)."""
        qs = []
        for name, (a, b) in zip(cp["names"], cp["axes"]):
            x = self.params_by_name[name].detach()
            dt = torch.float64 if x.dtype == torch.float64 else torch.float32  # (1× the weight in float32)
            if x.dim() == 2:
                qs.append(torch.square(x.to(dt)))  # (not in place: .to is x itself when the dtype matches)
            else:
                q = x.movedim((a, b), (0, 1)).reshape(x.shape[a], x.shape[b], -1).to(dt)
                qs.append((q * q).sum(-1))
        return torch.stack(qs), cp["ua"], cp["sa"], cp["ub"], cp["sb"]

    def _actions(self, plan: dict, v: torch.Tensor, H0: torch.Tensor, ok: torch.Tensor, omega: float = 1.0):
        """(F, G, D) of one colour's families from statistics `v`: the diagonal factors
        F = ext[F_src] (ext = [1, a^ω, a^−ω]), the matrix actions G[r] = [A; A⁻ᵀ] per size r
        (A = Π(I + ωX), the composed Newton steps), the translation shifts D = h₀ − h (None
        without translations)."""
        dev = v.device
        one = torch.ones(1, dtype=torch.float64, device=dev)
        d = plan["diag"]
        if d is not None:
            p, c, h0 = v[d["p"]], v[d["c"]], H0[d["h0"]]
            el = plan.get("elim")
            if el is not None:  # the translations of later colours, in closed form (`_plan_elimination`)
                n = p.numel()
                live = self._finite_in(el["finite"], v)[el["fam"]]  # (a skipped translation does not shift)
                sq = torch.where(live, v[el["v"]] ** 2 / el["rows"], 0)
                t2 = torch.where(live, H0[el["h0"]] ** 2 / el["rows"], 0)
                z = torch.zeros(n, dtype=torch.float64, device=dev)
                dp = z.index_add(0, el["unit"], sq * el["prod"])
                dc = z.index_add(0, el["unit"], sq * (1 - el["prod"]))
                dh = z.index_add(0, el["unit"], t2 * (1 - 2 * el["prod"]))
                p2, c2 = p - dp, c - dc
                use = (p2 > 1e-12 * p) & (c2 >= 0)  # (Q − S²/U ≥ 0 up to rounding; else as before)
                p, c, h0 = torch.where(use, p2, p), torch.where(use, c2.clamp_min(0), c), torch.where(use, h0 + dh, h0)
            if plan.get("mcouple") is not None:  # the matrix actions that follow, predicted
                p, c = self._coupled_sums(plan, v, H0, p, c, h0)
            joint = bool(plan["couple"])
            if joint:  # coupled units already on the level set move by ≤ tol/10 either way: closed form
                cu = plan["coupled_units"]
                joint = float(((p[cu] - c[cu] - h0[cu]).abs() / (p[cu] + c[cu]).clamp_min(1e-300)).max()) > self._tol
            if joint:  # coupled diagonal families: at once
                a, good = _joint_rescale(p, c, h0, [self._coupling(cp) for cp in plan["couple"]], tol=self._tol)
            else:
                a, good = _rescale(p, c, h0)
            ok[d["ok"]] = good
            if omega != 1.0:
                a = a.pow(omega)
            F = torch.cat([one, a, 1 / a])[plan["F_src"]]
        else:
            F = one
        G = {}
        for r, m in plan["mat"].items():  # Newton steps per family, batched: as _matrix_step / _lyapunov
            n = m["n"]
            P, C, h0m = self._grams(m, v, H0, r)  # (the translations that follow, in closed form)
            eye = torch.eye(r, dtype=torch.float64, device=dev)
            # a non-finite Gram (an inf in a slice): the family is skipped, its step is I
            fin = (torch.isfinite(P) & torch.isfinite(C) & torch.isfinite(h0m)).flatten(1).all(1)[:, None, None]
            P, C, h0m = torch.where(fin, P, eye), torch.where(fin, C, 0), torch.where(fin, h0m, eye)
            good = fin.reshape(n)
            cache = plan.setdefault("eig", {})
            # the Grams move exactly with the action (P → A P Aᵀ, C → A⁻ᵀ C A⁻¹), so further Newton
            # steps need no measurement: up to `matrix_newton` of them, composed, then applied once
            # (one step leaves ~res², above float32's tolerance from a drift of 1e-3)
            steps = max(1, self._newton) if omega == 1.0 else 1
            Gr = None  # [A; A⁻ᵀ] of the steps so far, composed
            for it in range(steps):
                # (_lyapunov symmetrises S and R in its basis)
                X, tiny = _lyapunov(P + C, h0m - (P - C), cache, r, self._lyap_tol)
                if it == 0 and m["elim"] is not None and cache.get(r) is not None and cache[r].dropped:
                    # (known on the host: only a fresh decomposition drops directions) the eliminated
                    # Grams (M Mᵀ − s sᵀ/K) may have lost a direction the plain ones have: such families
                    # take the plain Grams, from now on
                    P0, C0, h00 = self._grams(m, v, H0, r, plain=True)
                    X0, tiny0 = _lyapunov(P0 + C0, h00 - (P0 - C0))
                    lost = tiny.flatten(1).any(1) & ~tiny0.flatten(1).any(1) & fin.reshape(n)
                    m["plain"] = lost if m.get("plain") is None else m["plain"] | lost
                    w = lost[:, None, None]
                    X, tiny = torch.where(w, X0, X), torch.where(w, tiny0, tiny)
                    P, C, h0m = torch.where(w, P0, P), torch.where(w, C0, C), torch.where(w, h00, h0m)
                # (a singular or non-finite step is not taken: the family is skipped this round)
                step, bad = _newton_action(X if omega == 1.0 else omega * X, eye)
                good = good & ~tiny.flatten(1).any(1) & ~bad
                Gr = step if Gr is None else torch.bmm(step, Gr)
                if it + 1 < steps:
                    PC = torch.bmm(torch.bmm(step, torch.cat([P, C])), step.mT)
                    P, C = PC[:n], PC[n:]
            G[r] = Gr  # producers: A, consumers: A⁻ᵀ (bad steps: I)
            ok[m["ok"]] = good
        D = None
        sh = plan["shift"]
        if sh is not None:
            D = H0[sh["h0"]] - v[sh["v"]]
            # a family with a non-finite value is skipped and counted (its shift would spread it)
            good = self._finite(D, sh["fam"], sh["n"])
            ok[sh["ok"]] = good
            D = torch.where(good[sh["fam"]], D, torch.zeros((), dtype=D.dtype, device=dev))
        return F, G, D


class FlatProjector(_ColouredProjector):
    """The symmetry projection (`project(..., "symmetry")`) on the flat buffers of the fused path.

    Built once from the laws, the optimizer's named parameters and its `FlatGroup`s; each call
    ``proj(h0)`` moves the parameters (and the momentum buffers, by the same group action) back
    onto {h = h0} and returns `ProjectionStats`; ``proj.values`` then holds h at the result
    (float64, the keys of ``laws.evaluate``), from the same statistics.

    The group actions are those of `project` (module docstring): for each diagonal family
    θ_prod ← a ⊙ θ_prod, θ_cons ← θ_cons ⊘ a with u = a² the positive root of
    p u² − h₀ u − c = 0 (approximate scale laws: c = 0, u = h₀ / p); for each matrix family
    Newton steps M_p ← (I + X) M_p, M_c ← (I + X)⁻ᵀ M_c with X S + S X = h₀ − (P − C), S = P + C,
    solved in S's eigenbasis (up to `matrix_newton` of them composed per round); for each translation family the exact shift
    θ_t ← θ_t + s_t (h₀ − h) / n over the n slices that sum to each function.

    One round, for each colour k of a colouring of the families (two families conflict when
    their slices share an element; greedy colouring gives 2 colours for MLPs, CNNs with
    BatchNorm, transformers and residual streams):
      1. statistics of colour k's families at the current point: producer sums p (Grams P) and
         consumer sums c (Grams C) — `compile_laws` on the families split into their producer
         and consumer halves, one `law_values_only` (per buffer: the statistics launches, a Gram
         launch, one CSR reduction). Colour 0 measures every family: its values give the
         residual max |h − h₀| / scale of the previous round (one host sync per round);
      2. the actions of all of colour k's families at once, on tiny tensors: the closed form
         for every diagonal unit, one batched `eigh` / `inv` per matrix size r, the shifts;
      3. one `triton_kernels.project` launch per flat buffer applies every diagonal factor and
         every shift (parameters and momentum in the same program) and one
         `triton_kernels.project.matrix_apply_kernel` launch per buffer and matrix size applies
         the matrix actions (x ← A x per slice, a float64 tl.dot, rounded once; parameters and
         momentum read and written once; slices that are not i·si + j·sj, or r > 64, take a
         batched torch matmul: gather, float64 bmm, round, scatter).
    Two passes are saved where they can be (ResNet-style models then cost one pass per round):
      * a colour of diagonal families only (no shift, no matrix action) is applied by the
        statistics kernel of the *next* measurement itself (``fold``; its SCALE prologue scales
        parameters and momentum, rounds once as the apply kernel does, and forms the next
        statistics from the values it stores), so its apply and the following statistics pass
        are one pass — bitwise the same result;
      * consopt.SGD's fused step forms the first measurement (``measure_in_step``: it steps over
        `step_laws()`, the split statistics, and hands `step_values()` to the call as
        ``measured``), so a call starts without a statistics pass.
    Launches per round with C colours (C = 2 in the models above): C statistics passes (a few
    launches each), per colour one apply launch per flat buffer and one gather/bmm/scatter per
    matrix slice pattern, plus a few dozen tiny torch ops for the actions; one host sync (the
    residual; `torch.linalg.eigh` may add one per matrix size on CUDA, where torch checks its
    error flags — `inv_ex` avoids that for the inverse). Nothing scales with the number of
    families except the host-side table building, done once.

    Convergence. Families of one colour touch disjoint elements, so their actions commute and a
    colour's pass equals their Gauss–Seidel updates in any order: a round is a Gauss–Seidel
    sweep in colour order, linear convergence like `project` (float64 models of
    tests/test_projection.py, 3 steps of lr 0.05, plain sweeps: ReLU MLP 16–19, CNN with
    BatchNorm 6–7, attention 14–17, Llama block 8–9, residual stream 56–64; float32 parameters
    stop at 2·eps after a few rounds). The exception is the first colour when the diagonal
    families are coupled (`_ColouredProjector`): they share elements there, and are solved
    together by `_joint_rescale` instead (the MLP then takes 1 round); over-relaxation cuts the
    rest (residual stream 22–24). Jacobi rounds (every family from one set of statistics) took
    twice as many rounds, as expected where the coupling graph of adjacent layers is bipartite
    (ρ_GS = ρ_J²). The result lies on the same level set as `project`'s but need not be the same
    point where the orbit meets the level set in more than one point (matrix laws): the order of
    the updates differs.

    Residual and stopping as in `project`: scale = Σ of the absolute terms at the start of the
    call (diagonal: p + c; translation: Σ |slices|; matrix: √(S_ii S_jj), which bounds
    Σ_t |M_t| |M_t|ᵀ entrywise and equals it on the diagonal), `tol` raised to 2 × the machine
    epsilon of float32/bf16/fp16 parameters, a stop when the residual stagnates; units whose
    action failed (dead units: p + c = 0, dropped Lyapunov directions) are skipped, counted in
    `ProjectionStats.skipped` and left out of the residual, never turned into NaN.

    Fallback: a family whose slices the flat tables cannot express — a diagonal family using
    more than two axes of one tensor, a translation along an axis other than 0, or terms of one
    family overlapping each other — is acted on with `project`'s own per-family torch code
    (Gauss–Seidel, after the colours, every round); its statistics still come from step 1.
    ``proj.fallback`` lists those families' names.
    """


    fold = True  # colours of diagonal families only: apply inside the next statistics pass
    measure_in_step = True  # consopt.SGD's fused step forms the first measurement (`step_laws`)
    remeasure = True  # a last colour of translations: re-measure only the segments it shifts
    matrix_kernel = True  # matrix actions (r <= 64, affine slices) by triton_kernels.project's kernel

    def __init__(self, laws: LawSet, params_by_name, groups, *, tile: int | None = None,
                 lazy_momentum: bool = False):
        from .fused import FlatGroup

        if isinstance(groups, FlatGroup):
            groups = [groups]
        self.groups = list(groups)
        self.tile = tile
        self.lazy_momentum = bool(lazy_momentum)
        self._pf, self._transports = None, []  # (`_install_transport`)
        super().__init__(laws, params_by_name)

    def _key(self, name):
        from .fused import locate_param

        return locate_param(self.groups, self.params_by_name, name)

    def _seg(self, key):
        gi, bi, k = key
        return self.groups[gi].buffers[bi].segs[k]

    def _key_shape(self, key) -> tuple:
        return tuple(self._seg(key).shape)

    def _excluded(self, f: Family, kind: str, fp) -> bool:
        return kind == "shift" and any(axis != 0 for _, axis, _, _ in fp)  # the kernel shifts rows

    def _make_stats(self, fams) -> _Stats:
        from .fused import compile_laws, law_values_only

        made = []

        def make_eval(split):
            made.append(compile_laws(split, self.params_by_name, self.groups))
            return lambda: law_values_only(made[0])

        st = _Stats(self.laws, fams, make_eval, self._dev)
        st.compiled = made[0]  # (its tables also drive the folded apply passes, `_plan_fold`)
        return st

    def _build(self):
        super()._build()
        self._plan_remeasure()
        for ci, plan in enumerate(self._plans):
            last = ci + 1 == len(self._plans)
            nxt = self._measure if last else self._plans[ci + 1]["stats"]
            plan["fold"] = None
            if self.fold and not plan["mat"] and plan["shift"] is None and not (last and self._fallback_fams):
                plan["fold"] = self._plan_fold(plan, nxt)
        self._versions = [g.version for g in self.groups]
        self._install_transport()

    # -- lazy momentum transport --------------------------------------------------------------
    @property
    def lazy(self) -> bool:
        """Is the momentum transported lazily now (`lazy_momentum` asked for and possible, and
        the transports installed are still this projector's: another projector installing its own
        on the same buffers applies what was owed, and this one then transports eagerly)?"""
        return self._pf is not None and all(b.transport is t for b, t in self._transports)

    def set_lazy(self, flag: bool) -> None:
        """Switch lazy momentum transport on or off (what is owed is applied first)."""
        self._current()
        self._uninstall_transport()
        self.lazy_momentum = bool(flag)
        self._install_transport()

    def _uninstall_transport(self) -> None:
        """This projector's transports: what they owe is applied, and they are removed."""
        for b, t in self._transports:
            if b.transport is t:
                t.flush(b.mom)
                b.transport = None
        self._pf = None
        self._transports = []

    def _transport_axes(self) -> dict | None:
        """{segment key: axes its diagonal factors use in any colour}, or None where the momentum
        must be transported eagerly: families acted on by `project`'s own code, a segment scaled
        along more than two axes, or a matrix action along an axis that owed factors scale
        (actions along other axes commute with them: A(m ⊙ f) = (A m) ⊙ f when f is constant
        along the axis A mixes, so matrix actions keep transporting the stored buffer)."""
        if not self.lazy_momentum or self._fallback_fams:
            return None
        axes = {}
        for plan in self._plans:
            for key, fac in plan["seg_fac"].items():
                axes.setdefault(key, set()).update(fac)
        if not axes or any(len(a) > 2 for a in axes.values()):
            return None
        for plan in self._plans:
            for m in plan["mat"].values():
                for name in m["pos"]:
                    if any(axis in axes.get(key, ()) for key, axis, _, _ in self._fps[name]):
                        return None
        return axes

    def _install_transport(self) -> None:
        """With `lazy_momentum`: a `MomentumTransport` per flat buffer (one float64 factor slot
        per (segment, axis, index) that any colour scales, all views of one buffer `_pf`) and per
        colour the index pairs that multiply its factors F into them (`_owe`)."""
        from triton_kernels.project import plan_tiles, APPLY_TILE

        from .fused import MomentumTransport

        self._uninstall_transport()  # (what an earlier plan owes is applied first)
        axes = self._transport_axes()
        if axes is None:
            return
        glob, made, pos = {}, [], 0
        for gi, g in enumerate(self.groups):
            for bi, b in enumerate(g.buffers):
                start = pos
                pos += 1  # F[0] = 1: the slot of axes without factors
                facs, slots = [], []
                for k, sg in enumerate(b.segs):
                    a0, fac = pos - start, {}
                    for axis in sorted(axes.get((gi, bi, k), ())):
                        fac[axis] = pos - start
                        glob[((gi, bi, k), axis)] = pos
                        pos += sg.shape[axis]
                    slots.append((a0, pos - start))
                    facs.append(fac)
                fseg, big = _factor_table(b.segs, facs)
                rows = [[sg.base, sg.numel] + fseg[k, :8].tolist() + [0, 0, max(sg.numel // sg.shape[0], 1), 1]
                        for k, sg in enumerate(b.segs) if fseg[k, 8]]  # (the apply kernel's rows, no shift)
                if rows:
                    made.append((b, start, pos, fseg, plan_tiles(rows, self.tile or APPLY_TILE), slots, big))
        self._pf = torch.ones(pos, dtype=torch.float64, device=self._dev)
        mine = {}
        for b, a, z, fseg, tab, slots, big in made:
            if b.transport is not None:  # another projector's: what it owes is applied first
                b.transport.flush(b.mom)
            b.transport = MomentumTransport(self._pf[a:z], self._T(fseg), self._T(tab), slots, big)
            mine[id(b)] = b.transport
        self._transports = [(b, b.transport) for b, *_ in made]
        for plan in self._plans:
            dst, src, owed = [], [], {}
            for key, fac in plan["seg_fac"].items():
                for axis, off in fac.items():
                    n = self._key_shape(key)[axis]
                    dst.append(glob[(key, axis)] + np.arange(n))
                    src.append(off + np.arange(n))
                b = self.groups[key[0]].buffers[key[1]]
                if id(b) in mine:  # (a buffer whose factored segments are all empty has none)
                    owed[id(b)] = mine[id(b)]
            plan["owe"] = (self._T(np.concatenate(dst)), self._T(np.concatenate(src)), list(owed.values())) \
                if dst else None

    def _owe(self, plan: dict, F: torch.Tensor) -> None:
        """A colour's diagonal factors, applied to the parameters only, owed to the momentum."""
        ow = plan.get("owe")
        if ow is None or not self.lazy:
            return
        dst, src, transports = ow
        self._pf[dst] = self._pf[dst] * F[src]
        for t in transports:
            t.dirty = True

    def _remeasured(self, colours: list) -> bool:
        """Two colours, diagonal families then translations only (a CNN or MLP with the
        cross-entropy translation): the first colour is folded into the *whole* measurement (every
        family's statistics after its factors), the translations take their values from it (the
        second colour is planned in the measurement's layout), and after their shift only the
        statistics tiles of the segments they shift (the classifier's weight and bias) are formed
        again, into the same scratch slots (`_plan_remeasure`): the next measurement then costs a
        read of those segments instead of a pass over every law parameter."""
        return (self.remeasure and self.fold and len(colours) == 2 and not self._fallback_fams
                and all(_kind(f) == "diag" for f in colours[0]) and all(_kind(f) == "shift" for f in colours[1]))

    def _colour_stats(self, ci: int, colours: list) -> _Stats:
        if ci == 1 and self._remeasured(colours):
            return self._measure
        return super()._colour_stats(ci, colours)

    def _plan_remeasure(self) -> None:
        """`plan["remeasure"]` of the second colour where `_remeasured`: per buffer the
        measurement's statistics tiles of the segments it shifts."""
        if len(self._plans) != 2 or self._plans[1]["stats"] is not self._measure:
            return
        from triton_kernels import sgd_stats as K

        by_name = {f.name: f for f in self.laws.families}
        fams = [by_name[n] for n in self.colours[1]]
        cl = self._measure.compiled
        touched = {key for f in fams for key, *_ in self._fps[f.name]}
        bufs = sorted({key[:2] for key in touched})
        if any(cl.gram_table(gi, bi) is not None for gi, bi in bufs):
            return  # (Gram blocks too large for one tile would all be formed again)
        tables = {}
        for gi, bi in bufs:
            segs = [k for g_, b_, k in touched if (g_, b_) == (gi, bi)]
            tables[(gi, bi)] = []
            for variant, tab in cl.stats_tables(gi, bi):
                t = tab.cpu().numpy()
                keep = np.isin(t[:, K.T_SEG], segs)
                if keep.any():
                    tables[(gi, bi)].append((variant, self._T(t[keep])))
        self._plans[1]["remeasure"] = tables

    def _remeasure(self, tables: dict) -> torch.Tensor:
        """The measurement after a colour that moved only the segments of `tables` (`_plan_remeasure`)."""
        from .fused import statistics_pass

        cl = self._measure.compiled
        for (gi, bi), tabs in tables.items():
            statistics_pass(self.groups[gi].buffers[bi], tabs, cl.scratch)
        return self._measure.values(vals=cl.finish())

    def step_laws(self):
        """The compiled laws of the first measurement (every family split into producer and
        consumer halves), for the fused step to form its statistics with: pass them to
        `fused_sgd_step(..., compiled_laws=)` and then read `step_values()`; the projection
        then starts without a statistics pass of its own."""
        self._current()
        return self._measure.compiled

    def step_values(self) -> tuple:
        """(h of every family, the measurement) after a fused step over `step_laws()`: h for the
        tracker (as ``laws.evaluate`` lays it out), the measurement for ``proj(..., measured=)``."""
        v = self._measure.values(vals=self._measure.compiled.finish())
        return self._by_family(v[self._ip] - v[self._ic]), v

    def _plan_fold(self, plan: dict, nxt: _Stats) -> dict:
        """Tables of a colour's apply pass folded into the next statistics pass: `nxt`'s tiles of
        every flat buffer (its step tables, which cover every segment) minus those of segments
        that are neither scaled by this colour nor measured by `nxt`, and per buffer the
        segments' factor geometry (FSEG rows, see `launch_sgd_stats`)."""
        from triton_kernels import sgd_stats as K

        cl = nxt.compiled
        slot_cols = [K.T_RSQ, K.T_RSUM, K.T_CSQ, K.T_CSUM, K.T_GR, K.T_GC]
        fold = {}
        for gi, g in enumerate(self.groups):
            for bi, b in enumerate(g.buffers):
                fseg, big = _factor_table(b.segs, [plan["seg_fac"].get((gi, bi, k), {}) for k in range(len(b.segs))])
                tables = []
                for variant, tab in cl.step_tables(gi, bi):
                    t = tab.cpu().numpy()
                    keep = (fseg[t[:, K.T_SEG], 8] != 0) | (t[:, slot_cols] >= 0).any(1)
                    if keep.any():
                        tables.append((variant, self._T(t[keep])))
                if tables or cl.gram_table(gi, bi) is not None:
                    fold[(gi, bi)] = dict(tables=tables, fseg=self._T(fseg), idx64=big, gram=cl.gram_table(gi, bi))
        return dict(buffers=fold, stats=nxt)

    def _current(self):
        for g in self.groups:
            g.check_params()
        if [g.version for g in self.groups] != self._versions:
            self._build()  # a group rebuilt its buffers (model moved, .data replaced)

    def _buffers(self) -> dict:
        """name -> the parameter's slice of its flat momentum buffer."""
        out = {}
        for name, p in self.params_by_name.items():
            gi, bi, k = self._key(name)
            b = self.groups[gi].buffers[bi]
            if b.mom is not None:
                out[name] = b.view(b.mom, k)
        return out

    def _plan_apply(self, plan: dict, fams, seg_fac: dict, uo: dict, nu: int, do: dict) -> None:
        """The apply kernel's tables per flat buffer (factor slots, row shifts, tiles), the matrix
        kernel's tables per buffer and matrix size (`plan["matkern"]`), and the gather/bmm/scatter
        groups of the matrix slices it does not take (`plan["matmul"]`)."""
        dev = self._dev
        T = self._T
        shifts = [f for f in fams if _kind(f) == "shift"]
        mats = [f for f in fams if _kind(f) == "matrix"]
        plan["apply"], plan["matmul"], plan["matkern"] = {}, [], []
        seg_row, nr = {}, 1  # key -> row offset in CT / RT; row 0: c = 0
        for f in shifts:
            for key, *_ in self._fps[f.name]:
                if key not in seg_row:
                    seg_row[key] = nr
                    nr += self._seg(key).shape[0]
        coef, rowt = np.zeros(nr), np.zeros((nr, 2), np.int64)
        for f in shifts:  # (axis 0 only: `_excluded`; K is a row's length)
            for key, axis, idx, sign, K, col, c in self._shift_terms(f):
                U, S = idx.shape
                row = seg_row[key] + idx  # [U, S]
                coef[row] = c
                if f.form == "vector":  # function off + col + s·K + k takes row index[u, s]'s column k
                    rowt[row, 0] = do[f.name] + col + np.arange(S)[None, :] * K
                    rowt[row, 1] = 1
                else:  # unit u's function, spread evenly over its elements
                    rowt[row, 0] = do[f.name] + np.arange(U)[:, None]
                    rowt[row, 1] = 0
        plan["coef"] = torch.as_tensor(coef, dtype=torch.float64, device=dev)
        plan["rowt"] = T(rowt.reshape(-1))
        from triton_kernels.project import plan_tiles, APPLY_TILE

        for gi, g in enumerate(self.groups):
            for bi, b in enumerate(g.buffers):
                rows = []
                shift_here = False
                for k, sg in enumerate(b.segs):
                    key = (gi, bi, k)
                    fac = seg_fac.get(key, {})
                    if (not fac and key not in seg_row) or sg.numel == 0:
                        continue
                    cols = _factor_cols(fac, sg.shape)
                    krow = max(sg.numel // sg.shape[0], 1)
                    if key in seg_row:
                        shift_here = True
                        cols += [seg_row[key], 1, krow, int(bool(fac))]
                    else:
                        cols += [0, 0, krow, 1]
                    rows.append([sg.base, sg.numel] + cols)
                if rows:
                    tab = plan_tiles(rows, self.tile or APPLY_TILE)
                    big = max(int(r[1]) for r in rows) >= _IDX64_FROM
                    plan["apply"][(gi, bi)] = (T(tab), shift_here, big)
        # -- matrix actions: terms grouped by (buffer, slice pattern); G = [A_f ; A_f⁻ᵀ] per size r
        groups = {}
        for f in mats:
            r = f.units
            fi = plan["mat"][r]["pos"][f.name]
            nfr = plan["mat"][r]["n"]
            for key, axis, idx, sign in self._fps[f.name]:
                sg = self._seg(key)
                off = _offsets(sg.shape, axis, idx)
                q = off - off[0, 0]
                gk = (key[0], key[1], r, q.shape[1], q.tobytes())
                e = groups.setdefault(gk, dict(q=q, bases=[], sel=[], r=r))
                e["bases"].append(sg.base + int(off[0, 0]))
                e["sel"].append(fi if sign > 0 else nfr + fi)
        from triton_kernels.project import MATRIX_MAX_R, matrix_rows

        kern = {}  # (gi, bi, r) -> rows of the matrix kernel
        for (gi, bi, r, _, _), e in groups.items():
            order = np.argsort(e["bases"], kind="stable")  # heads in memory order: often one strided view
            bases, sel = [e["bases"][i] for i in order], [e["sel"][i] for i in order]
            aff = _affine(e["q"]) if self.matrix_kernel and r <= MATRIX_MAX_R else None
            if aff is not None:  # one read and write per element (`triton_kernels.project.matrix_apply_kernel`)
                kern.setdefault((gi, bi, r), []).extend(matrix_rows(bases, sel, r, *aff, e["q"].shape[1]))
                continue
            plan["matmul"].append(dict(gi=gi, bi=bi, r=r, q=T(e["q"])[None], bases=T(bases)[:, None, None],
                                       sel=T(sel), strided=_as_strided(e["q"], bases)))
        plan["matkern"] = [(gi, bi, r, T(rows)) for (gi, bi, r), rows in kern.items()]

    def _apply(self, plan: dict, F: torch.Tensor, G: dict, D) -> torch.Tensor | None:
        """One `triton_kernels.project` launch per flat buffer (diagonal factors and shifts, on
        parameters and momentum), one matrix-kernel launch per buffer and matrix size (or a
        batched matmul per slice pattern the kernel does not take); a colour of
        diagonal families only is instead folded into the next statistics pass (`_apply_folded`)."""
        from triton_kernels.project import launch_matrix_apply, launch_symmetry_apply

        if plan.get("fold") is not None:
            nxt = self._apply_folded(plan["fold"], F)
            self._owe(plan, F)
            return nxt

        for (gi, bi), (tab, shift_here, big) in plan["apply"].items():
            b = self.groups[gi].buffers[bi]
            launch_symmetry_apply(b.param, None if self.lazy else b.mom, F, tab, coef=plan["coef"],
                                  rowtab=plan["rowt"], shift=D if shift_here else None, idx64=big)
        self._owe(plan, F)
        for gi, bi, r, table in plan["matkern"]:  # (the momentum too: matrix actions are never owed)
            b = self.groups[gi].buffers[bi]
            launch_matrix_apply(b.param, b.mom, G[r], table, r)
        for mm in plan["matmul"]:
            b = self.groups[mm["gi"]].buffers[mm["bi"]]
            g = G[mm["r"]][mm["sel"]]
            if mm["strided"] is not None:  # the slices as one strided view: no index gather
                size, stride, off = mm["strided"]
                g4 = g.view(size[0], size[1], mm["r"], mm["r"])
                i4 = _identity(g).view(size[0], size[1], 1, 1)
                for buf in (b.param, b.mom):
                    if buf is not None:
                        x = buf.as_strided(size, stride, buf.storage_offset() + off)
                        x64 = x.to(torch.float64)
                        x.copy_(torch.where(i4, x64, g4 @ x64).to(buf.dtype))
                continue
            idx = (mm["bases"] + mm["q"]).reshape(-1)
            ident = _identity(g)
            for buf in (b.param, b.mom):
                if buf is None:
                    continue
                x = buf[idx].view(g.shape[0], mm["r"], -1).to(torch.float64)
                buf.index_put_((idx,), torch.where(ident, x, g @ x).reshape(-1).to(buf.dtype))
        if plan.get("remeasure") is not None:  # (a colour of translations only: no matrix actions)
            return self._remeasure(plan["remeasure"])
        return None

    def _apply_folded(self, fold: dict, F: torch.Tensor) -> torch.Tensor:
        """The diagonal factors applied by the statistics kernel itself (its SCALE prologue: per
        element x ← x·fA·fB on parameters and momentum, rounded once as `triton_kernels.project`
        does), which forms the next statistics from the values it stores: one pass over the law
        parameters instead of an apply pass plus a statistics pass."""
        from .fused import statistics_pass

        cl = fold["stats"].compiled
        lazy = self.lazy
        for (gi, bi), fb in fold["buffers"].items():
            b = self.groups[gi].buffers[bi]
            statistics_pass(b, fb["tables"], cl.scratch, fb["gram"], mom=None if lazy else b.mom,
                            scale=(F, fb["fseg"]), idx64=fb["idx64"])
        return fold["stats"].values(vals=cl.finish())



class TensorProjector(_ColouredProjector):
    """The symmetry projection on the parameter tensors themselves (no flat buffers): the same
    colours, actions and over-relaxed rounds as `FlatProjector`, used by `consopt.SGD` off the
    fused path (the CPU, and CUDA without Triton).

    Per colour and round:
      1. the producer/consumer statistics of the colour's families from one `LawEvaluator` over
         their split halves — with ``backend="native"`` one C++ pass over the tensors (sums,
         sums of squares, the Grams of aligned unit groups, `consopt.native`), else chunked
         float64 torch ops; colour 0 measures every family (residual, and h at the result);
      2. the actions on tiny tensors (`_ColouredProjector._actions`; coupled diagonal families
         jointly);
      3. per tensor, every diagonal factor along its (at most two) axes in one pass, on the
         parameter and its momentum buffer: θ ← float64(θ)·f_a[i]·f_b[j] rounded once (the
         native `ScaleApply` for contiguous float32/float64 CPU tensors, torch ops otherwise);
         per (tensor, axis, slice pattern) of the matrix families x ← x + (G − I)x with G = A or
         A⁻ᵀ, one bmm in x's dtype (a view where the slices are consecutive, else gather/scatter):
         the correction (G − I)x is ~|X| smaller than x, so its own rounding is negligible and x
         is rounded once, as by the float64 product.
    Translation families shift slices: an add on a view where a term's slices are consecutive,
    else gather / add / scatter (a velocity does not change).
    Momentum buffers are passed per call (``proj(h0, buffers=...)``: name -> buffer).
    """

    def __init__(self, laws: LawSet, params_by_name, *, backend: str = "eager"):
        self.backend = backend
        self._bufs: dict = {}
        self._given = None  # statistics handed to this call (`__call__`'s stats)
        super().__init__(laws, params_by_name)

    def _key(self, name):
        return name

    def _key_shape(self, key) -> tuple:
        return tuple(self.params_by_name[key].shape)

    def _build(self):
        super()._build()
        self._devices = {n: self.params_by_name[n].device for n in self.laws.param_names}
        # the statistics keys the first measurement reads (what `stats=` must hold to replace it)
        self._need = {(n, op, a) for n, spec in self._measure.evaluate._stats.items() for op, a in spec.keys()}

    def _current(self):
        """A law parameter of another shape is an error (the laws no longer describe it); one moved
        to another device rebuilds the tables there."""
        self.laws.check_params(self.params_by_name, what="projector's parameters")
        if any(self.params_by_name[n].device != d for n, d in self._devices.items()):
            names = self.laws.param_names
            self._dev = self.params_by_name[names[0]].device
            self._h0_key, self._last, self._carry, self._prev_rounds = None, None, None, None
            self._build()

    def _make_stats(self, fams) -> _Stats:
        from .functional import LawEvaluator

        def make_eval(split):
            return LawEvaluator(split, self.params_by_name, backend=self.backend)

        return _Stats(self.laws, fams, make_eval, self._dev)

    def _buffers(self) -> dict:
        return self._bufs

    def _plan_apply(self, plan: dict, fams, seg_fac: dict, uo: dict, nu: int, do: dict) -> None:
        T = self._T
        # diagonal: (name, [(axis, its slot in F)]) per tensor; native ScaleApply per (dtype, subset)
        plan["scale"] = [(name, [(a, ax[a]) for a in sorted(ax)]) for name, ax in seg_fac.items()]
        plan["scale_native"] = {}
        # matrix: terms grouped by (tensor, axis, slice shape); G[r][sel] acts on each
        groups = {}
        for f in [f for f in fams if _kind(f) == "matrix"]:
            r = f.units
            fi = plan["mat"][r]["pos"][f.name]
            nfr = plan["mat"][r]["n"]
            for name, axis, idx, sign in self._fps[f.name]:
                e = groups.setdefault((name, axis, r, idx.shape[1]), dict(idx=[], sel=[]))
                e["idx"].append(idx)
                e["sel"].append(fi if sign > 0 else nfr + fi)
        plan["matmul"] = []
        for (name, axis, r, _), e in groups.items():
            order = np.argsort([int(i[0, 0]) for i in e["idx"]], kind="stable")  # in memory order
            idx = np.stack([e["idx"][i] for i in order]).reshape(-1)
            run = int(idx[0]) if np.array_equal(idx, idx[0] + np.arange(idx.size)) else None
            plan["matmul"].append(dict(name=name, axis=axis, r=r, n=len(order), idx=T(idx), run=run,
                                       sel=T([e["sel"][i] for i in order])))
        # translation: each term's rows get coef · D[...] (as the Triton kernel's row tables)
        plan["shift_rows"] = []
        for f in [f for f in fams if _kind(f) == "shift"]:
            for name, axis, idx, sign, K, col, coef in self._shift_terms(f):
                U, S = idx.shape
                if f.form == "vector":  # row index[u, s] gets sign/U · D[off + col + s·K + k] at column k
                    d = T(do[f.name] + col + np.arange(S * K)).view(1, S, K)
                else:  # unit u's function, spread evenly over its elements
                    d = T(do[f.name] + np.arange(U)).view(U, 1, 1)
                flat = idx.reshape(-1)
                run = int(flat[0]) if flat.size and np.array_equal(flat, flat[0] + np.arange(flat.size)) else None
                plan["shift_rows"].append((name, axis, T(flat), run, (U, S, K), d, coef))

    @torch.no_grad()
    def __call__(self, h0: dict, *, buffers: dict | None = None, stats: dict | None = None, **kw) -> ProjectionStats:
        """As `_ColouredProjector.__call__`; `buffers`: name -> momentum buffer, moved with it;
        `stats`: the statistics {(name, op, axis): tensor} of the current parameters that the
        native step formed (`consopt.native`): the first measurement then reads no parameter
        (their Gram matrices are left out: those families are formed from the parameters)."""
        self._bufs = {n: b for n, b in (buffers or {}).items() if n in self.params_by_name and b is not None}
        self._given = None
        if stats is not None and self._need.issubset(stats):
            self._given = {k: stats[k] for k in self._need}
        return super().__call__(h0, **kw)

    def _first_measurement(self):
        given, self._given = self._given, None
        return self._measure.values(given) if given is not None else self._measure.values()

    def _apply(self, plan: dict, F: torch.Tensor, G: dict, D) -> None:  # (never folded: returns None)
        by_dtype, slow = {}, []
        for i, (name, slots) in enumerate(plan["scale"]):
            p, m = self.params_by_name[name].detach(), self._bufs.get(name)
            if self.backend == "native" and _native_scale_ok(p, m):
                by_dtype.setdefault(p.dtype, []).append(i)
            else:
                slow.append(i)
        for dt, items in by_dtype.items():
            key = (dt, tuple(items))
            sa = plan["scale_native"].get(key)
            if sa is None:
                from .native import ScaleApply

                sa = plan["scale_native"][key] = ScaleApply(
                    [(self._key_shape(plan["scale"][i][0]), plan["scale"][i][1]) for i in items])
            names = [plan["scale"][i][0] for i in items]
            sa.run([self.params_by_name[n].detach() for n in names], [self._bufs.get(n) for n in names], F)
        for i in slow:  # the same arithmetic in torch ops: float64 product, rounded once
            name, slots = plan["scale"][i]
            for x in (self.params_by_name[name].detach(), self._bufs.get(name)):
                if x is None:
                    continue
                y = x.to(torch.float64)
                for a, o in slots:
                    shape = [1] * x.dim()
                    shape[a] = -1
                    y = y * F[o:o + x.shape[a]].view(shape)
                x.copy_(y)
        for name, axis, idx, run, (U, S, K), d, coef in plan["shift_rows"]:  # momentum: a velocity, unchanged
            view = self.params_by_name[name].detach().movedim(axis, 0)
            shift = (coef * D[d]).to(view.dtype)  # ~ the drift: small next to θ, rounded once in the add
            if run is not None:  # consecutive slices: add on a view, no gather
                try:
                    blk = view[run:run + idx.numel()].view(U, S, K)
                except RuntimeError:
                    blk = None
                if blk is not None:
                    blk.add_(shift)
                    continue
            y = view.index_select(0, idx).reshape(U, S, K) + shift
            view.index_copy_(0, idx, y.reshape((U * S,) + tuple(view.shape[1:])))
        eye = {}
        for mm in plan["matmul"]:
            r = mm["r"]
            if r not in eye:
                eye[r] = torch.eye(r, dtype=torch.float64, device=F.device)
            g = G[r][mm["sel"]] - eye[r]  # x + (g − I) x in x's dtype: the small correction carries the rounding
            moved = ~_identity(G[r][mm["sel"]])  # (a skipped family's I: no product, which would turn inf into NaN)
            for x in (self.params_by_name[mm["name"]].detach(), self._bufs.get(mm["name"])):
                if x is None:
                    continue
                gx = g.to(x.dtype)
                view = x.movedim(mm["axis"], 0)
                if mm["run"] is not None:  # consecutive slices: act on a view, no gather
                    try:
                        blk = view[mm["run"]:mm["run"] + mm["idx"].numel()].view(mm["n"], r, -1)
                    except RuntimeError:  # trailing dimensions that do not merge into one
                        blk = None
                    if blk is not None:
                        blk.add_(torch.where(moved, gx @ blk, 0))
                        continue
                y = view.index_select(0, mm["idx"]).reshape(mm["n"], r, -1)
                view.index_copy_(0, mm["idx"], (y + torch.where(moved, gx @ y, 0)).reshape((-1,) + tuple(view.shape[1:])))


def _native_scale_ok(p: torch.Tensor, m) -> bool:
    from . import native

    return native.can_scale(p) and (m is None or (native.can_scale(m) and m.dtype == p.dtype))
