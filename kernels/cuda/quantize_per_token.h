// Launcher of the per-token int8 quantisation kernel (quantize_per_token.cu).
//
// Plain C++ and CUDA runtime types only, so the .cu file compiles without any torch header
// (nvcc on torch headers is most of an extension's build time) and the binding in
// kernels/quantize_per_token.cpp, compiled by the host compiler, does the torch side.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace leanops {

// The element types the kernel is instantiated for (and no others: compile time).
enum class FloatType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Quantise each row of x [m, k] to int8 with one fp32 scale per row, bit-exact with
// leanops.quant.int8.quantize_per_token_int8 (see the .cu file for the arithmetic).
//   x        row r starts at x + r * x_row_stride elements; columns are contiguous
//   smooth   fp32 [k] contiguous, multiplied into x per column first; nullptr for none
//   q        int8 [m, k] contiguous (row stride k), written
//   scale    fp32 [m], written
// Requires m >= 1, 1 <= k < 2^31. Enqueues on `stream` and returns cudaGetLastError() of the
// launch (it does not synchronise).
cudaError_t launch_quantize_per_token_int8(const void* x, FloatType x_type, int64_t m, int64_t k,
                                           int64_t x_row_stride, const float* smooth, int8_t* q,
                                           float* scale, cudaStream_t stream);

}  // namespace leanops
