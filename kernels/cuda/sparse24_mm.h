// Launcher of the 2:4 sparse GEMM on the sparse tensor cores (sparse24_mm.cu).
//
// Plain C++ and CUDA runtime types only, so the .cu file compiles without any torch header; the
// binding in kernels/sparse24_mm.cpp, compiled by the host compiler, does the torch side.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace leanops {

// The 16-bit element types the kernel is instantiated for (x, values and out share it).
enum class Sparse24Dtype : int { kFloat16 = 0, kBFloat16 = 1 };

// K must be a multiple of this (one k-tile of the large config; the Python side routes other K
// to Triton).
constexpr int64_t kSparse24KMultiple = 64;
// Largest M the launcher takes: the grid's y dimension counts M tiles of up to 128 rows.
constexpr int64_t kSparse24MaxM = int64_t{65535} * 128;

// out[M, N] = x[M, K] @ W^T + bias, W [N, K] the 2:4 weight stored as leanops.sparsity.sparse24
// (values [N, K/2], meta uint8 [N, K/8]); fp32 accumulation, one rounding to the 16-bit type.
//   x       row r starts at x + r * x_row_stride elements, columns contiguous; the pointer and
//           x_row_stride * 2 bytes must be multiples of 16 (16-byte cp.async)
//   values  [n, k/2] contiguous, 16-byte aligned
//   meta    [n, k/8] contiguous, 8-byte aligned; every 4-bit code valid (i0 < i1): mma.sp's
//           behaviour on other codes is undefined (the library checks codes where they enter)
//   bias    fp32 [n] contiguous, or nullptr
//   out     [m, n] contiguous, written
// Requires m >= 1, 1 <= n <= 2^30, k >= 64 a multiple of 64, k <= 2^30, m <= kSparse24MaxM (else
// returns cudaErrorInvalidValue without launching). Enqueues on `stream` and returns the launch
// error (it does not synchronise).
cudaError_t launch_sparse24_mm(const void* x, int64_t x_row_stride, const void* values,
                               const uint8_t* meta, const float* bias, void* out,
                               Sparse24Dtype dtype, int64_t m, int64_t n, int64_t k,
                               cudaStream_t stream);

}  // namespace leanops
