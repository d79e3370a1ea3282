// Helpers shared by the GEMM bindings (int4_weight_mm.cpp, int8_mm.cpp): operand checks and the
// SM count the split-K plan needs. Host code, torch headers only (compiled by g++, not nvcc).
#pragma once

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <cstdlib>
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

// Tuning and test overrides of the GEMM plans, read on every call (getenv is cheap next to a
// launch) so a benchmark or test can sweep them in one process:
//   LEANOPS_CUDA_GEMM_CONFIG  0 (small-M tile), 1 (medium), 2 (large-M); unset: chosen by M
//   LEANOPS_CUDA_GEMM_SPLITS  K splits over blocks, >= 1; unset: chosen from the SM count
struct PlanOverride {
  int config = -1;
  int splits = 0;
};

inline int env_int(const char* name, int lo, int hi, const char* allowed) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return -1;
  char* end = nullptr;
  const long parsed = std::strtol(v, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && parsed >= lo && parsed <= hi, name, " must be ", allowed,
                    " (or unset); got '", v, "'");
  return static_cast<int>(parsed);
}

inline PlanOverride plan_override() {
  PlanOverride o;
  o.config = env_int("LEANOPS_CUDA_GEMM_CONFIG", 0, 2, "0, 1 or 2");
  const int splits = env_int("LEANOPS_CUDA_GEMM_SPLITS", 1, 1 << 16, "a positive integer");
  o.splits = splits > 0 ? splits : 0;
  return o;
}

inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace leanops::binding

#endif  // LEANOPS_WITH_CUDA
