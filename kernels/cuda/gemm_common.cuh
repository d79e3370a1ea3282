// Building blocks shared by the tensor-core GEMMs (int4_weight_mm.cu, int8_mm.cu): cp.async
// copies into shared memory, mma.sync wrappers, and the split-K plan.
//
// Why no ldmatrix: both GEMMs read every operand with plain 64/128-bit shared loads. The
// mma.sync fragments tie each thread to fixed K positions, but a dot product does not care in
// which order K is summed, so each kernel picks the K order that makes a thread's K positions
// contiguous in memory, and uses that same order for both operands. That is what lets the int4
// kernel read the stored leanops.quant.int4 layout as it is, with no repacking (see
// int4_weight_mm.cu for the mapping).
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime.h>

namespace leanops::gemm {

// ---- cp.async (sm_80+) --------------------------------------------------------------------
// 16-byte global -> shared copy; when `valid` is false nothing is read and the 16 bytes are
// zero-filled (src-size 0), which is how tiles past the edge of the matrix read as zeros.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- shared loads ---------------------------------------------------------------------------
__device__ __forceinline__ uint4 lds128(const void* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ uint2 lds64(const void* p) {
  return *reinterpret_cast<const uint2*>(p);
}

// ---- mma.sync -------------------------------------------------------------------------------
// m16n8k16, 16-bit inputs, fp32 accumulate. Fragment ownership (PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type"), with g = lane / 4 and t = lane % 4:
//   a[0] = A[g][2t, 2t+1]     a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]     b[1] = B[2t+8, 2t+9][g]
//   c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// Only the K index depends on t, identically for A and B: that is the freedom the kernels use.
template <bool kBF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4],
                                          const uint32_t (&b)[2]) {
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// m16n8k32, s8 x s8 -> s32 (PTX ISA, "mma.m16n8k32" integer fragments), g, t as above; each
// register holds 4 consecutive K bytes:
//   a[0] = A[g][4t..4t+3]      a[1] = A[g+8][4t..4t+3]
//   a[2] = A[g][16+4t..+3]     a[3] = A[g+8][16+4t..+3]
//   b[0] = B[4t..4t+3][g]      b[1] = B[16+4t..+3][g]
//   c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
__device__ __forceinline__ void mma_16832_s8(int (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// ---- launch helpers -------------------------------------------------------------------------
// Above 48 KB of dynamic shared memory a kernel must opt in, per device. Done once per process,
// device and kernel (a race only repeats the idempotent call), not per launch, so a launch being
// captured into a CUDA graph (after the usual warm-up call) makes no driver call but the launch.
// `done` must be a static owned by exactly one kernel instantiation (kernels with the same
// signature are indistinguishable by type, so the flag cannot live here).
using PerDeviceFlags = std::atomic<bool>[64];

template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes, PerDeviceFlags& done) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < 64;
  if (cached && done[device].load(std::memory_order_relaxed)) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cached) done[device].store(true, std::memory_order_relaxed);
  return err;
}

// ---- split-K plan ---------------------------------------------------------------------------
// Small-M GEMMs have too few output tiles to keep every SM streaming the weight; they split the
// K loop over `splits` blocks per tile, each writing fp32/int32 partials to a workspace
// [splits, M, N] that a second kernel sums in a fixed order (deterministic, unlike atomics).
struct SplitK {
  int splits;          // blocks along K per output tile (1: no workspace, direct epilogue)
  int tiles_per_split; // K tiles each split walks
};

// forced > 0 replaces the heuristic (clamped to [1, k_tiles]).
inline SplitK plan_split_k(int64_t output_tiles, int k_tiles, int sm_count, int max_splits,
                           int forced = 0) {
  if (forced > 0) {
    const int splits = forced < k_tiles ? forced : k_tiles;
    const int per = (k_tiles + splits - 1) / splits;
    return SplitK{(k_tiles + per - 1) / per, per};
  }
  // Aim for two waves of blocks; never give a split fewer than 4 K tiles (below that the
  // pipeline prologue and the workspace traffic cost more than the parallelism gains).
  int splits = 1;
  const int64_t target = 2 * int64_t{sm_count};
  if (output_tiles < target) {
    splits = static_cast<int>((target + output_tiles - 1) / output_tiles);
    splits = splits < max_splits ? splits : max_splits;
    const int most = k_tiles / 4 > 1 ? k_tiles / 4 : 1;
    splits = splits < most ? splits : most;
  }
  const int per = (k_tiles + splits - 1) / splits;
  return SplitK{(k_tiles + per - 1) / per, per};  // no empty split
}

}  // namespace leanops::gemm
