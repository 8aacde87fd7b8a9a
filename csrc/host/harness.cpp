// fastkd CUDA backend, CPU test lane: the epilogue kernels' code run on the host.
//
// Compiled with a host C++ compiler (g++) into a shared library that tests/test_cuda_backend.py
// loads with ctypes. Each entry point has the argument list of the matching binding in
// csrc/bindings.cpp (raw pointers, sizes, flags; the stream is ignored) and runs the kernel's
// body — the same `*_thread` functions of kd_math.cuh, for every thread index of a
// kThreadsPerRow-thread block in turn, then the same merge and the same write-out as thread 0 —
// so the math, the row partition (unaligned head, 16-byte vectors, tail) and the membership
// cursor are checked on a machine without a GPU. Only the order of the block reduction differs
// (sequential here, a shuffle tree on the GPU). Not part of the extension build.
#include <stdint.h>

#include "../kd_kernels.h"
#include "../kd_math.cuh"

namespace {

using namespace fastkd;

template <typename T>
void topk_stats(const void* logits, int64_t rows, int64_t vocab, const int32_t* ids, int64_t k,
                const TopkStatsParams& p, bool with_ce, bool with_stats, float* lse,
                float* tail_lse, float* lse_ce, float* mean_z) {
  for (int64_t row = 0; row < rows; ++row) {
    SoftmaxAcc acc = softmax_empty();
    LseAcc ce = lse_empty();
    for (int tid = 0; tid < kThreadsPerRow; ++tid) {
      SoftmaxAcc mine = softmax_empty();
      LseAcc mine_ce = lse_empty();
      topk_stats_thread(static_cast<const T*>(logits) + row * vocab, static_cast<int>(vocab),
                        ids + row * k, static_cast<int>(k), p, tid, kThreadsPerRow, mine, mine_ce);
      acc = merge(acc, mine);
      ce = merge(ce, mine_ce);
    }
    write_topk_stats(acc, ce, p, with_ce, with_stats, row, lse, tail_lse, lse_ce, mean_z);
  }
}

template <typename T>
void topk_grad(void* logits, int64_t rows, int64_t vocab, const int32_t* ids, const float* values,
               int64_t k, const float* kd_lse, const float* dense_scale, const float* lse_ce,
               const float* ce_scale, const int64_t* labels, const TopkGradParams& p) {
  for (int64_t row = 0; row < rows; ++row) {
    const TopkGradRow r = load_topk_grad_row(p, row, kd_lse, dense_scale, lse_ce, ce_scale, labels);
    for (int tid = 0; tid < kThreadsPerRow; ++tid) {
      topk_grad_thread(static_cast<T*>(logits) + row * vocab, static_cast<int>(vocab),
                       ids + row * k, values + row * k, static_cast<int>(k), p, r, tid,
                       kThreadsPerRow);
    }
  }
}

template <typename T>
void dense_stats(const void* student, const void* teacher, int64_t rows, int64_t vocab,
                 const DenseParams& p, bool with_stats, float* lse, float* teacher_lse,
                 float* lse_ce, float* mean_z) {
  for (int64_t row = 0; row < rows; ++row) {
    SoftmaxAcc acc = softmax_empty();
    LseAcc teacher_acc = lse_empty(), ce = lse_empty();
    for (int tid = 0; tid < kThreadsPerRow; ++tid) {
      SoftmaxAcc mine = softmax_empty();
      LseAcc mine_teacher = lse_empty(), mine_ce = lse_empty();
      dense_stats_thread(static_cast<const T*>(student) + row * vocab,
                         static_cast<const T*>(teacher) + row * vocab, static_cast<int>(vocab), p,
                         tid, kThreadsPerRow, mine, mine_teacher, mine_ce);
      acc = merge(acc, mine);
      teacher_acc = merge(teacher_acc, mine_teacher);
      ce = merge(ce, mine_ce);
    }
    write_dense_stats(acc, teacher_acc, ce, p, with_stats, row, lse, teacher_lse, lse_ce, mean_z);
  }
}

template <typename T>
void dense_divergence(const void* student, const void* teacher, int64_t rows, int64_t vocab,
                      const DenseParams& p, const float* lse, const float* teacher_lse, float* kd,
                      float* wsum) {
  for (int64_t row = 0; row < rows; ++row) {
    SumAcc acc{0.f, 0.f};
    for (int tid = 0; tid < kThreadsPerRow; ++tid) {
      SumAcc mine{0.f, 0.f};
      dense_divergence_thread(static_cast<const T*>(student) + row * vocab,
                              static_cast<const T*>(teacher) + row * vocab, static_cast<int>(vocab),
                              p, lse[row], teacher_lse[row], tid, kThreadsPerRow, mine);
      acc = merge(acc, mine);
    }
    kd[row] = acc.kd;
    wsum[row] = acc.wsum;
  }
}

template <typename T>
void dense_grad(void* student, const void* teacher, int64_t rows, int64_t vocab,
                const DenseParams& p, const float* lse, const float* teacher_lse,
                const float* wsum, const float* kd_scale, const float* lse_ce,
                const float* ce_scale, const int64_t* labels) {
  for (int64_t row = 0; row < rows; ++row) {
    const DenseGradRow r =
        load_dense_grad_row(p, row, lse, teacher_lse, wsum, kd_scale, lse_ce, ce_scale, labels);
    for (int tid = 0; tid < kThreadsPerRow; ++tid) {
      dense_grad_thread(static_cast<T*>(student) + row * vocab,
                        static_cast<const T*>(teacher) + row * vocab, static_cast<int>(vocab), p, r,
                        tid, kThreadsPerRow);
    }
  }
}

}  // namespace

extern "C" {

int fastkd_host_topk_stats(const void* logits, int dtype, int64_t rows, int64_t vocab,
                           const int32_t* sorted_ids, int64_t k, double inv_temp, double cap,
                           bool with_tail, bool with_ce, bool with_stats, float* lse,
                           float* tail_lse, float* lse_ce, float* mean_z, void* /*stream*/) {
  const TopkStatsParams p{static_cast<float>(inv_temp), static_cast<float>(cap), with_tail,
                          with_ce && static_cast<float>(inv_temp) != 1.f};
  FASTKD_DISPATCH_DTYPE(dtype, return 1,
      topk_stats<T>(logits, rows, vocab, sorted_ids, k, p, with_ce, with_stats,
          lse, tail_lse, lse_ce, mean_z); return 0)
}

int fastkd_host_topk_grad(void* logits, int dtype, int64_t rows, int64_t vocab,
                          const int32_t* sorted_ids, const float* sorted_values, int64_t k,
                          const float* kd_lse, const float* dense_scale, const float* lse_ce,
                          const float* ce_scale, const int64_t* labels, double inv_temp,
                          double cap, bool with_tail, bool with_ce, void* /*stream*/) {
  const TopkGradParams p{static_cast<float>(inv_temp), static_cast<float>(cap), with_tail, with_ce};
  FASTKD_DISPATCH_DTYPE(dtype, return 1,
      topk_grad<T>(logits, rows, vocab, sorted_ids, sorted_values, k, kd_lse,
          dense_scale, lse_ce, ce_scale, labels, p); return 0)
}

int fastkd_host_dense_stats(const void* student, const void* teacher, int dtype, int64_t rows,
                            int64_t vocab, double inv_temp, double cap, double teacher_cap,
                            bool with_ce, bool with_stats, float* lse, float* teacher_lse,
                            float* lse_ce, float* mean_z, void* /*stream*/) {
  const DenseParams p = make_dense_params(static_cast<float>(inv_temp), static_cast<float>(cap),
                                          static_cast<float>(teacher_cap), kForwardKL, 0.5f, with_ce);
  FASTKD_DISPATCH_DTYPE(dtype, return 1,
      dense_stats<T>(student, teacher, rows, vocab, p, with_stats, lse,
          teacher_lse, lse_ce, mean_z); return 0)
}

int fastkd_host_dense_divergence(const void* student, const void* teacher, int dtype, int64_t rows,
                                 int64_t vocab, double inv_temp, double cap, double teacher_cap,
                                 int kind, double beta, const float* lse, const float* teacher_lse,
                                 float* kd, float* wsum, void* /*stream*/) {
  const DenseParams p = make_dense_params(static_cast<float>(inv_temp), static_cast<float>(cap),
                                          static_cast<float>(teacher_cap), kind,
                                          static_cast<float>(beta), false);
  FASTKD_DISPATCH_DTYPE(dtype, return 1,
      dense_divergence<T>(student, teacher, rows, vocab, p, lse, teacher_lse,
          kd, wsum); return 0)
}

int fastkd_host_dense_grad(void* student, const void* teacher, int dtype, int64_t rows,
                           int64_t vocab, double inv_temp, double cap, double teacher_cap, int kind,
                           double beta, const float* lse, const float* teacher_lse,
                           const float* wsum, const float* kd_scale, const float* lse_ce,
                           const float* ce_scale, const int64_t* labels, bool with_ce,
                           void* /*stream*/) {
  const DenseParams p = make_dense_params(static_cast<float>(inv_temp), static_cast<float>(cap),
                                          static_cast<float>(teacher_cap), kind,
                                          static_cast<float>(beta), with_ce);
  FASTKD_DISPATCH_DTYPE(dtype, return 1,
      dense_grad<T>(student, teacher, rows, vocab, p, lse, teacher_lse, wsum,
          kd_scale, lse_ce, ce_scale, labels); return 0)
}

}  // extern "C"
