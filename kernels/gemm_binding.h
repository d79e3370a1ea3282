// Helpers shared by the GEMM bindings (int4_weight_mm.cpp, int8_mm.cpp): operand checks and the
// SM count the split-K plan needs. Host code, torch headers only (compiled by g++, not nvcc).
#pragma once

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

namespace leanops::binding {

// The kernels copy 16-byte units of each row with cp.async: unit column stride, a row stride
// that is a multiple of 16 bytes, and a 16-byte aligned start. Activations almost always have
// that; otherwise one explicit copy here (a contiguous() of an already contiguous but misaligned
// view, e.g. a slice, returns the view itself, hence the clone).
inline at::Tensor rows_16_byte_aligned(const at::Tensor& t) {
  const int64_t elem = t.element_size();
  const bool ok = (t.stride(1) == 1 || t.size(1) == 1) && (t.stride(0) * elem) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  if (ok) return t;
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// An optional per-column vector (bias) as fp32 contiguous: exact for fp16/bf16/fp32 inputs,
// which is what the reference does with bias.float().
inline std::optional<at::Tensor> as_fp32(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->to(at::kFloat).contiguous();
}

inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace leanops::binding

#endif  // LEANOPS_WITH_CUDA
