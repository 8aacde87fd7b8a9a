// fastkd CUDA backend: Python bindings of the epilogue launchers (pybind11 only, no torch).
//
// Tensors cross as integers: `tensor.data_ptr()` for buffers and
// `torch.cuda.current_stream().cuda_stream` for the stream, so this module does not depend on
// torch's C++ ABI. fastkd.backends.cuda_backend checks device, dtype, shape and contiguity of
// the tensors before it calls in; the checks here are the second line, on what a pointer can say:
// sizes in range, dtype codes known, required pointers present, aligned, and pointing to CUDA
// device memory. Bad arguments raise ValueError; CUDA errors raise RuntimeError with the error
// string. Launches are asynchronous on the given stream; nothing here synchronises.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kd_kernels.h"

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME fastkd_cuda
#endif

namespace py = pybind11;

namespace {

constexpr int64_t kMaxInt32 = 2147483647;

int element_size(int dtype) {
  switch (dtype) {
    case fastkd::kFloat32: return 4;
    case fastkd::kFloat16: return 2;
    case fastkd::kBFloat16: return 2;
    default:
      throw std::invalid_argument("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                  std::to_string(dtype));
  }
}

void check_size(const char* name, int64_t value, int64_t low, int64_t high) {
  if (value < low || value > high) {
    throw std::invalid_argument(std::string(name) + " must be in [" + std::to_string(low) + ", " +
                                std::to_string(high) + "], got " + std::to_string(value));
  }
}

// The pointers one launch will read or write. Each is checked on the host first (present,
// aligned) as it is added; run() then asks the CUDA runtime whether each points to device memory.
class Pointers {
 public:
  void add(const char* name, uintptr_t ptr, int alignment, bool needed = true) {
    if (!needed) return;
    if (ptr == 0) throw std::invalid_argument(std::string(name) + " must not be a null pointer");
    if (ptr % alignment != 0) {
      throw std::invalid_argument(std::string(name) + " must be " + std::to_string(alignment) +
                                  "-byte aligned, got address " + std::to_string(ptr));
    }
    names_.push_back(name);
    ptrs_.push_back(ptr);
  }

  void check_on_device() const {
    for (size_t i = 0; i < ptrs_.size(); ++i) {
      cudaPointerAttributes attr;
      const cudaError_t err = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptrs_[i]));
      if (err != cudaSuccess) {
        cudaGetLastError();  // clear it: it is reported here, not by a later launch
        throw std::runtime_error(std::string("fastkd CUDA extension: cannot inspect ") + names_[i] +
                                 ": " + cudaGetErrorString(err));
      }
      if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
        throw std::invalid_argument(std::string(names_[i]) +
                                    " must point to CUDA device memory (a CUDA tensor's data_ptr())");
      }
    }
  }

 private:
  std::vector<const char*> names_;
  std::vector<uintptr_t> ptrs_;
};

void check_launch(const char* what, cudaError_t err) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastkd CUDA extension: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

template <typename P>
P* as(uintptr_t ptr) {
  return reinterpret_cast<P*>(ptr);
}

void topk_stats(uintptr_t logits, int dtype, int64_t rows, int64_t vocab, uintptr_t sorted_ids,
                int64_t k, double inv_temp, double cap, bool with_tail, bool with_ce,
                bool with_stats, uintptr_t lse, uintptr_t tail_lse, uintptr_t lse_ce,
                uintptr_t mean_z, uintptr_t stream) {
  const int elem = element_size(dtype);
  check_size("rows", rows, 0, kMaxInt32);
  check_size("vocab", vocab, 1, kMaxInt32);
  check_size("k", k, 0, kMaxInt32);
  if (rows == 0) return;
  Pointers ptrs;
  ptrs.add("logits", logits, elem);
  ptrs.add("sorted_ids", sorted_ids, 4, with_tail && k > 0);
  ptrs.add("lse", lse, 4);
  ptrs.add("tail_lse", tail_lse, 4, with_tail);
  ptrs.add("lse_ce", lse_ce, 4, with_ce);
  ptrs.add("mean_z", mean_z, 4, with_stats);
  ptrs.check_on_device();
  check_launch("topk_stats_kernel",
               fastkd::launch_topk_stats(dtype, as<const void>(logits), rows, vocab,
                                         as<const int32_t>(sorted_ids), k,
                                         static_cast<float>(inv_temp), static_cast<float>(cap),
                                         with_tail, with_ce, with_stats, as<float>(lse),
                                         as<float>(tail_lse), as<float>(lse_ce), as<float>(mean_z),
                                         as_stream(stream)));
}

void topk_grad(uintptr_t logits, int dtype, int64_t rows, int64_t vocab, uintptr_t sorted_ids,
               uintptr_t sorted_values, int64_t k, uintptr_t kd_lse, uintptr_t dense_scale,
               uintptr_t lse_ce, uintptr_t ce_scale, uintptr_t labels, double inv_temp, double cap,
               bool with_tail, bool with_ce, uintptr_t stream) {
  const int elem = element_size(dtype);
  check_size("rows", rows, 0, kMaxInt32);
  check_size("vocab", vocab, 1, kMaxInt32);
  check_size("k", k, 0, kMaxInt32);
  if (rows == 0) return;
  Pointers ptrs;
  ptrs.add("logits", logits, elem);
  ptrs.add("sorted_ids", sorted_ids, 4, k > 0);
  ptrs.add("sorted_values", sorted_values, 4, k > 0);
  ptrs.add("kd_lse", kd_lse, 4);
  ptrs.add("dense_scale", dense_scale, 4, with_tail);
  ptrs.add("lse_ce", lse_ce, 4, with_ce);
  ptrs.add("ce_scale", ce_scale, 4, with_ce);
  ptrs.add("labels", labels, 8, with_ce);
  ptrs.check_on_device();
  check_launch("topk_grad_kernel",
               fastkd::launch_topk_grad(dtype, as<void>(logits), rows, vocab,
                                        as<const int32_t>(sorted_ids), as<const float>(sorted_values),
                                        k, as<const float>(kd_lse), as<const float>(dense_scale),
                                        as<const float>(lse_ce), as<const float>(ce_scale),
                                        as<const int64_t>(labels), static_cast<float>(inv_temp),
                                        static_cast<float>(cap), with_tail, with_ce,
                                        as_stream(stream)));
}

Pointers check_dense(int dtype, int64_t rows, int64_t vocab, uintptr_t student, uintptr_t teacher) {
  const int elem = element_size(dtype);
  check_size("rows", rows, 0, kMaxInt32);
  check_size("vocab", vocab, 1, kMaxInt32);
  Pointers ptrs;
  if (rows == 0) return ptrs;
  ptrs.add("student", student, elem);
  ptrs.add("teacher", teacher, elem);
  return ptrs;
}

void check_kind(int kind, double beta) {
  check_size("kind", kind, fastkd::kForwardKL, fastkd::kJSD);
  if (kind == fastkd::kJSD && !(beta > 0.0 && beta < 1.0)) {
    throw std::invalid_argument("beta must be in (0, 1) for kind=2 (jsd), got " + std::to_string(beta));
  }
}

void dense_stats(uintptr_t student, uintptr_t teacher, int dtype, int64_t rows, int64_t vocab,
                 double inv_temp, double cap, double teacher_cap, bool with_ce, bool with_stats,
                 uintptr_t lse, uintptr_t teacher_lse, uintptr_t lse_ce, uintptr_t mean_z,
                 uintptr_t stream) {
  Pointers ptrs = check_dense(dtype, rows, vocab, student, teacher);
  if (rows == 0) return;
  ptrs.add("lse", lse, 4);
  ptrs.add("teacher_lse", teacher_lse, 4);
  ptrs.add("lse_ce", lse_ce, 4, with_ce);
  ptrs.add("mean_z", mean_z, 4, with_stats);
  ptrs.check_on_device();
  check_launch("dense_stats_kernel",
               fastkd::launch_dense_stats(dtype, as<const void>(student), as<const void>(teacher),
                                          rows, vocab, static_cast<float>(inv_temp),
                                          static_cast<float>(cap), static_cast<float>(teacher_cap),
                                          with_ce, with_stats, as<float>(lse),
                                          as<float>(teacher_lse), as<float>(lse_ce),
                                          as<float>(mean_z), as_stream(stream)));
}

void dense_divergence(uintptr_t student, uintptr_t teacher, int dtype, int64_t rows, int64_t vocab,
                      double inv_temp, double cap, double teacher_cap, int kind, double beta,
                      uintptr_t lse, uintptr_t teacher_lse, uintptr_t kd, uintptr_t wsum,
                      uintptr_t stream) {
  Pointers ptrs = check_dense(dtype, rows, vocab, student, teacher);
  check_kind(kind, beta);
  if (rows == 0) return;
  ptrs.add("lse", lse, 4);
  ptrs.add("teacher_lse", teacher_lse, 4);
  ptrs.add("kd", kd, 4);
  ptrs.add("wsum", wsum, 4);
  ptrs.check_on_device();
  check_launch("dense_divergence_kernel",
               fastkd::launch_dense_divergence(
                   dtype, as<const void>(student), as<const void>(teacher), rows, vocab,
                   static_cast<float>(inv_temp), static_cast<float>(cap),
                   static_cast<float>(teacher_cap), kind, static_cast<float>(beta),
                   as<const float>(lse), as<const float>(teacher_lse), as<float>(kd),
                   as<float>(wsum), as_stream(stream)));
}

void dense_grad(uintptr_t student, uintptr_t teacher, int dtype, int64_t rows, int64_t vocab,
                double inv_temp, double cap, double teacher_cap, int kind, double beta,
                uintptr_t lse, uintptr_t teacher_lse, uintptr_t wsum, uintptr_t kd_scale,
                uintptr_t lse_ce, uintptr_t ce_scale, uintptr_t labels, bool with_ce,
                uintptr_t stream) {
  Pointers ptrs = check_dense(dtype, rows, vocab, student, teacher);
  check_kind(kind, beta);
  if (rows == 0) return;
  ptrs.add("lse", lse, 4);
  ptrs.add("teacher_lse", teacher_lse, 4);
  ptrs.add("wsum", wsum, 4);
  ptrs.add("kd_scale", kd_scale, 4);
  ptrs.add("lse_ce", lse_ce, 4, with_ce);
  ptrs.add("ce_scale", ce_scale, 4, with_ce);
  ptrs.add("labels", labels, 8, with_ce);
  ptrs.check_on_device();
  check_launch("dense_grad_kernel",
               fastkd::launch_dense_grad(
                   dtype, as<void>(student), as<const void>(teacher), rows, vocab,
                   static_cast<float>(inv_temp), static_cast<float>(cap),
                   static_cast<float>(teacher_cap), kind, static_cast<float>(beta),
                   as<const float>(lse), as<const float>(teacher_lse), as<const float>(wsum),
                   as<const float>(kd_scale), as<const float>(lse_ce), as<const float>(ce_scale),
                   as<const int64_t>(labels), with_ce, as_stream(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastkd CUDA epilogue kernels (raw pointers + stream; see csrc/README.md)";
  m.attr("THREADS_PER_ROW") = fastkd::kThreadsPerRow;
  m.def("topk_stats", &topk_stats, "top-k pass 1: row statistics",
        py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"),
        py::arg("sorted_ids"), py::arg("k"), py::arg("inv_temp"), py::arg("cap"),
        py::arg("with_tail"), py::arg("with_ce"), py::arg("with_stats"), py::arg("lse"),
        py::arg("tail_lse"), py::arg("lse_ce"), py::arg("mean_z"), py::arg("stream"));
  m.def("topk_grad", &topk_grad, "top-k pass 2: dz in place over the logits",
        py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"),
        py::arg("sorted_ids"), py::arg("sorted_values"), py::arg("k"), py::arg("kd_lse"),
        py::arg("dense_scale"), py::arg("lse_ce"), py::arg("ce_scale"), py::arg("labels"),
        py::arg("inv_temp"), py::arg("cap"), py::arg("with_tail"), py::arg("with_ce"),
        py::arg("stream"));
  m.def("dense_stats", &dense_stats, "dense pass 1: student/teacher/CE log-sum-exps",
        py::arg("student"), py::arg("teacher"), py::arg("dtype"), py::arg("rows"),
        py::arg("vocab"), py::arg("inv_temp"), py::arg("cap"), py::arg("teacher_cap"),
        py::arg("with_ce"), py::arg("with_stats"), py::arg("lse"), py::arg("teacher_lse"),
        py::arg("lse_ce"), py::arg("mean_z"), py::arg("stream"));
  m.def("dense_divergence", &dense_divergence, "dense pass 2: divergence and W per row",
        py::arg("student"), py::arg("teacher"), py::arg("dtype"), py::arg("rows"),
        py::arg("vocab"), py::arg("inv_temp"), py::arg("cap"), py::arg("teacher_cap"),
        py::arg("kind"), py::arg("beta"), py::arg("lse"), py::arg("teacher_lse"), py::arg("kd"),
        py::arg("wsum"), py::arg("stream"));
  m.def("dense_grad", &dense_grad, "dense pass 3: dz in place over the student logits",
        py::arg("student"), py::arg("teacher"), py::arg("dtype"), py::arg("rows"),
        py::arg("vocab"), py::arg("inv_temp"), py::arg("cap"), py::arg("teacher_cap"),
        py::arg("kind"), py::arg("beta"), py::arg("lse"), py::arg("teacher_lse"), py::arg("wsum"),
        py::arg("kd_scale"), py::arg("lse_ce"), py::arg("ce_scale"), py::arg("labels"),
        py::arg("with_ce"), py::arg("stream"));
}
