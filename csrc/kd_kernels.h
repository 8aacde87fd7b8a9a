// fastkd CUDA backend: host-side launchers of the epilogue kernels (implemented in *.cu).
//
// Raw pointers, sizes and a cudaStream_t only: no torch type crosses this boundary, so the
// kernels build without torch's C++ headers and the bindings stay independent of torch's ABI.
// Every buffer is row-major and contiguous: `logits` rows are `vocab` elements apart, per-row
// arrays are `rows` long, `sorted_ids`/`sorted_values` are `rows x k`. Each launcher returns the
// launch's cudaError_t (cudaSuccess for rows == 0) and never synchronises.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace fastkd {

// Buffer element types, as the Python side encodes them.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
// Divergences after the β limits are resolved (jsd with β=0 is forward_kl, β=1 reverse_kl).
enum Divergence : int { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };

// Threads per row (one block per row). 8 warps: enough loads in flight for one row of a 32k–256k
// vocabulary, few enough that the block reduction stays short.
constexpr int kThreadsPerRow = 256;

// Top-k pass 1: per row, lse over V of z = softcap(x)/τ, lse over V∖S (with_tail), the CE lse of
// softcap(x) (with_ce), E_p[z] (with_stats). Output pointers unused by a flag may be null.
cudaError_t launch_topk_stats(int dtype, const void* logits, int64_t rows, int64_t vocab,
                              const int32_t* sorted_ids, int64_t k, float inv_temp, float cap,
                              bool with_tail, bool with_ce, bool with_stats, float* lse,
                              float* tail_lse, float* lse_ce, float* mean_z, cudaStream_t stream);

// Top-k pass 2: dz written over `logits` in place (DESIGN.md §1). Per row: kd_lse, dense_scale,
// lse_ce, ce_scale, label; per slot: the value of dz at each sorted id (already scaled).
cudaError_t launch_topk_grad(int dtype, void* logits, int64_t rows, int64_t vocab,
                             const int32_t* sorted_ids, const float* sorted_values, int64_t k,
                             const float* kd_lse, const float* dense_scale, const float* lse_ce,
                             const float* ce_scale, const int64_t* labels, float inv_temp, float cap,
                             bool with_tail, bool with_ce, cudaStream_t stream);

// Dense pass 1: student lse, teacher lse (both tempered), CE lse, E_p[z].
cudaError_t launch_dense_stats(int dtype, const void* student, const void* teacher, int64_t rows,
                               int64_t vocab, float inv_temp, float cap, float teacher_cap,
                               bool with_ce, bool with_stats, float* lse, float* teacher_lse,
                               float* lse_ce, float* mean_z, cudaStream_t stream);

// Dense pass 2: the divergence and W = Σ_v w_v per row (kind: 0 forward_kl, 1 reverse_kl, 2 jsd).
cudaError_t launch_dense_divergence(int dtype, const void* student, const void* teacher,
                                    int64_t rows, int64_t vocab, float inv_temp, float cap,
                                    float teacher_cap, int kind, float beta, const float* lse,
                                    const float* teacher_lse, float* kd, float* wsum,
                                    cudaStream_t stream);

// Dense pass 3: dz written over `student` in place.
cudaError_t launch_dense_grad(int dtype, void* student, const void* teacher, int64_t rows,
                              int64_t vocab, float inv_temp, float cap, float teacher_cap, int kind,
                              float beta, const float* lse, const float* teacher_lse,
                              const float* wsum, const float* kd_scale, const float* lse_ce,
                              const float* ce_scale, const int64_t* labels, bool with_ce,
                              cudaStream_t stream);

}  // namespace fastkd
