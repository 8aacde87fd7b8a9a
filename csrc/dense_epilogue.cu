// fastkd CUDA backend: the dense (online teacher, every token its own bucket) epilogue over one
// chunk of student and teacher logits (DESIGN.md §1).
//
// Three passes over the two `rows x vocab` buffers, one block of kThreadsPerRow threads per row:
//   dense_stats_kernel:      student lse and E_p[z], teacher lse, CE lse (online max, fp32);
//   dense_divergence_kernel: the divergence L and W = Σ_v w_v, now that both lse are known;
//   dense_grad_kernel:       dz = kd_scale·(w_v − p_v·W) + CE term, × softcap derivative, written
//                            over the student buffer in place.
// Forward and reverse KL could fold pass 2 into pass 1 (their L is an expectation of z − t); JSD
// cannot (log M needs both normalised distributions), so all three share the generic path.
#include "block_reduce.cuh"
#include "kd_kernels.h"
#include "kd_math.cuh"

namespace fastkd {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreadsPerRow)
dense_stats_kernel(
    // pointers
    const T* __restrict__ student, const T* __restrict__ teacher, float* __restrict__ lse,
    float* __restrict__ teacher_lse, float* __restrict__ lse_ce, float* __restrict__ mean_z,
    // shapes
    int vocab,
    // meta
    DenseParams params, bool with_stats) {
  const int64_t row = blockIdx.x;
  SoftmaxAcc acc = softmax_empty();
  LseAcc teacher_acc = lse_empty(), ce = lse_empty();
  dense_stats_thread(student + row * vocab, teacher + row * vocab, vocab, params, threadIdx.x,
                     blockDim.x, acc, teacher_acc, ce);
  acc = block_reduce(acc);
  teacher_acc = block_reduce(teacher_acc);
  if (params.separate_ce) ce = block_reduce(ce);
  if (threadIdx.x == 0) {
    write_dense_stats(acc, teacher_acc, ce, params, with_stats, row, lse, teacher_lse, lse_ce, mean_z);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerRow)
dense_divergence_kernel(
    // pointers
    const T* __restrict__ student, const T* __restrict__ teacher, const float* __restrict__ lse,
    const float* __restrict__ teacher_lse, float* __restrict__ kd, float* __restrict__ wsum,
    // shapes
    int vocab,
    // meta
    DenseParams params) {
  const int64_t row = blockIdx.x;
  SumAcc acc{0.f, 0.f};
  dense_divergence_thread(student + row * vocab, teacher + row * vocab, vocab, params, lse[row],
                          teacher_lse[row], threadIdx.x, blockDim.x, acc);
  acc = block_reduce(acc);
  if (threadIdx.x != 0) return;
  kd[row] = acc.kd;
  wsum[row] = acc.wsum;
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerRow)
dense_grad_kernel(
    // pointers
    T* __restrict__ student, const T* __restrict__ teacher, const float* __restrict__ lse,
    const float* __restrict__ teacher_lse, const float* __restrict__ wsum,
    const float* __restrict__ kd_scale, const float* __restrict__ lse_ce,
    const float* __restrict__ ce_scale, const int64_t* __restrict__ labels,
    // shapes
    int vocab,
    // meta
    DenseParams params) {
  const int64_t row = blockIdx.x;
  const DenseGradRow r =
      load_dense_grad_row(params, row, lse, teacher_lse, wsum, kd_scale, lse_ce, ce_scale, labels);
  dense_grad_thread(student + row * vocab, teacher + row * vocab, vocab, params, r, threadIdx.x,
                    blockDim.x);
}

dim3 grid_of(int64_t rows) { return dim3(static_cast<unsigned>(rows)); }

}  // namespace

cudaError_t launch_dense_stats(int dtype, const void* student, const void* teacher, int64_t rows,
                               int64_t vocab, float inv_temp, float cap, float teacher_cap,
                               bool with_ce, bool with_stats, float* lse, float* teacher_lse,
                               float* lse_ce, float* mean_z, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const DenseParams p = make_dense_params(inv_temp, cap, teacher_cap, kForwardKL, 0.5f, with_ce);
  const int v = static_cast<int>(vocab);
  FASTKD_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
      dense_stats_kernel<T><<<grid_of(rows), kThreadsPerRow, 0, stream>>>(
          static_cast<const T*>(student), static_cast<const T*>(teacher), lse, teacher_lse,
          lse_ce, mean_z, v, p, with_stats))
  return cudaGetLastError();
}

cudaError_t launch_dense_divergence(int dtype, const void* student, const void* teacher,
                                    int64_t rows, int64_t vocab, float inv_temp, float cap,
                                    float teacher_cap, int kind, float beta, const float* lse,
                                    const float* teacher_lse, float* kd, float* wsum,
                                    cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const DenseParams p = make_dense_params(inv_temp, cap, teacher_cap, kind, beta, false);
  const int v = static_cast<int>(vocab);
  FASTKD_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
      dense_divergence_kernel<T><<<grid_of(rows), kThreadsPerRow, 0, stream>>>(
          static_cast<const T*>(student), static_cast<const T*>(teacher), lse, teacher_lse, kd,
          wsum, v, p))
  return cudaGetLastError();
}

cudaError_t launch_dense_grad(int dtype, void* student, const void* teacher, int64_t rows,
                              int64_t vocab, float inv_temp, float cap, float teacher_cap, int kind,
                              float beta, const float* lse, const float* teacher_lse,
                              const float* wsum, const float* kd_scale, const float* lse_ce,
                              const float* ce_scale, const int64_t* labels, bool with_ce,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const DenseParams p = make_dense_params(inv_temp, cap, teacher_cap, kind, beta, with_ce);
  const int v = static_cast<int>(vocab);
  FASTKD_DISPATCH_DTYPE(dtype, return cudaErrorInvalidValue,
      dense_grad_kernel<T><<<grid_of(rows), kThreadsPerRow, 0, stream>>>(
          static_cast<T*>(student), static_cast<const T*>(teacher), lse, teacher_lse, wsum,
          kd_scale, lse_ce, ce_scale, labels, v, p))
  return cudaGetLastError();
}

}  // namespace fastkd
