// W8A8 GEMM on tensor cores: out[M, N] = (a[M, K] @ b[N, K]^T) * a_scale[:, None] *
// b_scale[None, :] + bias, int8 x int8 -> int32 with mma.sync m16n8k32, the scales and bias
// applied in the epilogue (no int32 tensor in memory, no separate dequantisation pass).
//
// Numerics: bit-exact with leanops.ops.int8's reference. The int32 accumulation is exact (K is
// bounded, int8_mm.h); int32 -> fp32 rounds once to nearest like the reference's float64 ->
// float32; then ((acc * a_scale) * b_scale) + bias in that order with IEEE _rn intrinsics (never
// contracted to an FMA), and one rounding to the output dtype. Split-K sums int32 partials,
// which is exact, so splitting changes no bit either.
//
// K order (see gemm_common.cuh): inside each 64-byte K block thread t = lane % 4 owns the 16
// contiguous columns [16t, 16t + 16) of its rows of a and b, read with one 128-bit shared load
// per row. The m16n8k32 fragments want per thread the K bytes {4t..4t+3} (registers a[0], a[1],
// b[0]) and {16+4t..16+4t+3} (a[2], a[3], b[1]) of each k32 step; k32 step s of a block is fed
// the loaded words R[2s] and R[2s+1], i.e. columns 16t + 8s + (0..3) and 16t + 8s + (4..7).
// A and b use the same assignment, so the sum is the same dot product; over s = 0, 1 each of the
// thread's 16 columns is used once. No ldmatrix, no register permutes.
//
// Shared layout: a K tile is BK = 128 bytes per row (two 64-byte blocks). Rows g and g + 1 are
// read in the same 128-bit load phase (lanes 0-7) and would start in the same bank; swapping the
// two blocks of odd rows (blk ^ (row & 1)) puts them in opposite halves of the bank window.
//
// Pipeline as in int4_weight_mm.cu: cp.async into a STAGES-deep ring, zero-filled past the
// edges, one __syncthreads per K tile; small M splits K over blocks (gemm_common.cuh).
//
// Requirements (checked by the binding and by leanops.ops.int8's cuda_supports): K a multiple
// of 16 and at most kInt8MmMaxK, a's rows 16-byte aligned, b contiguous.

#include "int8_mm.h"

#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_common.cuh"

namespace leanops {
namespace {

using gemm::cp_async_16;
using gemm::cp_async_commit;
using gemm::cp_async_wait;
using gemm::lds128;

constexpr int BK = 128;  // bytes (= columns) of K per pipeline stage: two 64-column blocks

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static constexpr int A_STAGE_BYTES = BM * BK, B_STAGE_BYTES = BN * BK;
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);
  static_assert(WM % 16 == 0 && WN % 8 == 0);
};

using SmallM = Tile<16, 64, 1, 4, 4>;    // decode, M <= 16: 128 threads, 40 KB shared
using MediumM = Tile<64, 64, 2, 2, 4>;   // M <= 64: 128 threads, 64 KB
using LargeM = Tile<128, 128, 2, 4, 3>;  // prefill: 256 threads, 96 KB (fits sm_89's 99 KB)

// Physical 16-byte unit of logical unit u (of 8) in a K-tile row: odd rows swap the two blocks.
__device__ __forceinline__ int unit(int row, int u) { return u ^ ((row & 1) << 2); }

__device__ __forceinline__ void store_out(void* out, FloatType type, int64_t idx, float v) {
  switch (type) {
    case FloatType::kFloat16: static_cast<__half*>(out)[idx] = __float2half_rn(v); break;
    case FloatType::kBFloat16:
      static_cast<__nv_bfloat16*>(out)[idx] = __float2bfloat16_rn(v);
      break;
    default: static_cast<float*>(out)[idx] = v; break;
  }
}

// The op's epilogue, in the reference's order, never contracted.
__device__ __forceinline__ float dequant(int acc, float a_scale, float b_scale, float bias) {
  return __fadd_rn(__fmul_rn(__fmul_rn(__int2float_rn(acc), a_scale), b_scale), bias);
}

template <class C>
__global__ void __launch_bounds__(C::THREADS)
    int8_mm_kernel(const Int8MmArgs p, int32_t* __restrict__ workspace, int tiles_per_split) {
  extern __shared__ uint4 smem[];
  char* const a_smem = reinterpret_cast<char*>(smem);
  char* const b_smem = a_smem + C::STAGES * C::A_STAGE_BYTES;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
  const int g = lane / 4, t = lane % 4;
  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t m0 = int64_t{blockIdx.y} * C::BM, n0 = int64_t{blockIdx.x} * C::BN;
  const int k_tiles = static_cast<int>((K + BK - 1) / BK);
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int kt_count = min(k_tiles, kt_begin + tiles_per_split) - kt_begin;

  auto load_tile = [&](int kt, int slot) {
    const int64_t k0 = int64_t{kt} * BK;
    char* a_dst = a_smem + slot * C::A_STAGE_BYTES;
#pragma unroll
    for (int i = tid; i < C::BM * (BK / 16); i += C::THREADS) {
      const int row = i / (BK / 16), u = i % (BK / 16);
      const int64_t m = m0 + row, k = k0 + 16 * u;
      const bool valid = m < M && k < K;
      const int8_t* src = valid ? p.a + m * p.a_row_stride + k : p.a;
      cp_async_16(a_dst + row * BK + unit(row, u) * 16, src, valid);
    }
    char* b_dst = b_smem + slot * C::B_STAGE_BYTES;
#pragma unroll
    for (int i = tid; i < C::BN * (BK / 16); i += C::THREADS) {
      const int row = i / (BK / 16), u = i % (BK / 16);
      const int64_t n = n0 + row, k = k0 + 16 * u;
      const bool valid = n < N && k < K;
      const int8_t* src = valid ? p.b + n * K + k : p.b;
      cp_async_16(b_dst + row * BK + unit(row, u) * 16, src, valid);
    }
  };

  int acc[C::MT][C::NT][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0;

  auto compute_tile = [&](int slot) {
    const char* a_base = a_smem + slot * C::A_STAGE_BYTES;
    const char* b_base = b_smem + slot * C::B_STAGE_BYTES;
#pragma unroll
    for (int blk = 0; blk < BK / 64; ++blk) {
      uint4 ra[C::MT][2], rb[C::NT];
#pragma unroll
      for (int i = 0; i < C::MT; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = warp_m * C::WM + 16 * i + g + 8 * h;
          ra[i][h] = lds128(a_base + row * BK + unit(row, 4 * blk + t) * 16);
        }
      }
#pragma unroll
      for (int j = 0; j < C::NT; ++j) {
        const int row = warp_n * C::WN + 8 * j + g;
        rb[j] = lds128(b_base + row * BK + unit(row, 4 * blk + t) * 16);
      }
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
          const uint32_t* lo = reinterpret_cast<const uint32_t*>(&ra[i][0]);
          const uint32_t* hi = reinterpret_cast<const uint32_t*>(&ra[i][1]);
          const uint32_t a[4] = {lo[2 * s], hi[2 * s], lo[2 * s + 1], hi[2 * s + 1]};
#pragma unroll
          for (int j = 0; j < C::NT; ++j) {
            const uint32_t* w = reinterpret_cast<const uint32_t*>(&rb[j]);
            const uint32_t b[2] = {w[2 * s], w[2 * s + 1]};
            gemm::mma_16832_s8(acc[i][j], a, b);
          }
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < kt_count) load_tile(kt_begin + s, s);
    cp_async_commit();
  }
  for (int it = 0; it < kt_count; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int next = it + C::STAGES - 1;
    if (next < kt_count) load_tile(kt_begin + next, next % C::STAGES);
    cp_async_commit();
    compute_tile(it % C::STAGES);
  }
  cp_async_wait<0>();

  const bool split = gridDim.z > 1;
  int32_t* ws = split ? workspace + int64_t{blockIdx.z} * M * N : nullptr;
#pragma unroll
  for (int i = 0; i < C::MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m * C::WM + 16 * i + g + 8 * h;
      if (m >= M) continue;
      const float as = split ? 0.0f : p.a_scale[m];
#pragma unroll
      for (int j = 0; j < C::NT; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int64_t n = n0 + warp_n * C::WN + 8 * j + 2 * t + c;
          if (n >= N) continue;
          const int v = acc[i][j][2 * h + c];
          if (split) {
            ws[m * N + n] = v;
          } else {
            const float bias = p.bias != nullptr ? p.bias[n] : 0.0f;
            store_out(p.out, p.out_type, m * N + n, dequant(v, as, p.b_scale[n], bias));
          }
        }
      }
    }
  }
}

__global__ void __launch_bounds__(256)
    int8_mm_reduce(const int32_t* __restrict__ workspace, int splits, Int8MmArgs p) {
  const int64_t mn = p.m * p.n;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < mn;
       idx += int64_t{gridDim.x} * blockDim.x) {
    int v = workspace[idx];
    for (int s = 1; s < splits; ++s) v += workspace[s * mn + idx];  // exact: |sum| < 2^31
    const int64_t m = idx / p.n, n = idx % p.n;
    const float bias = p.bias != nullptr ? p.bias[n] : 0.0f;
    store_out(p.out, p.out_type, idx, dequant(v, p.a_scale[m], p.b_scale[n], bias));
  }
}

template <class C>
cudaError_t launch_config(const Int8MmArgs& args, const Int8MmPlan& plan, int32_t* workspace,
                          cudaStream_t stream) {
  static gemm::PerDeviceFlags opted_in = {};  // one per instantiation of this function
  return gemm::launch_split_k<C>(int8_mm_kernel<C>, opted_in, args, plan, workspace, stream);
}

}  // namespace

Int8MmPlan plan_int8_mm(int64_t m, int64_t n, int64_t k, int sm_count, int force_config,
                        int force_splits) {
  int config, bm, bn;
  if (force_config == 0 || (force_config < 0 && m <= SmallM::BM)) {
    config = 0, bm = SmallM::BM, bn = SmallM::BN;
  } else if (force_config == 1 || (force_config < 0 && m <= MediumM::BM)) {
    config = 1, bm = MediumM::BM, bn = MediumM::BN;
  } else {
    config = 2, bm = LargeM::BM, bn = LargeM::BN;
  }
  const int64_t tiles = ((m + bm - 1) / bm) * ((n + bn - 1) / bn);
  const int k_tiles = static_cast<int>((k + BK - 1) / BK);
  const gemm::SplitK split =
      gemm::plan_split_k(tiles, k_tiles, sm_count, /*max_splits=*/16, force_splits);
  return Int8MmPlan{config, split.splits, split.tiles_per_split,
                    split.splits > 1 ? split.splits * m * n : 0, (m + bm - 1) / bm};
}

cudaError_t launch_int8_mm(const Int8MmArgs& args, const Int8MmPlan& plan, int32_t* workspace,
                           cudaStream_t stream) {
  cudaError_t err;
  switch (plan.config) {
    case 0: err = launch_config<SmallM>(args, plan, workspace, stream); break;
    case 1: err = launch_config<MediumM>(args, plan, workspace, stream); break;
    default: err = launch_config<LargeM>(args, plan, workspace, stream); break;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t mn = args.m * args.n;
  const int blocks = static_cast<int>(std::min<int64_t>((mn + 255) / 256, 4096));
  int8_mm_reduce<<<blocks, 256, 0, stream>>>(workspace, plan.splits, args);
  return cudaGetLastError();
}

}  // namespace leanops
