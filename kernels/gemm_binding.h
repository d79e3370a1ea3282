// Helpers shared by the GEMM bindings (int4_weight_mm.cpp, int8_mm.cpp, sparse24_mm.cpp,
// sparse24_int4_mm.cpp): operand checks and realignment, and the SM count the split-K plan
// needs. Host code, torch headers only (compiled by g++, not nvcc).
#pragma once

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <cstdlib>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

namespace leanops::binding {

inline bool aligned(const at::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

// The kernels copy 16-byte units of each row with cp.async: unit column stride, a row stride
// that is a multiple of 16 bytes, and a 16-byte aligned start. Activations almost always have
// that; otherwise one explicit copy here (a contiguous() of an already contiguous but misaligned
// view, e.g. a slice, returns the view itself, hence the clone). `one_row_any_stride`: a kernel
// that never reads the row stride of a one-row operand (the 2:4 kernels) accepts any stride
// there instead of copying.
inline at::Tensor rows_16_byte_aligned(const at::Tensor& t, bool one_row_any_stride = false) {
  const int64_t elem = t.element_size();
  const bool ok = (t.stride(1) == 1 || t.size(1) == 1) &&
                  ((one_row_any_stride && t.size(0) == 1) || (t.stride(0) * elem) % 16 == 0) &&
                  aligned(t, 16);
  if (ok) return t;
  at::Tensor c = t.contiguous();
  if (!aligned(c, 16)) c = c.clone();
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

// A contiguous operand the kernels read with `bytes`-wide cp.async: a contiguous view into a
// larger buffer can start anywhere; realign it by copying.
inline at::Tensor realigned(const at::Tensor& t, uintptr_t bytes) {
  return aligned(t, bytes) ? t : t.clone();
}

inline void check_on_device(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " must be on x's device (",
                    x.device(), "); got ", t.device());
}

// ---- the 2:4 sparse GEMMs (sparse24_mm.cpp, sparse24_int4_mm.cpp) ----------------------------
// x [M, K] float16/bfloat16 on a CUDA device, K a positive multiple of `k_multiple` and at most
// 2^30, M at most `max_m`.
inline void check_sparse24_x(const char* op, const at::Tensor& x, int64_t k_multiple,
                             int64_t max_m) {
  // The dispatcher picks these kernels when any argument is a CUDA tensor, so x may not be.
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor; got one on ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K]; got shape ", x.sizes());
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16, op,
                    ": x must have dtype float16 or bfloat16 (float32 runs on the Triton "
                    "backend); got ", dtype);
  const int64_t m = x.size(0);
  const int64_t k = x.size(1);
  TORCH_CHECK_VALUE(k >= k_multiple && k % k_multiple == 0, op,
                    ": K (the columns of x) must be a positive multiple of ", k_multiple,
                    " for the CUDA kernel; got K = ", k);
  TORCH_CHECK_VALUE(k <= (int64_t{1} << 30), op, ": K above 2^30 is not supported; got K = ", k);
  TORCH_CHECK_VALUE(m <= max_m, op, ": x may have at most ", max_m, " rows; got M = ", m);
}

// The 2:4 metadata: uint8 [N, K/8] (two 4-bit group codes per byte), contiguous, on x's device.
// The codes themselves are not re-checked here (a full pass per call): they are validated where
// a weight enters the library (leanops.sparsity.sparse24.check_meta).
inline void check_sparse24_meta(const char* op, const at::Tensor& meta, const at::Tensor& x,
                                int64_t n, int64_t k) {
  check_on_device(op, "meta", meta, x);
  TORCH_CHECK_VALUE(meta.scalar_type() == at::kByte, op, ": meta must have dtype uint8; got ",
                    meta.scalar_type());
  TORCH_CHECK_VALUE(meta.dim() == 2 && meta.size(0) == n && meta.size(1) * 8 == k, op,
                    ": meta must be uint8 [N, K/8] = [", n, ", ", k / 8, "]; got shape ",
                    meta.sizes());
  TORCH_CHECK_VALUE(meta.is_contiguous(), op, ": meta must be contiguous");
}

// An optional bias: floating point [N] on x's device.
inline void check_sparse24_bias(const char* op, const std::optional<at::Tensor>& bias,
                                const at::Tensor& x, int64_t n) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  check_on_device(op, "bias", b, x);
  TORCH_CHECK_VALUE(at::isFloatingType(b.scalar_type()), op,
                    ": bias must have a floating-point dtype; got ", b.scalar_type());
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, op, ": bias must have shape [N] = [", n,
                    "]; got ", b.sizes());
}

// The dense GEMMs launch (N tiles, M tiles, splits) blocks: gridDim.y is at most 65535, so M is
// bounded by 65535 row tiles of the chosen config (the public op's cuda_supports rule routes
// larger M to Triton; this catches direct calls and forced configs).
inline void check_row_tiles(const char* op, int64_t m, int64_t m_tiles) {
  TORCH_CHECK_VALUE(m_tiles <= 65535, op, ": M = ", m, " needs ", m_tiles,
                    " row tiles with this tile config; a launch takes at most 65535 (the Triton "
                    "backend takes larger M)");
}

inline int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace leanops::binding

#endif  // LEANOPS_WITH_CUDA
