// CUDA binding of leanops_C::sparse24_int4_mm (schema in leanops_C.cpp, kernel in
// cuda/sparse24_int4_mm.cu): argument checks, output allocation, device guard, stream, launch.
//
// Compiled by the host compiler, not nvcc, with only the ATen headers used (see
// quantize_per_token.cpp for why). Callers normally reach this through
// leanops.sparse24_int4_mm, which has already checked the arguments (and routed fp32 x, scales
// in another dtype and K % 64 != 0 to Triton); the checks are repeated here because
// torch.ops.leanops_C.sparse24_int4_mm is callable directly and a bad pointer in a kernel is a
// crash, not an exception. The metadata codes and the zero-point range are not re-checked (a
// full pass per call): they are validated where a weight enters the library.

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/sparse24_int4_mm.h"
#include "gemm_binding.h"

namespace {

namespace binding = leanops::binding;

constexpr const char* kOp = "leanops_C::sparse24_int4_mm";

void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  binding::check_on_device(kOp, name, t, x);
}

at::Tensor sparse24_int4_mm_cuda(const at::Tensor& x_arg, const at::Tensor& values_arg,
                                 const at::Tensor& meta_arg, const at::Tensor& scales_arg,
                                 const std::optional<at::Tensor>& zeros_arg, int64_t group_size,
                                 const std::optional<at::Tensor>& bias_arg) {
  binding::check_sparse24_x(kOp, x_arg, leanops::kSparse24Int4KMultiple,
                            leanops::kSparse24Int4MaxM);
  const at::ScalarType dtype = x_arg.scalar_type();
  const int64_t m = x_arg.size(0);
  const int64_t k = x_arg.size(1);

  check_device("values", values_arg, x_arg);
  TORCH_CHECK_VALUE(values_arg.scalar_type() == at::kByte, kOp,
                    ": values must have dtype uint8 (two int4 codes per byte); got ",
                    values_arg.scalar_type());
  TORCH_CHECK_VALUE(values_arg.dim() == 2 && values_arg.size(1) * 4 == k, kOp,
                    ": values must be uint8 [N, K/4] with K = ", k, "; got shape ",
                    values_arg.sizes());
  TORCH_CHECK_VALUE(values_arg.is_contiguous(), kOp, ": values must be contiguous");
  const int64_t n = values_arg.size(0);
  TORCH_CHECK_VALUE(n <= (int64_t{1} << 30), kOp, ": N above 2^30 is not supported; got ", n);

  binding::check_sparse24_meta(kOp, meta_arg, x_arg, n, k);

  TORCH_CHECK_VALUE(group_size >= 64 && group_size % 64 == 0 && k % group_size == 0, kOp,
                    ": group_size must be a positive multiple of 64 dividing K = ", k,
                    "; got ", group_size);
  const int64_t groups = k / group_size;
  check_device("scales", scales_arg, x_arg);
  TORCH_CHECK_VALUE(scales_arg.scalar_type() == dtype, kOp, ": scales must have x's dtype (",
                    dtype, ") for the CUDA kernel (other scale dtypes run on the Triton "
                    "backend); got ", scales_arg.scalar_type());
  TORCH_CHECK_VALUE(scales_arg.dim() == 2 && scales_arg.size(0) == n &&
                        scales_arg.size(1) == groups,
                    kOp, ": scales must be [N, K/group_size] = [", n, ", ", groups,
                    "]; got shape ", scales_arg.sizes());
  TORCH_CHECK_VALUE(scales_arg.is_contiguous(), kOp, ": scales must be contiguous");
  if (zeros_arg.has_value()) {
    const at::Tensor& z = *zeros_arg;
    check_device("zeros", z, x_arg);
    TORCH_CHECK_VALUE(z.scalar_type() == at::kByte, kOp,
                      ": zeros must have dtype uint8 (codes 0..15) or be None; got ",
                      z.scalar_type());
    TORCH_CHECK_VALUE(z.dim() == 2 && z.size(0) == n && z.size(1) == groups, kOp,
                      ": zeros must be uint8 [N, K/group_size] = [", n, ", ", groups,
                      "]; got shape ", z.sizes());
    TORCH_CHECK_VALUE(z.is_contiguous(), kOp, ": zeros must be contiguous");
  }

  binding::check_sparse24_bias(kOp, bias_arg, x_arg, n);

  // Everything below allocates or launches on x's GPU, which need not be the current one.
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_arg.device().index()).stream();

  at::Tensor out = at::empty({m, n}, x_arg.options());
  if (m == 0 || n == 0) return out;

  // x rows are read with 16-byte cp.async (with one row the row stride is never used); values
  // with 16-byte and meta with 8-byte cp.async (scales and zeros are read element-wise).
  const at::Tensor x = binding::rows_16_byte_aligned(x_arg, /*one_row_any_stride=*/true);
  const at::Tensor values = binding::realigned(values_arg, 16);
  const at::Tensor meta = binding::realigned(meta_arg, 8);
  // fp32 bias, as the reference adds bias.float() to the fp32 accumulator.
  const std::optional<at::Tensor> bias = binding::as_fp32(bias_arg);

  C10_CUDA_CHECK(leanops::launch_sparse24_int4_mm(
      x.data_ptr(), x.stride(0), values.data_ptr<uint8_t>(), meta.data_ptr<uint8_t>(),
      scales_arg.data_ptr(), zeros_arg.has_value() ? zeros_arg->data_ptr<uint8_t>() : nullptr,
      group_size, bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr(),
      dtype == at::kHalf ? leanops::Sparse24Dtype::kFloat16 : leanops::Sparse24Dtype::kBFloat16,
      m, n, k, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanops_C, CUDA, m) { m.impl("sparse24_int4_mm", &sparse24_int4_mm_cuda); }

#endif  // LEANOPS_WITH_CUDA
