// consopt's CPU step: torch.optim.SGD's update and the float64 law statistics in one pass.
//
// Each work item is a block of rows of one tensor viewed as [R, C] (contiguous). For every
// element it applies torch's update with torch's roundings (every add(x, alpha=a) of torch's
// CPU kernels is a fused multiply-add; `buf * momentum` is rounded on its own):
//     d = maximize ? -g : g;   d = fma(p, lambda, d)                      (weight decay)
//     m = fma(d, 1 - dampening, m * mu);  d = nesterov ? fma(m, mu, d) : m  (momentum)
//     p = fma(d, -lr, p)
// and, for tensors with statistics, accumulates x = (double)p_new exactly squared in float64:
// per row Σx and Σx², per column partial sums for this block, and where asked the Gram matrices
// of aligned groups of U rows (X Xᵀ) or of U columns (Σ_r v vᵀ) from the block staged in float64.
// A second phase sums the column partials over blocks in block order, so results do not depend
// on the thread count.
// Built and loaded by consopt/native.py; checked bit for bit against torch at first use.
#include <algorithm>
#include <cmath>
#include <omp.h>
#include <cstdint>
#include <cstring>
#include <memory>

namespace {

template <typename T, bool MAXI, bool WD, bool MOM, bool NEST, bool WG, bool UPDATE>
inline T step_elem(T* __restrict p, T* __restrict g, T* __restrict m, int64_t i, T neg_lr, T mu, T damp1, T lam) {
  if (!UPDATE) return p[i];
  T d = g[i];
  if (MAXI) d = -d;
  if (WD) d = std::fma(p[i], lam, d);
  if (MOM) {
    T mm = std::fma(d, damp1, m[i] * mu);
    m[i] = mm;
    if (NEST) {
      d = std::fma(mm, mu, d);
      if (WG) g[i] = d;
    } else {
      d = mm;
    }
  }
  T np = std::fma(d, neg_lr, p[i]);
  p[i] = np;
  return np;
}

// Gram blocks use GCC/Clang vector types (lowered to the target's widest vectors) so that the
// accumulators stay in registers; compiled with -ffp-contract=fast, a += x * y is one FMA.
typedef double v8 __attribute__((vector_size(64)));
inline v8 load8(const double* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void store8(double* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }

// G = X Xᵀ for X [U, K] (rows K apart), both triangles written: 4×4 blocks of dot products.
void gram_rows(const double* __restrict X, int64_t U, int64_t K, double* __restrict G) {
  const int64_t U4 = K < 8 ? 0 : U - U % 4, K8 = K - K % 8;  // short rows (biases): plain dot products
  for (int64_t i = 0; i < U4; i += 4)
    for (int64_t j = 0; j <= i; j += 4) {
      v8 acc[16] = {};
      const double *x = X + i * K, *y = X + j * K;
      for (int64_t k = 0; k < K8; k += 8) {
        const v8 a[4] = {load8(x + k), load8(x + K + k), load8(x + 2 * K + k), load8(x + 3 * K + k)};
        const v8 b[4] = {load8(y + k), load8(y + K + k), load8(y + 2 * K + k), load8(y + 3 * K + k)};
        for (int p = 0; p < 4; ++p)
          for (int q = 0; q < 4; ++q) acc[p * 4 + q] += a[p] * b[q];
      }
      for (int p = 0; p < 4; ++p)
        for (int q = 0; q < 4; ++q) {
          double s = 0;
          for (int l = 0; l < 8; ++l) s += acc[p * 4 + q][l];
          for (int64_t k = K8; k < K; ++k) s += x[p * K + k] * y[q * K + k];
          G[(i + p) * U + j + q] = s;
          G[(j + q) * U + i + p] = s;
        }
    }
  for (int64_t i = U4; i < U; ++i)  // rows outside the 4×4 blocks, against every row
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      const double *x = X + i * K, *y = X + j * K;
      for (int64_t k = 0; k < K; ++k) s += x[k] * y[k];
      G[i * U + j] = s;
      G[j * U + i] = s;
    }
}

// P[g] = Σ_r v_r v_rᵀ with v_r = S[r, g·U : (g+1)·U], for S [n, C] (row-major) and every group g:
// 4 rows × 32 columns of P in registers while the block's rows stream by.
void gram_cols(const double* __restrict S, int64_t n, int64_t C, int64_t U, double* __restrict P) {
  const int64_t ng = C / U;
  if (U % 32 == 0) {
    for (int64_t g = 0; g < ng; ++g) {
      double* Pg = P + g * U * U;
      for (int64_t i0 = 0; i0 < U; i0 += 4)
        for (int64_t j0 = 0; j0 < U; j0 += 32) {
          v8 acc[4][4] = {};
          for (int64_t r = 0; r < n; ++r) {
            const double* v = S + r * C + g * U;
            const v8 b[4] = {load8(v + j0), load8(v + j0 + 8), load8(v + j0 + 16), load8(v + j0 + 24)};
            for (int a = 0; a < 4; ++a) {
              v8 s = {};
              s += v[i0 + a];
              for (int q = 0; q < 4; ++q) acc[a][q] += s * b[q];
            }
          }
          for (int a = 0; a < 4; ++a)
            for (int q = 0; q < 4; ++q) store8(Pg + (i0 + a) * U + j0 + 8 * q, acc[a][q]);
        }
    }
    return;
  }
  std::memset(P, 0, sizeof(double) * ng * U * U);
  for (int64_t r = 0; r < n; ++r) {
    const double* row = S + r * C;
    for (int64_t g = 0; g < ng; ++g) {
      const double* v = row + g * U;
      double* Pg = P + g * U * U;
      for (int64_t i = 0; i < U; ++i) {
        const double vi = v[i];
        double* Pi = Pg + i * U;
        for (int64_t j = 0; j < U; ++j) Pi[j] += vi * v[j];
      }
    }
  }
}

template <typename T, bool MAXI, bool WD, bool MOM, bool NEST, bool WG, bool UPDATE>
void flat_item(T* __restrict p, T* __restrict g, T* __restrict m, int64_t a, int64_t b, T neg_lr, T mu, T damp1,
               T lam) {
#pragma omp simd
  for (int64_t i = a; i < b; ++i) step_elem<T, MAXI, WD, MOM, NEST, WG, UPDATE>(p, g, m, i, neg_lr, mu, damp1, lam);
}

// Rows r0..r1 of a tensor viewed as [R, C]: update, Σx² per row (rq) and into this block's column
// partials (cq); with SUMS also Σx (rs, cs); with STAGE the values in float64 into stage [rows, C].
template <typename T, bool MAXI, bool WD, bool MOM, bool NEST, bool WG, bool UPDATE, bool SUMS, bool STAGE>
void stats_item(T* __restrict p, T* __restrict g, T* __restrict m, int64_t r0, int64_t r1, int64_t C, T neg_lr,
                T mu, T damp1, T lam, double* __restrict rs, double* __restrict rq, double* __restrict cs,
                double* __restrict cq, double* __restrict stage) {
  if (C == 1) {  // a vector: each element is a row
    double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t r = r0; r < r1; ++r) {
      const double x = (double)step_elem<T, MAXI, WD, MOM, NEST, WG, UPDATE>(p, g, m, r, neg_lr, mu, damp1, lam);
      if constexpr (STAGE) stage[r - r0] = x;
      if constexpr (SUMS) {
        rs[r] = x;
        s += x;
      }
      rq[r] = x * x;
      q += x * x;
    }
    if constexpr (SUMS) cs[0] = s;
    cq[0] = q;
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    if constexpr (SUMS) cs[c] = 0;
    cq[c] = 0;
  }
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict pr = p + r * C;
    T* __restrict gr = UPDATE ? g + r * C : nullptr;
    T* __restrict mr = (UPDATE && MOM) ? m + r * C : nullptr;
    double* __restrict st = STAGE ? stage + (r - r0) * C : nullptr;
    double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
    for (int64_t c = 0; c < C; ++c) {
      const double x = (double)step_elem<T, MAXI, WD, MOM, NEST, WG, UPDATE>(pr, gr, mr, c, neg_lr, mu, damp1, lam);
      if constexpr (STAGE) st[c] = x;
      if constexpr (SUMS) {
        s += x;
        cs[c] += x;
      }
      q += x * x;
      cq[c] += x * x;
    }
    if constexpr (SUMS) rs[r] = s;
    rq[r] = q;
  }
}

// out[0:n] = Σ_b src[b·stride : b·stride + n] over nb ≥ 1 blocks, added in block order.
inline void sum_blocks(double* __restrict out, const double* __restrict src, int64_t stride, int64_t n,
                       int64_t nb) {
  std::memcpy(out, src, n * sizeof(double));
  for (int64_t b = 1; b < nb; ++b) {
    const double* pb = src + b * stride;
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) out[x] += pb[x];
  }
}

struct Args {
  void** P;
  void** G;
  void** M;
  const int64_t* C;
  double** RS;
  double** RQ;
  double** CS;  // column sums, [C]
  double** CQ;  // column sums of squares, [C] (null: no statistics for this tensor)
  const int64_t* SUMS;  // per tensor: also the plain sums (rows and columns)
  double* partial;          // column partials: per tensor [nblocks, 2, C] at part_off
  const int64_t* part_off;
  const int64_t* nblocks;
  int64_t nitems;
  const int64_t* it_t;   // item -> tensor
  const int64_t* it_r0;  // first row
  const int64_t* it_r1;  // end row
  const int64_t* it_b;   // block index within its tensor
  int64_t ntensors;
  const int64_t* RGU;    // per tensor: Gram of every U consecutive rows (0: none) ...
  double** RG;           // ... group g's [U, U] written at RG[t] + RGO[t][g] (skipped where < 0)
  int64_t** RGO;
  const int64_t* CGU;    // per tensor: Gram of every U consecutive columns (0: none), likewise
  double** CG;
  int64_t** CGO;
  double* gpartial;      // column Grams per block: [nblocks, C / U, U, U] at gpart_off
  const int64_t* gpart_off;
  int64_t stage_max;     // largest [rows, C] block of a tensor with Grams
  const int64_t* it_cost;  // [nitems + 1]: estimated cost of items 0..i-1 (it_cost[0] = 0)
};

template <typename T, bool MAXI, bool WD, bool MOM, bool NEST, bool WG, bool UPDATE>
void run(const Args& a, double neg_lr_d, double mu_d, double damp1_d, double lam_d, int nthreads) {
  const T neg_lr = (T)neg_lr_d, mu = (T)mu_d, damp1 = (T)damp1_d, lam = (T)lam_d;
#pragma omp parallel num_threads(nthreads)
  {
    std::unique_ptr<double[]> stage_buf;  // allocated by the threads that form Grams, uninitialised
    // each thread takes a contiguous run of items holding an equal share of their estimated cost
    // (items differ: 32 rows of a wide conv weight, a bias, a block with Gram matrices)
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num(), total = a.it_cost[a.nitems];
    const int64_t lo = total / nth * tid + std::min(tid, total % nth);
    const int64_t hi = total / nth * (tid + 1) + std::min(tid + 1, total % nth);
    const int64_t i0 = std::lower_bound(a.it_cost, a.it_cost + a.nitems, lo) - a.it_cost;
    const int64_t i1 = std::lower_bound(a.it_cost, a.it_cost + a.nitems, hi) - a.it_cost;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t = a.it_t[i], C = a.C[t];
      T* p = (T*)a.P[t];
      T* g = UPDATE ? (T*)a.G[t] : nullptr;
      T* m = (UPDATE && MOM) ? (T*)a.M[t] : nullptr;
      if (a.CQ[t] == nullptr) {
        const int64_t n0 = a.it_r0[i] * C, n1 = a.it_r1[i] * C;
        flat_item<T, MAXI, WD, MOM, NEST, WG, UPDATE>(p, g, m, n0, n1, neg_lr, mu, damp1, lam);
      } else {
        double* part = a.partial + a.part_off[t] + a.it_b[i] * 2 * C;
        const int64_t r0 = a.it_r0[i], r1 = a.it_r1[i], ru = a.RGU[t], cu = a.CGU[t];
        if ((ru || cu) && !stage_buf) stage_buf.reset(new double[a.stage_max]);
        double* stage = (ru || cu) ? stage_buf.get() : nullptr;
        double *rs = a.RS[t], *rq = a.RQ[t];
#define CONSOPT_STATS(SU, ST)                                                                                 \
  stats_item<T, MAXI, WD, MOM, NEST, WG, UPDATE, SU, ST>(p, g, m, r0, r1, C, neg_lr, mu, damp1, lam, rs, rq, part, \
                                                         part + C, stage)
        if (a.SUMS[t]) {
          if (stage) CONSOPT_STATS(true, true); else CONSOPT_STATS(true, false);
        } else {
          if (stage) CONSOPT_STATS(false, true); else CONSOPT_STATS(false, false);
        }
#undef CONSOPT_STATS
        if (ru)  // the block holds whole groups of rows (its height is a multiple of U)
          for (int64_t g0 = r0; g0 < r1; g0 += ru) {
            const int64_t off = a.RGO[t][g0 / ru];
            if (off >= 0) gram_rows(stage + (g0 - r0) * C, ru, C, a.RG[t] + off);
          }
        if (cu) gram_cols(stage, r1 - r0, C, cu, a.gpartial + a.gpart_off[t] + a.it_b[i] * C * cu);
      }
    }
#pragma omp barrier
    // column sums: partials summed over blocks in block order (thread-count independent)
#pragma omp for schedule(static)
    for (int64_t t = 0; t < a.ntensors; ++t) {
      if (a.CQ[t] == nullptr) continue;
      const int64_t C = a.C[t], nb = a.nblocks[t];
      const double* part = a.partial + a.part_off[t];  // per block: [Σx | Σx²], C each
      sum_blocks(a.CQ[t], part + C, 2 * C, C, nb);
      if (a.SUMS[t]) sum_blocks(a.CS[t], part, 2 * C, C, nb);
      if (a.CGU[t]) {  // column Grams: per block [C / U, U, U]
        const int64_t cu = a.CGU[t], uu = cu * cu;
        const double* gp = a.gpartial + a.gpart_off[t];
        for (int64_t gi = 0; gi < C / cu; ++gi)
          if (a.CGO[t][gi] >= 0) sum_blocks(a.CG[t] + a.CGO[t][gi], gp + gi * uu, C * cu, uu, nb);
      }
    }
  }
}

template <typename T>
int dispatch(const Args& a, int flags, double neg_lr, double mu, double damp1, double lam, int nthreads) {
  // flags: 1 maximize, 2 weight decay, 4 momentum, 8 nesterov, 16 nesterov writes the gradient,
  // 32 statistics only (no update)
  if (flags & 32) {
    run<T, false, false, false, false, false, false>(a, neg_lr, mu, damp1, lam, nthreads);
    return 0;
  }
#define CONSOPT_CASE(F, MX, WDV, MO, NE, W)                                     \
  case F:                                                                       \
    run<T, MX, WDV, MO, NE, W, true>(a, neg_lr, mu, damp1, lam, nthreads);     \
    return 0;
#define CONSOPT_MOM(B, MX, WDV)                    \
  CONSOPT_CASE(B, MX, WDV, false, false, false)    \
  CONSOPT_CASE(B | 4, MX, WDV, true, false, false) \
  CONSOPT_CASE(B | 12, MX, WDV, true, true, false) \
  CONSOPT_CASE(B | 28, MX, WDV, true, true, true)
  switch (flags) {
    CONSOPT_MOM(0, false, false)
    CONSOPT_MOM(1, true, false)
    CONSOPT_MOM(2, false, true)
    CONSOPT_MOM(3, true, true)
    default:
      return 1;
  }
#undef CONSOPT_MOM
#undef CONSOPT_CASE
}

// The diagonal symmetry action of the projection: a tensor viewed as [n0, da, n1, db, n2] gets
// x <- x * fa[ia] * fb[ib] in float64, rounded to T once (the Triton apply kernel's arithmetic);
// its momentum m by the same factors. fa / fb null: factor 1.
template <typename T>
void scale_tensor(T* __restrict p, T* __restrict m, const double* __restrict fa, const double* __restrict fb,
                  const int64_t* d, int nthreads) {
  const int64_t n0 = d[0], da = d[1], n1 = d[2], db = d[3], n2 = d[4];
  const int64_t rows = n0 * da * n1, inner = db * n2;
  const bool par = rows > 1 && rows * inner >= 65536;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (par)
  for (int64_t r = 0; r < rows; ++r) {
    const double f = fa ? fa[(r / n1) % da] : 1.0;
    T* __restrict x = p + r * inner;
    T* __restrict y = m ? m + r * inner : nullptr;
    if (n2 == 1 && fb) {  // the factor axis is the innermost one (a Linear weight's columns)
      for (int64_t j = 0; j < db; ++j) x[j] = (T)((double)x[j] * f * fb[j]);
      if (y)
        for (int64_t j = 0; j < db; ++j) y[j] = (T)((double)y[j] * f * fb[j]);
      continue;
    }
    for (int64_t j = 0; j < db; ++j) {
      const double g = fb ? fb[j] : 1.0;
      const int64_t o = j * n2;
      for (int64_t k = 0; k < n2; ++k) x[o + k] = (T)((double)x[o + k] * f * g);
      if (y)
        for (int64_t k = 0; k < n2; ++k) y[o + k] = (T)((double)y[o + k] * f * g);
    }
  }
}

}  // namespace

extern "C" int consopt_sgd_stats(int dtype, int flags, int64_t ntensors, void** P, void** G, void** M,
                                 const int64_t* C, double** RS, double** RQ, double** CS, double** CQ,
                                 const int64_t* SUMS, double* partial, const int64_t* part_off, const int64_t* nblocks, int64_t nitems,
                                 const int64_t* it_t, const int64_t* it_r0, const int64_t* it_r1,
                                 const int64_t* it_b, const int64_t* RGU, double** RG, int64_t** RGO,
                                 const int64_t* CGU, double** CG, int64_t** CGO, double* gpartial,
                                 const int64_t* gpart_off, int64_t stage_max, const int64_t* it_cost, double neg_lr,
                                 double mu, double damp1, double lam, int nthreads) {
  Args a{P,    G,     M,     C,    RS,       RQ,  CS, CQ,  SUMS, partial, part_off, nblocks, nitems, it_t,
         it_r0, it_r1, it_b, ntensors, RGU, RG, RGO, CGU, CG, CGO, gpartial, gpart_off, stage_max, it_cost};
  if (dtype == 0) return dispatch<float>(a, flags, neg_lr, mu, damp1, lam, nthreads);
  if (dtype == 1) return dispatch<double>(a, flags, neg_lr, mu, damp1, lam, nthreads);
  return 2;
}

extern "C" int consopt_scale_apply(int dtype, int64_t ntensors, void** P, void** M, const double* F,
                                   const int64_t* FA, const int64_t* FB, const int64_t* dims, int nthreads) {
  // tensor t's factors: F + FA[t] along its a-slot, F + FB[t] along its b-slot (-1: none)
  for (int64_t t = 0; t < ntensors; ++t) {
    const double* fa = FA[t] >= 0 ? F + FA[t] : nullptr;
    const double* fb = FB[t] >= 0 ? F + FB[t] : nullptr;
    if (dtype == 0)
      scale_tensor<float>((float*)P[t], (float*)M[t], fa, fb, dims + 5 * t, nthreads);
    else if (dtype == 1)
      scale_tensor<double>((double*)P[t], (double*)M[t], fa, fb, dims + 5 * t, nthreads);
    else
      return 2;
  }
  return 0;
}
