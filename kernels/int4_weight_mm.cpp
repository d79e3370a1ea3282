// CUDA binding of leanops_C::int4_weight_mm (schema in leanops_C.cpp, kernel in
// cuda/int4_weight_mm.cu): argument checks, output and split-K workspace allocation, device
// guard, stream, launch. Compiled by the host compiler (see quantize_per_token.cpp for why).
//
// The public op (leanops.int4_weight_mm) checks arguments in Python and routes calls this kernel
// does not take (fp32 x, scales in another dtype) to Triton; the checks are repeated here because
// torch.ops.leanops_C.* is callable directly and a bad pointer in a kernel is a crash.

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/int4_weight_mm.h"
#include "gemm_binding.h"

namespace {

constexpr const char* kOp = "leanops_C::int4_weight_mm";

at::Tensor int4_weight_mm_cuda(const at::Tensor& x_arg, const at::Tensor& w_packed,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               int64_t group_size, const std::optional<at::Tensor>& bias_arg) {
  TORCH_CHECK_VALUE(x_arg.is_cuda(), kOp, ": x must be a CUDA tensor; got one on ",
                    x_arg.device());
  TORCH_CHECK_VALUE(x_arg.dim() == 2, kOp, ": x must be 2-D [M, K]; got shape ", x_arg.sizes());
  const at::ScalarType dtype = x_arg.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                    ": x must be float16 or bfloat16 (float32 runs on the Triton backend); got ",
                    dtype);
  const int64_t m = x_arg.size(0), k = x_arg.size(1);
  TORCH_CHECK_VALUE(w_packed.scalar_type() == at::kByte && w_packed.dim() == 2 &&
                        w_packed.size(1) * 2 == k && w_packed.is_contiguous(),
                    kOp, ": w_packed must be contiguous uint8 [N, K/2] with K = ", k,
                    "; got ", w_packed.scalar_type(), " of shape ", w_packed.sizes());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(w_packed.data_ptr()) % 16 == 0, kOp,
                    ": w_packed's data must be 16-byte aligned (a fresh tensor is; this one is a "
                    "view at an odd offset)");
  const int64_t n = w_packed.size(0);
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0 && k % group_size == 0, kOp,
                    ": group_size must be a positive multiple of 32 dividing K = ", k, "; got ",
                    group_size);
  const int64_t groups = k / group_size;
  TORCH_CHECK_VALUE(scales.scalar_type() == dtype && scales.dim() == 2 &&
                        scales.size(0) == n && scales.size(1) == groups &&
                        scales.is_contiguous(),
                    kOp, ": scales must be contiguous [N, K/group_size] = [", n, ", ", groups,
                    "] in x's dtype ", dtype, "; got ", scales.scalar_type(), " of shape ",
                    scales.sizes());
  if (zeros.has_value()) {
    TORCH_CHECK_VALUE(zeros->scalar_type() == at::kByte && zeros->dim() == 2 &&
                          zeros->size(0) == n && zeros->size(1) == groups &&
                          zeros->is_contiguous(),
                      kOp, ": zeros must be contiguous uint8 [N, K/group_size] = [", n, ", ",
                      groups, "] or None; got ", zeros->scalar_type(), " of shape ",
                      zeros->sizes());
    leanops::binding::check_on_device(kOp, "zeros", *zeros, x_arg);
  }
  if (bias_arg.has_value()) {
    TORCH_CHECK_VALUE(at::isFloatingType(bias_arg->scalar_type()) && bias_arg->dim() == 1 &&
                          bias_arg->size(0) == n,
                      kOp, ": bias must be a float [N] = [", n, "] or None; got ",
                      bias_arg->scalar_type(), " of shape ", bias_arg->sizes());
    leanops::binding::check_on_device(kOp, "bias", *bias_arg, x_arg);
  }
  leanops::binding::check_on_device(kOp, "w_packed", w_packed, x_arg);
  leanops::binding::check_on_device(kOp, "scales", scales, x_arg);

  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  const int device = x_arg.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  at::Tensor out = at::empty({m, n}, x_arg.options());
  if (m == 0 || n == 0) return out;

  const at::Tensor x = leanops::binding::rows_16_byte_aligned(x_arg);
  const std::optional<at::Tensor> bias = leanops::binding::as_fp32(bias_arg);
  const leanops::Int4WeightMmArgs args{
      x.data_ptr(),
      x.stride(0),
      w_packed.data_ptr<uint8_t>(),
      scales.data_ptr(),
      zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr,
      bias.has_value() ? bias->data_ptr<float>() : nullptr,
      out.data_ptr(),
      m,
      n,
      k,
      group_size,
      dtype == at::kBFloat16,
  };
  const leanops::binding::PlanOverride ovr = leanops::binding::plan_override();
  const leanops::Int4WeightMmPlan plan =
      leanops::plan_int4_weight_mm(m, n, k, leanops::binding::sm_count(device),
                                 ovr.config, ovr.splits);
  leanops::binding::check_row_tiles(kOp, m, plan.m_tiles);
  at::Tensor workspace;
  if (plan.workspace_elems > 0) {
    workspace = at::empty({plan.workspace_elems}, x_arg.options().dtype(at::kFloat));
  }
  C10_CUDA_CHECK(leanops::launch_int4_weight_mm(
      args, plan, workspace.defined() ? workspace.data_ptr<float>() : nullptr, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanops_C, CUDA, m) { m.impl("int4_weight_mm", &int4_weight_mm_cuda); }

#endif  // LEANOPS_WITH_CUDA
