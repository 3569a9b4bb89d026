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
"""

from __future__ import annotations

import dataclasses

import torch

from .laws import Family, LawSet


@dataclasses.dataclass
class ProjectionStats:
    rounds: int = 0
    skipped: int = 0  # units / directions that could not be moved onto the level set
    max_residual: float = 0.0  # max over families of max |h − h₀| / scale after the last round
    converged: bool = True


def _read(term, p):
    return term.slices(p).to(torch.float64)


def _write(term, p, m):
    """Write the [units, K] float64 slice `m` back into parameter `p` (in p's dtype)."""
    idx = term.index.to(p.device)
    view = p.movedim(term.axis, 0)
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
        # u = a²: p u² − h₀ u − c = 0, positive root (u = −c/h₀ when the producer side is zero)
        disc = h0 * h0 + 4 * p * c
        u = torch.where(p > 0, (h0 + torch.sqrt(disc.clamp_min(0))) / (2 * p).clamp_min(1e-300), -c / h0)
        ok = (p + c > 0) & torch.isfinite(u) & (u > 0)
        a = torch.where(ok, torch.sqrt(torch.where(ok, u, torch.ones_like(u))), torch.ones_like(u))
        up, down = a, 1 / a
        move_buffers = True
    for i, t in enumerate(s.fam.terms):
        f = up if t.sign > 0 else down
        s.m[i] = s.m[i] * f[:, None]
        if move_buffers and s.b[i] is not None:
            s.b[i] = s.b[i] * f[:, None]
    return ok


def _lyapunov(S, R):
    """Solve X S + S X = R for symmetric X (S symmetric PSD); directions with λ_i + λ_j ≈ 0 are dropped."""
    lam, U = torch.linalg.eigh(S)
    denom = lam[:, None] + lam[None, :]
    tiny = denom.abs() <= 1e-12 * max(float(lam.abs().max()), 1e-300)
    Rt = U.T @ R @ U
    Xt = torch.where(tiny, torch.zeros_like(Rt), Rt / torch.where(tiny, torch.ones_like(denom), denom))
    return U @ Xt @ U.T, int(tiny.sum())


def _matrix_step(s: _Slices, h0, euclid: bool):
    pos, neg = s.sums()
    P = _gram(pos, True)
    C = _gram(neg, True) if neg else torch.zeros_like(P)
    R = h0 - (P - C)
    R = (R + R.T) / 2
    X, dropped = _lyapunov(P + C, R)
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
    return dropped == 0


def _translation(s: _Slices, h0):
    fam = s.fam
    if fam.form == "diag":  # per-channel bias: set it
        (t,) = fam.terms
        s.m[0] = h0[:, None].to(s.m[0].dtype).expand_as(s.m[0]).clone()
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
        scales = {f.name: f.value(params, absolute=True).clamp_min(1e-300) for f in laws.families}
    if euclid:
        return _euclidean(laws, params, h0, scales, tol, max_rounds)
    history = []
    with torch.no_grad():
        for rnd in range(max_rounds):
            ok = {}
            for f in laws.families:
                s = _Slices(f, params, buffers)
                target = h0[f.name].to(torch.float64).to(s.m[0].device)
                if f.order == 1:
                    ok[f.name] = _translation(s, target)
                elif f.kind == "scale":
                    ok[f.name] = _scale(s, target)
                elif f.form == "matrix":
                    ok[f.name] = _matrix_step(s, target, euclid)
                else:
                    ok[f.name] = _diag_symmetry(s, target, euclid)
                s.store()
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


def _euclidean(laws: LawSet, params: dict, h0: dict, scales: dict, tol: float, max_iter: int) -> ProjectionStats:
    """argmin ‖θ − θ_t‖ s.t. h(θ) = h₀, by Gauss–Newton on the KKT conditions θ = θ_t + J(θ)ᵀλ.

    Each outer step linearises the constraints at θ and solves J Jᵀ λ = h₀ − h(θ) − J(θ_t − θ)
    by conjugate gradients with matrix-free products (torch.func jvp / vjp), so the result is the
    joint nearest point over all families, not a sequence of per-family projections."""
    from torch.func import jvp, vjp

    names = laws.param_names
    theta_t = {n: params[n].detach().to(torch.float64).clone() for n in names}
    fams = laws.families
    target = torch.cat([h0[f.name].to(torch.float64).reshape(-1).to(theta_t[names[0]].device) for f in fams])
    scale = torch.cat([scales[f.name].reshape(-1).to(target.device) for f in fams])
    quad = torch.cat([torch.full((scales[f.name].numel(),), f.order == 2, dtype=torch.bool) for f in fams]).to(
        target.device)  # order-1 laws are finished exactly below

    def h_of(th):
        return torch.cat([f.value(th).reshape(-1) for f in fams])

    def dot(a, b):
        return sum((a[n] * b[n]).sum() for n in a)

    theta = {n: v.clone() for n, v in theta_t.items()}
    stats = ProjectionStats()
    for it in range(min(max_iter, 30)):
        hv, vjp_fn = vjp(h_of, theta)
        stats.rounds = it + 1
        res = ((hv - target).abs() / scale)[quad]
        stats.max_residual = float(res.max()) if res.numel() else 0.0
        if stats.max_residual <= tol and it > 0:
            break
        jv = lambda v: jvp(h_of, (theta,), (v,))[1]  # noqa: E731
        diff = {n: theta_t[n] - theta[n] for n in names}
        rhs = target - hv - jv(diff)
        # CG on J Jᵀ λ = rhs (PSD; consistent even where symmetric entries repeat)
        lam = torch.zeros_like(rhs)
        r = rhs.clone()
        pdir = r.clone()
        rr = float(r @ r)
        stop = (1e-30 + 1e-28 * float(rhs @ rhs))
        for _ in range(max(50, 4 * rhs.numel())):
            if rr <= stop:
                break
            (jt,) = vjp_fn(pdir)
            ap = jv(jt)
            alpha = rr / float(pdir @ ap)
            lam = lam + alpha * pdir
            r = r - alpha * ap
            rr_new = float(r @ r)
            pdir = r + (rr_new / rr) * pdir
            rr = rr_new
        (jt,) = vjp_fn(lam)
        theta = {n: theta_t[n] + jt[n] for n in names}
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
    stats.max_residual = float(((hv - target).abs() / scale).max()) if hv.numel() else 0.0
    stats.converged = stats.max_residual <= tol
    return stats
