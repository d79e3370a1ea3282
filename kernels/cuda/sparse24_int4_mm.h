// Launcher of the 2:4 sparse + int4 GEMM on the sparse tensor cores (sparse24_int4_mm.cu).
//
// Plain C++ and CUDA runtime types only, so the .cu file compiles without any torch header; the
// binding in kernels/sparse24_int4_mm.cpp, compiled by the host compiler, does the torch side.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "sparse24_mm.h"  // Sparse24Dtype: x, scales and out share one 16-bit type

namespace leanops {

// K must be a multiple of this (one 64-column k-block, the unit a warp dequantises; the Python
// side routes other K to Triton). The format already makes K a multiple of group_size >= 64.
constexpr int64_t kSparse24Int4KMultiple = 64;
// Largest M the launcher takes: the grid's y dimension counts M tiles of up to 128 rows.
constexpr int64_t kSparse24Int4MaxM = int64_t{65535} * 128;

// out[M, N] = x[M, K] @ W^T + bias, W [N, K] the 2:4 weight whose kept values are int4
// group-quantised, stored as leanops.sparsity.sparse24 describes (2:4 + int4):
//   x       [m, k] fp16/bf16; row r starts at x + r * x_row_stride elements, columns contiguous;
//           the pointer and x_row_stride * 2 bytes must be multiples of 16 (16-byte cp.async)
//   values  uint8 [n, k/4] contiguous, 16-byte aligned: int4 codes of the K/2 kept values, low
//           nibble = even kept index (leanops.quant.int4 packing)
//   meta    uint8 [n, k/8] contiguous, 8-byte aligned; every 4-bit code valid (i0 < i1)
//   scales  [n, k/group_size] contiguous, in x's dtype
//   zeros   uint8 [n, k/group_size] contiguous (codes 0..15), or nullptr (symmetric: 8)
//   bias    fp32 [n] contiguous, or nullptr
//   out     [m, n] contiguous, written
// Kept value = (q - z) * s rounded once in the 16-bit type; fp32 accumulation; one rounding of
// (acc + bias) to the 16-bit type. Requires m >= 1, 1 <= n <= 2^30, k >= 64 a multiple of 64,
// k <= 2^30, group_size a positive multiple of 64 dividing k, m <= kSparse24Int4MaxM (else
// returns cudaErrorInvalidValue without launching). Enqueues on `stream` and returns the launch
// error (it does not synchronise).
cudaError_t launch_sparse24_int4_mm(const void* x, int64_t x_row_stride, const uint8_t* values,
                                    const uint8_t* meta, const void* scales, const uint8_t* zeros,
                                    int64_t group_size, const float* bias, void* out,
                                    Sparse24Dtype dtype, int64_t m, int64_t n, int64_t k,
                                    cudaStream_t stream);

}  // namespace leanops
