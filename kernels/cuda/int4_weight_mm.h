// W4A16 tensor-core GEMM on the stored int4 layout (leanops.quant.int4): the launch interface
// the binding (kernels/int4_weight_mm.cpp) calls. Plain C++: no torch headers.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace leanops {

struct Int4WeightMmArgs {
  const void* x;            // [M, K] float16 or bfloat16, unit column stride, 16-byte aligned rows
  int64_t x_row_stride;     // elements between rows of x (a multiple of 8)
  const uint8_t* w_packed;  // [N, K/2] contiguous: codes of k = 2j (low nibble), 2j+1 (high)
  const void* scales;       // [N, K/group_size] contiguous, x's dtype
  const uint8_t* zeros;     // [N, K/group_size] contiguous, or nullptr (symmetric: zero point 8)
  const float* bias;        // [N] fp32, or nullptr
  void* out;                // [M, N] contiguous, x's dtype
  int64_t m, n, k, group_size;
  bool bf16;                // x (and scales, out) are bfloat16, else float16
};

// How one call is run: the tile configuration for its M, and the split of K over blocks.
struct Int4WeightMmPlan {
  int config;              // index into the kernel's tile table (small-M, medium, large-M)
  int splits;              // > 1: fp32 partials in a workspace, then a reduction kernel
  int tiles_per_split;     // K tiles per split
  int64_t workspace_elems; // fp32 elements of workspace the caller allocates (0 if splits == 1)
  int64_t m_tiles;          // row tiles = gridDim.y of the launch (at most 65535)
};

// force_config (0 small, 1 medium, 2 large; -1: by M) and force_splits (> 0; 0: by the SM
// count) override the heuristics: every configuration is correct for every shape, and the tests
// and tuning sessions pick them explicitly (LEANOPS_CUDA_GEMM_CONFIG / _SPLITS, see the binding).
Int4WeightMmPlan plan_int4_weight_mm(int64_t m, int64_t n, int64_t k, int sm_count,
                                     int force_config = -1, int force_splits = 0);

// Launches on `stream`; `workspace` holds plan.workspace_elems floats. Returns the launch error.
cudaError_t launch_int4_weight_mm(const Int4WeightMmArgs& args, const Int4WeightMmPlan& plan,
                                  float* workspace, cudaStream_t stream);

}  // namespace leanops
