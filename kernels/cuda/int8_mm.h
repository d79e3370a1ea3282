// W8A8 tensor-core GEMM with the per-token x per-channel dequantisation epilogue fused: the
// launch interface the binding (kernels/int8_mm.cpp) calls. Plain C++: no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "quantize_per_token.h"  // FloatType

namespace leanops {

struct Int8MmArgs {
  const int8_t* a;        // [M, K], unit column stride, 16-byte aligned rows
  int64_t a_row_stride;   // bytes (= elements) between rows of a, a multiple of 16
  const int8_t* b;        // [N, K] contiguous
  const float* a_scale;   // [M] fp32
  const float* b_scale;   // [N] fp32
  const float* bias;      // [N] fp32, or nullptr
  void* out;              // [M, N] contiguous, out_type
  FloatType out_type;
  int64_t m, n, k;        // K a multiple of 16, at most kMaxK
};

// int32 accumulation cannot overflow while K * 128 * 128 < 2^31 (-128 is a valid int8 in the op
// even though leanops' quantisers never produce it); 65536 leaves a factor of two.
constexpr int64_t kInt8MmMaxK = 65536;

struct Int8MmPlan {
  int config;               // index into the kernel's tile table (small-M, medium, large-M)
  int splits;               // > 1: int32 partials in a workspace, then a reduction kernel
  int tiles_per_split;      // K tiles per split
  int64_t workspace_elems;  // int32 elements of workspace the caller allocates
  int64_t m_tiles;          // row tiles = gridDim.y of the launch (at most 65535)
};

// force_config / force_splits: as plan_int4_weight_mm (int4_weight_mm.h).
Int8MmPlan plan_int8_mm(int64_t m, int64_t n, int64_t k, int sm_count, int force_config = -1,
                        int force_splits = 0);

cudaError_t launch_int8_mm(const Int8MmArgs& args, const Int8MmPlan& plan, int32_t* workspace,
                           cudaStream_t stream);

}  // namespace leanops
