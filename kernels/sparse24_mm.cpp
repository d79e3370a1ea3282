// CUDA binding of leanops_C::sparse24_mm (schema in leanops_C.cpp, kernel in
// cuda/sparse24_mm.cu): argument checks, output allocation, device guard, stream, launch.
//
// Compiled by the host compiler, not nvcc, with only the ATen headers used (see
// quantize_per_token.cpp for why). Callers normally reach this through leanops.sparse24_mm,
// which has already checked the arguments (and routed fp32 and K % 64 != 0 to Triton); the
// checks are repeated here because torch.ops.leanops_C.sparse24_mm is callable directly and a
// bad pointer in a kernel is a crash, not an exception. The metadata codes themselves are not
// re-checked (a full pass over meta per call): they are validated where a weight enters the
// library (leanops.sparsity.sparse24.check_meta).

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/sparse24_mm.h"
#include "gemm_binding.h"

namespace {

namespace binding = leanops::binding;

constexpr const char* kOp = "leanops_C::sparse24_mm";

at::Tensor sparse24_mm_cuda(const at::Tensor& x_arg, const at::Tensor& values_arg,
                            const at::Tensor& meta_arg, const std::optional<at::Tensor>& bias_arg) {
  binding::check_sparse24_x(kOp, x_arg, leanops::kSparse24KMultiple, leanops::kSparse24MaxM);
  const at::ScalarType dtype = x_arg.scalar_type();
  const int64_t m = x_arg.size(0);
  const int64_t k = x_arg.size(1);

  binding::check_on_device(kOp, "values", values_arg, x_arg);
  TORCH_CHECK_VALUE(values_arg.scalar_type() == dtype, kOp,
                    ": values must have x's dtype (", dtype, "); got ", values_arg.scalar_type());
  TORCH_CHECK_VALUE(values_arg.dim() == 2 && values_arg.size(1) * 2 == k, kOp,
                    ": values must be [N, K/2] with K = ", k, "; got shape ", values_arg.sizes());
  TORCH_CHECK_VALUE(values_arg.is_contiguous(), kOp, ": values must be contiguous");
  const int64_t n = values_arg.size(0);
  TORCH_CHECK_VALUE(n <= (int64_t{1} << 30), kOp, ": N above 2^30 is not supported; got ", n);

  binding::check_sparse24_meta(kOp, meta_arg, x_arg, n, k);
  binding::check_sparse24_bias(kOp, bias_arg, x_arg, n);

  // Everything below allocates or launches on x's GPU, which need not be the current one.
  const c10::cuda::CUDAGuard device_guard(x_arg.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x_arg.device().index()).stream();

  at::Tensor out = at::empty({m, n}, x_arg.options());
  if (m == 0 || n == 0) return out;

  // x rows are read with 16-byte cp.async (with one row the row stride is never used); values
  // with 16-byte and meta with 8-byte cp.async.
  const at::Tensor x = binding::rows_16_byte_aligned(x_arg, /*one_row_any_stride=*/true);
  const at::Tensor values = binding::realigned(values_arg, 16);
  const at::Tensor meta = binding::realigned(meta_arg, 8);
  // fp32 bias, as the reference adds bias.float() to the fp32 accumulator (exact for 16-bit
  // bias, rounds a float64 one the same way).
  const std::optional<at::Tensor> bias = binding::as_fp32(bias_arg);

  C10_CUDA_CHECK(leanops::launch_sparse24_mm(
      x.data_ptr(), x.stride(0), values.data_ptr(), meta.data_ptr<uint8_t>(),
      bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr(),
      dtype == at::kHalf ? leanops::Sparse24Dtype::kFloat16 : leanops::Sparse24Dtype::kBFloat16,
      m, n, k, stream));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanops_C, CUDA, m) { m.impl("sparse24_mm", &sparse24_mm_cuda); }

#endif  // LEANOPS_WITH_CUDA
