// CUDA binding of leanops_C::quantize_per_token_int8 (schema in leanops_C.cpp, kernel in
// cuda/quantize_per_token.cu): argument checks, output allocation, device guard, stream, launch.
//
// Compiled by the host compiler, not nvcc: the torch headers are the expensive part of the build
// and g++ gets through them much faster. Only the headers used are included (no
// torch/extension.h, which drags in pybind11 and all of torch's C++ API).
//
// Callers normally reach this through leanops.quantize_per_token_int8, which has already checked
// the arguments in Python; the checks are repeated here because torch.ops.leanops_C.* is callable
// directly and a bad pointer in a kernel is a crash, not an exception.

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/quantize_per_token.h"

namespace {

constexpr const char* kOp = "leanops_C::quantize_per_token_int8";

leanops::FloatType float_type(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK_VALUE(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat, kOp,
                    ": x must have dtype float16, bfloat16 or float32; got ", t);
  return t == at::kHalf       ? leanops::FloatType::kFloat16
         : t == at::kBFloat16 ? leanops::FloatType::kBFloat16
                              : leanops::FloatType::kFloat32;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cuda(
    const at::Tensor& x_arg, const std::optional<at::Tensor>& smooth_arg) {
  // The dispatcher picks this kernel when any argument is a CUDA tensor, so x itself may not be.
  TORCH_CHECK_VALUE(x_arg.is_cuda(), kOp, ": x must be a CUDA tensor; got one on ",
                    x_arg.device());
  TORCH_CHECK_VALUE(x_arg.dim() == 2, kOp, ": x must be 2-D [M, K]; got shape ", x_arg.sizes());
  const leanops::FloatType x_type = float_type(x_arg);
  const int64_t m = x_arg.size(0);
  const int64_t k = x_arg.size(1);
  TORCH_CHECK_VALUE(k >= 1, kOp, ": x must have at least one column; got shape ",
                    x_arg.sizes());
  TORCH_CHECK_VALUE(k <= (int64_t{1} << 30), kOp,
                    ": rows longer than 2^30 elements are not supported; got K = ", k);
  if (smooth_arg.has_value()) {
    const at::Tensor& s = *smooth_arg;
    TORCH_CHECK_VALUE(s.device() == x_arg.device(), kOp, ": smooth must be on x's device (",
                      x_arg.device(), "); got ", s.device());
    TORCH_CHECK_VALUE(at::isFloatingType(s.scalar_type()), kOp,
                      ": smooth must have a floating-point dtype; got ", s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == k, kOp, ": smooth must have shape [K] = [",
                      k, "]; got ", s.sizes());
  }

  // Everything below allocates or launches on x's GPU, which need not be the current one.
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_arg.device().index()).stream();

  // The kernel reads rows with any stride but needs unit column stride (coalesced, vectorised
  // loads). Activations almost always have it; otherwise copy once here, explicitly, rather than
  // teaching the kernel a strided gather it would run slowly anyway. (With K == 1 the column
  // stride is meaningless.)
  at::Tensor x = (x_arg.stride(1) == 1 || k == 1) ? x_arg : x_arg.contiguous();
  // One fp32 row of factors: fp32(smooth) is exact for fp16/bf16 and rounds float64 exactly like
  // the reference's smooth.float(), so the kernel is compiled for fp32 smooth only. A fresh copy
  // when the data is not 16-byte aligned (a sliced buffer) keeps the vectorised path available.
  std::optional<at::Tensor> smooth;
  if (smooth_arg.has_value()) {
    smooth = smooth_arg->to(at::kFloat).contiguous();
    if (reinterpret_cast<uintptr_t>(smooth->data_ptr()) % 16 != 0) {
      smooth = smooth->clone(at::MemoryFormat::Contiguous);
    }
  }

  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  if (m == 0) return {q, scale};

  // x.stride(0) is any non-negative value (0 for an expanded row); for k == 1 stride(1) may be
  // anything, the kernel never uses it.
  C10_CUDA_CHECK(leanops::launch_quantize_per_token_int8(
      x.data_ptr(), x_type, m, k, x.stride(0),
      smooth.has_value() ? smooth->data_ptr<float>() : nullptr, q.data_ptr<int8_t>(),
      scale.data_ptr<float>(), stream));
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(leanops_C, CUDA, m) {
  m.impl("quantize_per_token_int8", &quantize_per_token_int8_cuda);
}

#endif  // LEANOPS_WITH_CUDA
