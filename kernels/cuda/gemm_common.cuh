// Building blocks shared by the tensor-core GEMMs (int4_weight_mm.cu, int8_mm.cu, sparse24_mm.cu,
// sparse24_int4_mm.cu): the 16-bit type traits with the int4 magic numbers, cp.async copies into
// shared memory, ldmatrix, the mma.sync / mma.sp wrappers, the shared-memory opt-in and the
// split-K plan. (What only the two 2:4 kernels share is in sparse24_common.cuh.)
//
// Why no ldmatrix in the dense GEMMs: int4_weight_mm and int8_mm read every operand with plain
// 64/128-bit shared loads. The mma.sync fragments tie each thread to fixed K positions, but a
// dot product does not care in which order K is summed, so each kernel picks the K order that
// makes a thread's K positions contiguous in memory, and uses that same order for both operands.
// That is what lets the int4 kernel read the stored leanops.quant.int4 layout as it is, with no
// repacking (see int4_weight_mm.cu for the mapping). The 2:4 kernels cannot reorder K (a sparse
// chunk is tied to its metadata nibble), so they use ldmatrix_x4 (sparse24_int4_mm.cu's header says why).
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace leanops::gemm {

// ---- 16-bit types ---------------------------------------------------------------------------
// Half<kBF16>: the fp16 (false) or bf16 (true) element and pair types, their conversions, and
// the magic number of the exact int4 dequant: kMagic | q (q < 16, in each half) is exactly
// kMagicValue + q, so (kMagic | q) - (kMagicValue + z) is the integer q - z with no rounding.
template <bool kBF16>
struct Half;

template <>
struct Half<false> {
  using T = __half;
  using T2 = __half2;
  // 0x6400 is 1024.0 in fp16, whose ulp is 1: 0x6400 | q is exactly 1024 + q for q < 16.
  static constexpr uint32_t kMagic = 0x64006400u;
  static constexpr int kMagicValue = 1024;
  static __device__ __forceinline__ T2 pair(float v) { return __float2half2_rn(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ T2 from_floats(float a, float b) {
    return __floats2half2_rn(a, b);
  }
};

template <>
struct Half<true> {
  using T = __nv_bfloat16;
  using T2 = __nv_bfloat162;
  // 0x4300 is 128.0 in bf16, whose ulp is 1 (7 mantissa bits): 0x4300 | q is exactly 128 + q.
  static constexpr uint32_t kMagic = 0x43004300u;
  static constexpr int kMagicValue = 128;
  static __device__ __forceinline__ T2 pair(float v) { return __float2bfloat162_rn(v); }
  static __device__ __forceinline__ T from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ T2 from_floats(float a, float b) {
    return __floats2bfloat162_rn(a, b);
  }
};

// Bit casts between a 16-bit pair and the 32-bit register the mma operands are made of.
template <typename T2>
__device__ __forceinline__ uint32_t as_u32(T2 v) {
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T2>
__device__ __forceinline__ T2 as_pair(uint32_t v) {
  return *reinterpret_cast<T2*>(&v);
}

// ---- cp.async (sm_80+) --------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Global -> shared copies; when `valid` is false nothing is read and the bytes are zero-filled
// (src-size 0), which is how tiles past the edge of the matrix read as zeros. `dst` is a
// shared-state-space address (smem_addr), the form the 2:4 kernels compute their offsets in.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
// The same from a generic pointer into shared memory.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  cp_async_16(smem_addr(smem), gmem, valid);
}
// 8 bytes (.ca: cp.async.cg only takes 16-byte copies).
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 8 : 0));
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

// Four 8x8 b16 matrices; lane l supplies the address of row l % 8 of matrix l / 8, and register
// j of every lane receives its fragment of matrix j (row lane / 4, columns 2 (lane % 4), +1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
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

// d += A(2:4 sparse, 16 x 32) * B(32 x 8), metadata e, sparsity selector 0 (threads T0, T1 of
// each quad supply e). mma.sp::ordered_metadata (PTX ISA 8.5+, sm_80+): the form the PTX ISA
// advises, requiring i0 < i1 in every group code; fragment layouts in sparse24_mm.cu's header.
template <bool kBF16>
__device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[4], uint32_t e) {
  if constexpr (!kBF16) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(e));
  }
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

// Launches a split-K GEMM kernel(args, workspace, tiles_per_split) of tile C (C::BM x C::BN
// output tiles, C::THREADS threads, C::SMEM_BYTES of dynamic shared memory) on the grid
// (N tiles, M tiles, plan.splits), opting in first when C::SMEM_BYTES is above 48 KB. `opted_in`
// is the caller's static, one per kernel instantiation (see allow_dynamic_smem).
template <class C, typename Kernel, typename Args, typename Plan, typename Workspace>
cudaError_t launch_split_k(Kernel kernel, PerDeviceFlags& opted_in, const Args& args,
                           const Plan& plan, Workspace* workspace, cudaStream_t stream) {
  if (C::SMEM_BYTES > 48 * 1024) {
    const cudaError_t err = allow_dynamic_smem(kernel, C::SMEM_BYTES, opted_in);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<unsigned>((args.n + C::BN - 1) / C::BN),
                  static_cast<unsigned>((args.m + C::BM - 1) / C::BM),
                  static_cast<unsigned>(plan.splits));
  kernel<<<grid, C::THREADS, C::SMEM_BYTES, stream>>>(args, workspace, plan.tiles_per_split);
  return cudaGetLastError();
}

// ---- split-K plan ---------------------------------------------------------------------------
// Small-M GEMMs have too few output tiles to keep every SM streaming the weight; they split the
// K loop over `splits` blocks per tile, each writing fp32/int32 partials to a workspace
// [splits, M, N] that a second kernel sums in a fixed order (deterministic, unlike atomics).
struct SplitK {
  int splits;          // blocks along K per output tile (1: no workspace, direct epilogue)
  int tiles_per_split; // K tiles each split walks
};

// forced > 0 replaces the heuristic (clamped to [1, k_tiles]). K = 0 (k_tiles = 0) is one
// split of no tiles: the kernel's K loop runs zero times and its epilogue writes the bias (or
// zeros), which is the product's value; every division below needs k_tiles >= 1.
inline SplitK plan_split_k(int64_t output_tiles, int k_tiles, int sm_count, int max_splits,
                           int forced = 0) {
  if (k_tiles <= 0) return SplitK{1, 0};
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
