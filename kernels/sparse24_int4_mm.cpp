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

namespace {

constexpr const char* kOp = "leanops_C::sparse24_int4_mm";

bool aligned(const at::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0;
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " must be on x's device (",
                    x.device(), "); got ", t.device());
}

at::Tensor sparse24_int4_mm_cuda(const at::Tensor& x_arg, const at::Tensor& values_arg,
                                 const at::Tensor& meta_arg, const at::Tensor& scales_arg,
                                 const std::optional<at::Tensor>& zeros_arg, int64_t group_size,
                                 const std::optional<at::Tensor>& bias_arg) {
  // The dispatcher picks this kernel when any argument is a CUDA tensor, so x itself may not be.
  TORCH_CHECK_VALUE(x_arg.is_cuda(), kOp, ": x must be a CUDA tensor; got one on ", x_arg.device());
  TORCH_CHECK_VALUE(x_arg.dim() == 2, kOp, ": x must be 2-D [M, K]; got shape ", x_arg.sizes());
  const at::ScalarType dtype = x_arg.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kHalf || dtype == at::kBFloat16, kOp,
                    ": x must have dtype float16 or bfloat16 (float32 runs on the Triton "
                    "backend); got ", dtype);
  const int64_t m = x_arg.size(0);
  const int64_t k = x_arg.size(1);
  TORCH_CHECK_VALUE(
      k >= leanops::kSparse24Int4KMultiple && k % leanops::kSparse24Int4KMultiple == 0, kOp,
      ": K (the columns of x) must be a positive multiple of ", leanops::kSparse24Int4KMultiple,
      " for the CUDA kernel; got K = ", k);
  TORCH_CHECK_VALUE(k <= (int64_t{1} << 30), kOp, ": K above 2^30 is not supported; got K = ", k);
  TORCH_CHECK_VALUE(m <= leanops::kSparse24Int4MaxM, kOp, ": x may have at most ",
                    leanops::kSparse24Int4MaxM, " rows; got M = ", m);

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

  check_device("meta", meta_arg, x_arg);
  TORCH_CHECK_VALUE(meta_arg.scalar_type() == at::kByte, kOp,
                    ": meta must have dtype uint8; got ", meta_arg.scalar_type());
  TORCH_CHECK_VALUE(meta_arg.dim() == 2 && meta_arg.size(0) == n && meta_arg.size(1) * 8 == k,
                    kOp, ": meta must be uint8 [N, K/8] = [", n, ", ", k / 8, "]; got shape ",
                    meta_arg.sizes());
  TORCH_CHECK_VALUE(meta_arg.is_contiguous(), kOp, ": meta must be contiguous");

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

  if (bias_arg.has_value()) {
    const at::Tensor& b = *bias_arg;
    check_device("bias", b, x_arg);
    TORCH_CHECK_VALUE(at::isFloatingType(b.scalar_type()), kOp,
                      ": bias must have a floating-point dtype; got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == n, kOp, ": bias must have shape [N] = [", n,
                      "]; got ", b.sizes());
  }

  // Everything below allocates or launches on x's GPU, which need not be the current one.
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_arg.device().index()).stream();

  // The kernel reads x rows with 16-byte cp.async: it needs unit column stride, a 16-byte
  // aligned start and a row stride that is a multiple of 8 elements; otherwise copy once here
  // (a fresh contiguous tensor has them, K being a multiple of 64). (With one row, the row
  // stride is never used.)
  at::Tensor x = x_arg;
  if (m > 0 && (x.stride(1) != 1 || (m > 1 && x.stride(0) % 8 != 0) || !aligned(x, 16))) {
    x = x.clone(at::MemoryFormat::Contiguous);
  }
  // values: 16-byte cp.async; meta: 8-byte cp.async (scales and zeros are read element-wise).
  // Contiguous views into a larger buffer can start anywhere: realign by copying.
  const at::Tensor values = aligned(values_arg, 16) ? values_arg : values_arg.clone();
  const at::Tensor meta = aligned(meta_arg, 8) ? meta_arg : meta_arg.clone();
  // fp32 bias, as the reference adds bias.float() to the fp32 accumulator.
  std::optional<at::Tensor> bias;
  if (bias_arg.has_value()) bias = bias_arg->to(at::kFloat).contiguous();

  at::Tensor out = at::empty({m, n}, x_arg.options());
  if (m == 0 || n == 0) return out;

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
