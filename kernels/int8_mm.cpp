// CUDA binding of leanops_C::int8_mm (schema in leanops_C.cpp, kernel in cuda/int8_mm.cu):
// argument checks, output and split-K workspace allocation, device guard, stream, launch.
// Compiled by the host compiler (see quantize_per_token.cpp for why); checks repeated from the
// Python op because torch.ops.leanops_C.* is callable directly.

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/int8_mm.h"
#include "gemm_binding.h"

namespace {

constexpr const char* kOp = "leanops_C::int8_mm";

// The public op's default output dtype (leanops.ops.int8.DEFAULT_OUT_DTYPE); a test checks the
// two agree.
constexpr at::ScalarType kDefaultOutDtype = at::kBFloat16;

at::Tensor fp32_vector(const at::Tensor& t, const char* name, int64_t size, const at::Tensor& a) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()) && t.dim() == 1 && t.size(0) == size,
                    kOp, ": ", name, " must be a float [", size, "]; got ", t.scalar_type(),
                    " of shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == a.device(), kOp, ": ", name, " must be on a's device (",
                    a.device(), "); got ", t.device());
  return t.to(at::kFloat).contiguous();  // exact for fp16 / bf16 / fp32, as the reference's
}

at::Tensor int8_mm_cuda(const at::Tensor& a_arg, const at::Tensor& b, const at::Tensor& a_scale,
                        const at::Tensor& b_scale, const std::optional<at::Tensor>& bias_arg,
                        std::optional<at::ScalarType> out_dtype_arg) {
  TORCH_CHECK_VALUE(a_arg.is_cuda(), kOp, ": a must be a CUDA tensor; got one on ",
                    a_arg.device());
  TORCH_CHECK_VALUE(a_arg.scalar_type() == at::kChar && a_arg.dim() == 2, kOp,
                    ": a must be int8 [M, K]; got ", a_arg.scalar_type(), " of shape ",
                    a_arg.sizes());
  const int64_t m = a_arg.size(0), k = a_arg.size(1);
  TORCH_CHECK_VALUE(b.scalar_type() == at::kChar && b.dim() == 2 && b.size(1) == k &&
                        b.is_contiguous(),
                    kOp, ": b must be contiguous int8 [N, K] with K = ", k, "; got ",
                    b.scalar_type(), " of shape ", b.sizes());
  TORCH_CHECK_VALUE(b.device() == a_arg.device(), kOp, ": b must be on a's device (",
                    a_arg.device(), "); got ", b.device());
  TORCH_CHECK_VALUE(k % 16 == 0 && k <= leanops::kInt8MmMaxK, kOp,
                    ": K must be a multiple of 16 and at most ", leanops::kInt8MmMaxK,
                    " (other shapes run on the Triton backend); got K = ", k);
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0, kOp,
                    ": b's data must be 16-byte aligned (a fresh tensor is; this one is a view at "
                    "an odd offset)");
  const int64_t n = b.size(0);
  const at::ScalarType out_dtype = out_dtype_arg.value_or(kDefaultOutDtype);
  TORCH_CHECK_VALUE(
      out_dtype == at::kHalf || out_dtype == at::kBFloat16 || out_dtype == at::kFloat, kOp,
      ": out_dtype must be float16, bfloat16 or float32; got ", out_dtype);
  const at::Tensor as = fp32_vector(a_scale, "a_scale", m, a_arg);
  const at::Tensor bs = fp32_vector(b_scale, "b_scale", n, a_arg);
  std::optional<at::Tensor> bias;
  if (bias_arg.has_value()) bias = fp32_vector(*bias_arg, "bias", n, a_arg);

  const c10::cuda::CUDAGuard device_guard(a_arg.device());
  const int device = a_arg.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  at::Tensor out = at::empty({m, n}, a_arg.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;

  const at::Tensor a = leanops::binding::rows_16_byte_aligned(a_arg);
  const leanops::FloatType out_type = out_dtype == at::kHalf       ? leanops::FloatType::kFloat16
                                      : out_dtype == at::kBFloat16 ? leanops::FloatType::kBFloat16
                                                                   : leanops::FloatType::kFloat32;
  const leanops::Int8MmArgs args{
      a.data_ptr<int8_t>(),
      a.stride(0),
      b.data_ptr<int8_t>(),
      as.data_ptr<float>(),
      bs.data_ptr<float>(),
      bias.has_value() ? bias->data_ptr<float>() : nullptr,
      out.data_ptr(),
      out_type,
      m,
      n,
      k,
  };
  const leanops::binding::PlanOverride ovr = leanops::binding::plan_override();
  const leanops::Int8MmPlan plan =
      leanops::plan_int8_mm(m, n, k, leanops::binding::sm_count(device),
                                 ovr.config, ovr.splits);
  leanops::binding::check_row_tiles(kOp, m, plan.m_tiles);
  at::Tensor workspace;
  if (plan.workspace_elems > 0) {
    workspace = at::empty({plan.workspace_elems}, a_arg.options().dtype(at::kInt));
  }
  C10_CUDA_CHECK(leanops::launch_int8_mm(
      args, plan, workspace.defined() ? workspace.data_ptr<int32_t>() : nullptr, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanops_C, CUDA, m) { m.impl("int8_mm", &int8_mm_cuda); }

#endif  // LEANOPS_WITH_CUDA
