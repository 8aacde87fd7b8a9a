// fastkd CUDA backend: the per-element and per-row math of the epilogue kernels.
//
// Everything here is `__host__ __device__`: the kernels (topk_epilogue.cu, dense_epilogue.cu) run
// it on the GPU, and the host harness (csrc/host/harness.cpp) runs the very same functions on the
// CPU, thread by thread, so the CPU test lane can check them against the float64 reference.
// Plain CUDA only: no torch/ATen header may be included from csrc/*.cu or from here.
//
// The formulas are those of DESIGN.md §1 as written in fastkd/divergences.py:
//   z = softcap(x) / τ,  softcap(x) = c·tanh(x/c)           (x: a raw logit h·Wᵀ + b)
//   ∂L/∂z_j = (p_j / P_c(j))·w_c(j) − p_j·W                 (w_c = P_c·G_c, W = Σ_c w_c)
// and the chain rule back to x: ×(1/τ) (folded into the per-row scales) and ×(1 − (s/c)²).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kd_kernels.h"

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#else
#define FASTKD_HD inline
#endif

namespace fastkd {

constexpr float kNegInf = -INFINITY;

// Runs the statements given after `on_unknown` with `T` bound to the element type that `dtype`
// (a DType) names: float, __half or __nv_bfloat16; any other value runs `on_unknown`. Variadic so
// that a kernel launch's <<<grid, block, smem, stream>>> commas pass through.
#define FASTKD_DISPATCH_DTYPE(dtype, on_unknown, ...)                              \
  switch (dtype) {                                                                 \
    case ::fastkd::kFloat32: { using T = float; __VA_ARGS__; } break;              \
    case ::fastkd::kFloat16: { using T = __half; __VA_ARGS__; } break;             \
    case ::fastkd::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; } break;     \
    default: on_unknown;                                                           \
  }

// ---------------------------------------------------------------------------------------------
// element conversions: every buffer is read and written through fp32
// ---------------------------------------------------------------------------------------------

FASTKD_HD float to_float(float x) { return x; }
FASTKD_HD float to_float(__half x) { return __half2float(x); }
FASTKD_HD float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> FASTKD_HD T from_float(float x);
template <> FASTKD_HD float from_float<float>(float x) { return x; }
template <> FASTKD_HD __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> FASTKD_HD __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------------------------------------
// the LM head's final transform (cap <= 0 means "no softcap")
// ---------------------------------------------------------------------------------------------

// x·(1/c), not x/c: an IEEE division is an out-of-line call whose saved registers spilled.
FASTKD_HD float softcap(float x, float cap) { return cap > 0.f ? cap * tanhf(x * (1.f / cap)) : x; }

// d softcap(x) / dx written with the capped value s: 1 − (s/c)².
FASTKD_HD float softcap_grad(float capped, float cap) {
  if (cap <= 0.f) return 1.f;
  const float r = capped / cap;
  return 1.f - r * r;
}

// exp(a − m) where a may be −inf (an accumulator that has seen nothing yet): then 0, never NaN.
FASTKD_HD float exp_from(float a, float m) { return a == kNegInf ? 0.f : expf(a - m); }

FASTKD_HD float logaddexp(float a, float b) {
  const float m = fmaxf(a, b);
  if (m == kNegInf) return kNegInf;
  return m + log1pf(expf(-fabsf(a - b)));
}

// ---------------------------------------------------------------------------------------------
// divergence of one singleton bucket (dense online teacher: every token is its own bucket)
// ---------------------------------------------------------------------------------------------

FASTKD_HD float log_mixture(float log_p, float log_q, float beta) {
  return logaddexp(log_q + logf(beta), log_p + log1pf(-beta));
}

// One bucket's term of L (divergences.divergence).
FASTKD_HD float divergence_term(int kind, float beta, float log_p, float log_q) {
  if (kind == kForwardKL) return expf(log_q) * (log_q - log_p);
  if (kind == kReverseKL) return expf(log_p) * (log_p - log_q);
  const float log_m = log_mixture(log_p, log_q, beta);
  return beta * expf(log_q) * (log_q - log_m) + (1.f - beta) * expf(log_p) * (log_p - log_m);
}

// One bucket's weight w_c = P_c·G_c (divergences.bucket_weights).
FASTKD_HD float bucket_weight(int kind, float beta, float log_p, float log_q) {
  if (kind == kForwardKL) return -expf(log_q);
  if (kind == kReverseKL) return expf(log_p) * (log_p - log_q);
  return (1.f - beta) * expf(log_p) * (log_p - log_mixture(log_p, log_q, beta));
}

// ---------------------------------------------------------------------------------------------
// streaming accumulators (one per thread, merged across the block)
// ---------------------------------------------------------------------------------------------

// A running log-sum-exp: Σ exp(x − max).
struct LseAcc {
  float max;
  float sum;
};

FASTKD_HD LseAcc lse_empty() { return LseAcc{kNegInf, 0.f}; }

FASTKD_HD void push(LseAcc& a, float x) {
  if (x > a.max) {
    a.sum *= exp_from(a.max, x);
    a.max = x;
  }
  a.sum += expf(x - a.max);
}

FASTKD_HD LseAcc merge(const LseAcc& a, const LseAcc& b) {
  const float m = fmaxf(a.max, b.max);
  return LseAcc{m, a.sum * exp_from(a.max, m) + b.sum * exp_from(b.max, m)};
}

FASTKD_HD float lse_of(const LseAcc& a) { return a.max + logf(a.sum); }

// The student's softmax over the vocabulary, all relative to one running max:
// Σ exp(z − max) over V, over V∖S (the tail, summed directly: exact, no 1 − Σ_S), and
// Σ exp(z − max)·z (for the entropy H = lse − E_p[z]).
struct SoftmaxAcc {
  float max;
  float sum;
  float tail;
  float zsum;
};

FASTKD_HD SoftmaxAcc softmax_empty() { return SoftmaxAcc{kNegInf, 0.f, 0.f, 0.f}; }

FASTKD_HD void push(SoftmaxAcc& a, float z, bool in_tail) {
  if (z > a.max) {
    const float r = exp_from(a.max, z);
    a.sum *= r;
    a.tail *= r;
    a.zsum *= r;
    a.max = z;
  }
  const float e = expf(z - a.max);
  a.sum += e;
  a.tail += in_tail ? e : 0.f;
  a.zsum += e * z;
}

FASTKD_HD SoftmaxAcc merge(const SoftmaxAcc& a, const SoftmaxAcc& b) {
  const float m = fmaxf(a.max, b.max);
  const float ra = exp_from(a.max, m), rb = exp_from(b.max, m);
  return SoftmaxAcc{m, a.sum * ra + b.sum * rb, a.tail * ra + b.tail * rb, a.zsum * ra + b.zsum * rb};
}

// A plain pair of sums (the dense divergence value and W = Σ w).
struct SumAcc {
  float kd;
  float wsum;
};

FASTKD_HD SumAcc merge(const SumAcc& a, const SumAcc& b) { return SumAcc{a.kd + b.kd, a.wsum + b.wsum}; }

// ---------------------------------------------------------------------------------------------
// membership in S: a row's ids sorted ascending, unused slots = vocab (never matched)
// ---------------------------------------------------------------------------------------------

// A cursor for one thread that asks about ids in increasing order (row_pass guarantees it), so
// each thread walks the K sorted ids once: O(K + elements) per thread, no search.
struct SortedSetCursor {
  const int32_t* ids;
  int k;
  int pos;

  FASTKD_HD bool contains(int v) {
    while (pos < k && ids[pos] < v) ++pos;
    return pos < k && ids[pos] == v;
  }
};

// ---------------------------------------------------------------------------------------------
// one thread's share of a row: 16-byte vectors where aligned, scalars at both ends
// ---------------------------------------------------------------------------------------------

// Calls f(v, a[v], b[v]) for the elements v of row `a` (and of the row `b` beside it when kTwo)
// owned by thread `tid` of `nthreads`, in increasing v. With kWrite, f's result is stored in a[v].
// The unaligned head (< 16 bytes) and the tail go element by element, the body by uint4 loads.
// Two rows whose addresses differ modulo 16 cannot share vectors: they go element by element.
template <typename T, bool kWrite, bool kTwo, typename F>
FASTKD_HD void row_pass(T* a, const T* b, int vocab, int tid, int nthreads, F&& f) {
  constexpr int kWidth = 16 / sizeof(T);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a);
  int head = static_cast<int>(((16 - addr % 16) % 16) / sizeof(T));
  if (kTwo && (reinterpret_cast<uintptr_t>(b) % 16) != addr % 16) head = vocab;
  if (head > vocab) head = vocab;

  auto element = [&](int v) {
    const float y = f(v, to_float(a[v]), kTwo ? to_float(b[v]) : 0.f);
    if (kWrite) a[v] = from_float<T>(y);
  };
  for (int v = tid; v < head; v += nthreads) element(v);

  const int nvec = (vocab - head) / kWidth;
  uint4* body_a = reinterpret_cast<uint4*>(a + head);
  const uint4* body_b = reinterpret_cast<const uint4*>(kTwo ? b + head : a + head);
  for (int i = tid; i < nvec; i += nthreads) {
    T va[kWidth], vb[kWidth];
    const uint4 raw_a = body_a[i];
    memcpy(va, &raw_a, sizeof(raw_a));
    if (kTwo) {
      const uint4 raw_b = body_b[i];
      memcpy(vb, &raw_b, sizeof(raw_b));
    }
    const int base = head + i * kWidth;
#pragma unroll
    for (int j = 0; j < kWidth; ++j) {
      const float y = f(base + j, to_float(va[j]), kTwo ? to_float(vb[j]) : 0.f);
      if (kWrite) va[j] = from_float<T>(y);
    }
    if (kWrite) {
      uint4 out;
      memcpy(&out, va, sizeof(out));
      body_a[i] = out;
    }
  }
  for (int v = head + nvec * kWidth + tid; v < vocab; v += nthreads) element(v);
}

// ---------------------------------------------------------------------------------------------
// top-k epilogue, one thread's part of one row
// ---------------------------------------------------------------------------------------------

struct TopkStatsParams {
  float inv_temp;
  float cap;         // <= 0: no softcap
  bool with_tail;    // sum over V∖S (tail="bucket")
  bool separate_ce;  // CE lse on the untempered logits, needed when ce_weight != 0 and τ != 1
};

// Accumulates softmax statistics of z = softcap(x)/τ over the row, and the CE lse of softcap(x).
template <typename T>
FASTKD_HD void topk_stats_thread(const T* row, int vocab, const int32_t* sorted_ids, int k,
                                 const TopkStatsParams& p, int tid, int nthreads, SoftmaxAcc& acc,
                                 LseAcc& ce) {
  SortedSetCursor set{sorted_ids, k, 0};
  row_pass<T, false, false>(const_cast<T*>(row), nullptr, vocab, tid, nthreads,
                            [&](int v, float x, float) {
                              const float s = softcap(x, p.cap);
                              const bool in_tail = p.with_tail && !set.contains(v);
                              push(acc, s * p.inv_temp, in_tail);
                              if (p.separate_ce) push(ce, s);
                              return 0.f;
                            });
}

struct TopkGradParams {
  float inv_temp;
  float cap;
  bool with_tail;  // off S: dz = dense_scale·p (tail="bucket"), else 0
  bool with_ce;
};

// Per-row inputs of the gradient pass.
struct TopkGradRow {
  float kd_lse;       // p = exp(z − kd_lse)
  float dense_scale;  // grad scale × dense coefficient (G_T − W), DESIGN.md §1
  float lse_ce;       // CE log-sum-exp of the untempered logits
  float ce_scale;     // grad scale × ce_weight (0 on ignored rows)
  int64_t label;
};

// dz over the row, in place: set semantics on S (the value given, not added to the dense part),
// then the CE term, then the softcap derivative.
template <typename T>
FASTKD_HD void topk_grad_thread(T* row, int vocab, const int32_t* sorted_ids,
                                const float* sorted_values, int k, const TopkGradParams& p,
                                const TopkGradRow& r, int tid, int nthreads) {
  SortedSetCursor set{sorted_ids, k, 0};
  row_pass<T, true, false>(row, nullptr, vocab, tid, nthreads, [&](int v, float x, float) {
    const float s = softcap(x, p.cap);
    float g;
    if (set.contains(v)) {
      g = sorted_values[set.pos];
    } else {
      g = p.with_tail ? r.dense_scale * expf(s * p.inv_temp - r.kd_lse) : 0.f;
    }
    if (p.with_ce) g += r.ce_scale * (expf(s - r.lse_ce) - (v == r.label ? 1.f : 0.f));
    return g * softcap_grad(s, p.cap);
  });
}

// The block's merged statistics of one row, written out (thread 0 of the block does it).
FASTKD_HD void write_topk_stats(const SoftmaxAcc& acc, const LseAcc& ce, const TopkStatsParams& p,
                                bool with_ce, bool with_stats, int64_t row, float* lse,
                                float* tail_lse, float* lse_ce, float* mean_z) {
  const float row_lse = acc.max + logf(acc.sum);
  lse[row] = row_lse;
  if (p.with_tail) tail_lse[row] = acc.max + logf(acc.tail);  // −inf for an empty tail
  if (with_ce) lse_ce[row] = p.separate_ce ? lse_of(ce) : row_lse;
  if (with_stats) mean_z[row] = acc.zsum / acc.sum;
}

FASTKD_HD TopkGradRow load_topk_grad_row(const TopkGradParams& p, int64_t row, const float* kd_lse,
                                         const float* dense_scale, const float* lse_ce,
                                         const float* ce_scale, const int64_t* labels) {
  TopkGradRow r;
  r.kd_lse = kd_lse[row];
  r.dense_scale = p.with_tail ? dense_scale[row] : 0.f;
  r.lse_ce = p.with_ce ? lse_ce[row] : 0.f;
  r.ce_scale = p.with_ce ? ce_scale[row] : 0.f;
  r.label = p.with_ce ? labels[row] : -1;
  return r;
}

// ---------------------------------------------------------------------------------------------
// dense (online teacher) epilogue, one thread's part of one row
// ---------------------------------------------------------------------------------------------

struct DenseParams {
  float inv_temp;
  float cap;
  float teacher_cap;
  int kind;  // Divergence
  float beta;
  bool separate_ce;
  bool with_ce;
};

// Pass 1: student softmax (lse, E_p[z]), teacher lse, CE lse.
template <typename T>
FASTKD_HD void dense_stats_thread(const T* student, const T* teacher, int vocab, const DenseParams& p,
                                  int tid, int nthreads, SoftmaxAcc& acc, LseAcc& teacher_acc,
                                  LseAcc& ce) {
  row_pass<T, false, true>(const_cast<T*>(student), teacher, vocab, tid, nthreads,
                           [&](int, float xs, float xt) {
                             const float s = softcap(xs, p.cap);
                             push(acc, s * p.inv_temp, false);
                             push(teacher_acc, softcap(xt, p.teacher_cap) * p.inv_temp);
                             if (p.separate_ce) push(ce, s);
                             return 0.f;
                           });
}

// Pass 2: the divergence and W = Σ_v w_v, given both log-sum-exps.
template <typename T>
FASTKD_HD void dense_divergence_thread(const T* student, const T* teacher, int vocab,
                                       const DenseParams& p, float lse, float teacher_lse, int tid,
                                       int nthreads, SumAcc& acc) {
  row_pass<T, false, true>(const_cast<T*>(student), teacher, vocab, tid, nthreads,
                           [&](int, float xs, float xt) {
                             const float log_p = softcap(xs, p.cap) * p.inv_temp - lse;
                             const float log_q = softcap(xt, p.teacher_cap) * p.inv_temp - teacher_lse;
                             acc.kd += divergence_term(p.kind, p.beta, log_p, log_q);
                             acc.wsum += bucket_weight(p.kind, p.beta, log_p, log_q);
                             return 0.f;
                           });
}

struct DenseGradRow {
  float lse;
  float teacher_lse;
  float wsum;      // W = Σ_v w_v
  float kd_scale;  // grad scale × kd_weight × τ (0 on ignored rows)
  float lse_ce;
  float ce_scale;
  int64_t label;
};

// Pass 3: dz = kd_scale·(w_v − p_v·W) + CE term, × softcap derivative, in place over the student row.
template <typename T>
FASTKD_HD void dense_grad_thread(T* student, const T* teacher, int vocab, const DenseParams& p,
                                 const DenseGradRow& r, int tid, int nthreads) {
  row_pass<T, true, true>(student, teacher, vocab, tid, nthreads, [&](int v, float xs, float xt) {
    const float s = softcap(xs, p.cap);
    const float log_p = s * p.inv_temp - r.lse;
    const float log_q = softcap(xt, p.teacher_cap) * p.inv_temp - r.teacher_lse;
    float g = r.kd_scale * (bucket_weight(p.kind, p.beta, log_p, log_q) - expf(log_p) * r.wsum);
    if (p.with_ce) g += r.ce_scale * (expf(s - r.lse_ce) - (v == r.label ? 1.f : 0.f));
    return g * softcap_grad(s, p.cap);
  });
}

FASTKD_HD void write_dense_stats(const SoftmaxAcc& acc, const LseAcc& teacher_acc, const LseAcc& ce,
                                 const DenseParams& p, bool with_stats, int64_t row, float* lse,
                                 float* teacher_lse, float* lse_ce, float* mean_z) {
  const float row_lse = acc.max + logf(acc.sum);
  lse[row] = row_lse;
  teacher_lse[row] = lse_of(teacher_acc);
  if (p.with_ce) lse_ce[row] = p.separate_ce ? lse_of(ce) : row_lse;
  if (with_stats) mean_z[row] = acc.zsum / acc.sum;
}

FASTKD_HD DenseGradRow load_dense_grad_row(const DenseParams& p, int64_t row, const float* lse,
                                           const float* teacher_lse, const float* wsum,
                                           const float* kd_scale, const float* lse_ce,
                                           const float* ce_scale, const int64_t* labels) {
  DenseGradRow r;
  r.lse = lse[row];
  r.teacher_lse = teacher_lse[row];
  r.wsum = wsum[row];
  r.kd_scale = kd_scale[row];
  r.lse_ce = p.with_ce ? lse_ce[row] : 0.f;
  r.ce_scale = p.with_ce ? ce_scale[row] : 0.f;
  r.label = p.with_ce ? labels[row] : -1;
  return r;
}

FASTKD_HD DenseParams make_dense_params(float inv_temp, float cap, float teacher_cap, int kind,
                                        float beta, bool with_ce) {
  return DenseParams{inv_temp, cap, teacher_cap, kind, beta, with_ce && inv_temp != 1.f, with_ce};
}

}  // namespace fastkd
