// fastkd CUDA backend: the top-k epilogue over one chunk of logits (DESIGN.md §1, "Top-k modes").
//
// Between the cuBLAS GEMMs of a chunk (logits = h·Wᵀ + b, then dh = dz·W and dW += dzᵀ·h) two
// passes over the `rows x vocab` logits buffer, one block of kThreadsPerRow threads per row:
//   topk_stats_kernel: reads the buffer once; per row the lse of z = softcap(x)/τ over V, the
//     exact lse over V∖S (S excluded by membership in the sorted ids, never 1 − Σ_S), the CE
//     lse of softcap(x) and E_p[z] for the entropy. fp32 accumulation, online max.
//   topk_grad_kernel: reads and writes the buffer once; dz in place (set semantics on S, the CE
//     term, the softcap derivative), so the buffer feeds the two gradient GEMMs directly.
// The (rows, K) math between them (bucket masses, divergence, bucket weights) is fastkd's shared
// PyTorch epilogue. Inputs: sorted_ids rows ascending, unused slots = vocab.
#include "block_reduce.cuh"
#include "kd_kernels.h"
#include "kd_math.cuh"

namespace fastkd {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreadsPerRow)
topk_stats_kernel(
    // pointers
    const T* __restrict__ logits, const int32_t* __restrict__ sorted_ids, float* __restrict__ lse,
    float* __restrict__ tail_lse, float* __restrict__ lse_ce, float* __restrict__ mean_z,
    // shapes
    int vocab, int k,
    // meta
    TopkStatsParams params, bool with_ce, bool with_stats) {
  const int64_t row = blockIdx.x;  // int64: row * vocab overflows int32 at 2^31 elements
  SoftmaxAcc acc = softmax_empty();
  LseAcc ce = lse_empty();
  topk_stats_thread(logits + row * vocab, vocab, sorted_ids + row * k, k, params, threadIdx.x,
                    blockDim.x, acc, ce);
  acc = block_reduce(acc);
  if (params.separate_ce) ce = block_reduce(ce);
  if (threadIdx.x == 0) {
    write_topk_stats(acc, ce, params, with_ce, with_stats, row, lse, tail_lse, lse_ce, mean_z);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerRow)
topk_grad_kernel(
    // pointers
    T* __restrict__ logits, const int32_t* __restrict__ sorted_ids,
    const float* __restrict__ sorted_values, const float* __restrict__ kd_lse,
    const float* __restrict__ dense_scale, const float* __restrict__ lse_ce,
    const float* __restrict__ ce_scale, const int64_t* __restrict__ labels,
    // shapes
    int vocab, int k,
    // meta
    TopkGradParams params) {
  const int64_t row = blockIdx.x;
  const TopkGradRow r =
      load_topk_grad_row(params, row, kd_lse, dense_scale, lse_ce, ce_scale, labels);
  topk_grad_thread(logits + row * vocab, vocab, sorted_ids + row * k, sorted_values + row * k, k,
                   params, r, threadIdx.x, blockDim.x);
}

template <typename T>
cudaError_t stats_launch(const void* logits, int64_t rows, int64_t vocab, const int32_t* ids,
                         int64_t k, TopkStatsParams params, bool with_ce, bool with_stats,
                         float* lse, float* tail_lse, float* lse_ce, float* mean_z,
                         cudaStream_t stream) {
  topk_stats_kernel<T><<<static_cast<unsigned>(rows), kThreadsPerRow, 0, stream>>>(
      static_cast<const T*>(logits), ids, lse, tail_lse, lse_ce, mean_z, static_cast<int>(vocab),
      static_cast<int>(k), params, with_ce, with_stats);
  return cudaGetLastError();
}

template <typename T>
cudaError_t grad_launch(void* logits, int64_t rows, int64_t vocab, const int32_t* ids,
                        const float* values, int64_t k, const float* kd_lse,
                        const float* dense_scale, const float* lse_ce, const float* ce_scale,
                        const int64_t* labels, TopkGradParams params, cudaStream_t stream) {
  topk_grad_kernel<T><<<static_cast<unsigned>(rows), kThreadsPerRow, 0, stream>>>(
      static_cast<T*>(logits), ids, values, kd_lse, dense_scale, lse_ce, ce_scale, labels,
      static_cast<int>(vocab), static_cast<int>(k), params);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_topk_stats(int dtype, const void* logits, int64_t rows, int64_t vocab,
                              const int32_t* sorted_ids, int64_t k, float inv_temp, float cap,
                              bool with_tail, bool with_ce, bool with_stats, float* lse,
                              float* tail_lse, float* lse_ce, float* mean_z, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const TopkStatsParams params{inv_temp, cap, with_tail, with_ce && inv_temp != 1.f};
  FASTKD_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
      return stats_launch<T>(logits, rows, vocab, sorted_ids, k, params, with_ce, with_stats, lse,
                             tail_lse, lse_ce, mean_z, stream))
}

cudaError_t launch_topk_grad(int dtype, void* logits, int64_t rows, int64_t vocab,
                             const int32_t* sorted_ids, const float* sorted_values, int64_t k,
                             const float* kd_lse, const float* dense_scale, const float* lse_ce,
                             const float* ce_scale, const int64_t* labels, float inv_temp, float cap,
                             bool with_tail, bool with_ce, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const TopkGradParams params{inv_temp, cap, with_tail, with_ce};
  FASTKD_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
      return grad_launch<T>(logits, rows, vocab, sorted_ids, sorted_values, k, kd_lse, dense_scale,
                            lse_ce, ce_scale, labels, params, stream))
}

}  // namespace fastkd
