// W4A16 GEMM on tensor cores: out[M, N] = x[M, K] @ W^T + bias, W int4 group-wise in the stored
// layout of leanops.quant.int4 (w_packed uint8 [N, K/2], low nibble = even k), dequantised in
// registers, mma.sync m16n8k16 with fp32 accumulation.
//
// Numerics (the op's definition, leanops/ops/int4.py): W = (q - z) * s in the scales' dtype,
// one rounding; fp32 accumulation; out = (acc + bias) rounded once to x's dtype. The dequant
// below is exactly that: the magic-number trick gives (bias + q) exactly, subtracting (bias + z)
// gives the integer q - z exactly, and one __hmul2 rounds (q - z) * s once; so every weight the
// tensor cores see is bit-identical to the reference's. (A fused (v * s - (bias + z) * s)
// would save one instruction per two weights and round twice.)
//
// ONE LAYOUT FOR EVERY M, AND NO REPACKING. The m16n8k16 fragments fix which K indices a thread
// holds: with t = lane % 4, k in {2t, 2t+1, 2t+8, 2t+9} of each k16 step, for A and for B alike
// (gemm_common.cuh). A dot product may be summed in any K order as long as A and B use the same
// one, so inside each 64-wide K block this kernel gives thread t the 16 *contiguous* columns
// [16t, 16t + 16): 8 bytes of w_packed per weight row (one 64-bit shared load) and 32 bytes of
// x per activation row (two 128-bit loads). Of those 16 columns, 32-bit word w (w = 0, 1) of
// the weight holds nibbles for columns c = 16t + 8w + i, i = 0..7, at bits 4i. The magic-number
// dequant extracts nibble pairs (i, i+4) at once, (W >> 4i) & 0x000F000F, so the natural half2
// pairs are P_i = (col 8w+i, col 8w+i+4). k16 step s of word w then uses
//   b[0] = P_{2s}   = cols (8w+2s,   8w+2s+4)   in the fragment slots of k = 2t, 2t+1
//   b[1] = P_{2s+1} = cols (8w+2s+1, 8w+2s+5)   in the fragment slots of k = 2t+8, 2t+9
// and the activation registers are permuted to match with one byte-permute (prmt) each: from the
// 128-bit load R[0..3] = x[16t+8w .. 16t+8w+8) (two halves per register),
//   a[0] / a[1] = (x_{2s}, x_{2s+4})   = prmt(R[s], R[s+2], 0x5410)   rows g / g+8
//   a[2] / a[3] = (x_{2s+1}, x_{2s+5}) = prmt(R[s], R[s+2], 0x7632)   rows g / g+8
// Over w, s in {0, 1} the four steps cover each of the 16 columns exactly once. So the stored
// layout is the kernel's layout: from_linear and load do no repacking, the weight is never held
// twice, and the same bytes serve decode (M = 1) and prefill; only the tile shape changes with M.
//
// Pipeline: cp.async 16-byte copies of each K tile of x and w_packed into a STAGES-deep ring of
// shared buffers (zero-filled past the matrix edges), one __syncthreads per K tile. Shared
// layouts are XOR-swizzled so the loads above are free of bank conflicts (see a_unit/b_block).
// Group scales and zero points are read from global memory (L1/L2 resident: 1/64 of the weight
// bytes at g = 128) one K tile ahead of their use. Small M splits K over blocks (gemm_common.cuh).
//
// Bank conflicts, in detail. x tile: a row is BK halves = a multiple of 128 bytes, so rows g and
// g + 1 (lanes 0-3 and 4-7: one 128-bit shared-load phase) start in the same bank; XOR-ing the
// 16-byte unit index with (row & 1) moves odd rows by 16 bytes and the 8 lanes cover all 32
// banks. w tile: a row is BK/2 bytes; lanes 0-15 (one 64-bit phase) read rows g = 0..3 at
// 8t bytes into a 32-byte block; swizzling the block index by the row (b_block) puts the four
// rows' blocks in four different quarters of the 128-byte bank window.
//
// Requirements (checked by the binding and by leanops.ops.int4's cuda_supports): x and scales
// float16 or bfloat16, the same dtype; K a multiple of 32 (the format already requires it);
// x rows 16-byte aligned.

#include "int4_weight_mm.h"

#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_common.cuh"

namespace leanops {
namespace {

using gemm::as_pair;
using gemm::as_u32;
using gemm::cp_async_16;
using gemm::cp_async_commit;
using gemm::cp_async_wait;
using gemm::lds128;
using gemm::Half;
using gemm::lds64;

// Tile shapes. BM x BN output tile per block, BK columns of K per pipeline stage (a multiple of
// 64, a power of two times 64 for the w swizzle), WARPS_M x WARPS_N warps.
template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_;
  static constexpr int STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // per-warp tile
  static constexpr int MT = WM / 16, NT = WN / 8;              // mma tiles per warp
  static constexpr int KB = BK / 64;                           // 64-wide K blocks per stage
  static constexpr int A_ROW_BYTES = BK * 2, B_ROW_BYTES = BK / 2;
  static constexpr int A_STAGE_BYTES = BM * A_ROW_BYTES, B_STAGE_BYTES = BN * B_ROW_BYTES;
  static constexpr int SMEM_BYTES = STAGES * (A_STAGE_BYTES + B_STAGE_BYTES);
  static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 64 == 0 && (KB & (KB - 1)) == 0);
};

// The three tile configurations (plan_int4_weight_mm picks one by M). Only these are compiled.
using SmallM = Tile<16, 64, 128, 1, 4, 4>;   // decode, M <= 16: 128 threads, 32 KB shared
using MediumM = Tile<64, 64, 64, 2, 2, 4>;   // M <= 64: 128 threads, 40 KB
using LargeM = Tile<128, 128, 64, 2, 4, 4>;  // prefill: 256 threads, 80 KB

// Physical 16-byte unit of logical unit `u` (8 halves) in x-tile row `row` (see header comment).
__device__ __forceinline__ int a_unit(int row, int u) { return u ^ (row & 1); }

// Physical 32-byte block of logical 64-column block `blk` in w-tile row `row`.
template <class C>
__device__ __forceinline__ int b_block(int row, int blk) {
  constexpr int rows_per_window = C::B_ROW_BYTES >= 128 ? 1 : 128 / C::B_ROW_BYTES;
  constexpr int variants = C::KB < 4 ? C::KB : 4;
  return blk ^ ((row / rows_per_window) % variants);
}

template <class C, bool kBF16, bool kZeros>
__global__ void __launch_bounds__(C::THREADS)
    int4_weight_mm_kernel(const Int4WeightMmArgs p, float* __restrict__ workspace,
                          int tiles_per_split) {
  using H = Half<kBF16>;
  using T = typename H::T;
  using T2 = typename H::T2;
  extern __shared__ uint4 smem[];
  char* const a_smem = reinterpret_cast<char*>(smem);
  char* const b_smem = a_smem + C::STAGES * C::A_STAGE_BYTES;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = warp / C::WARPS_N, warp_n = warp % C::WARPS_N;
  const int g = lane / 4, t = lane % 4;
  const int64_t M = p.m, N = p.n, K = p.k;
  const int64_t m0 = int64_t{blockIdx.y} * C::BM, n0 = int64_t{blockIdx.x} * C::BN;
  const int k_tiles = static_cast<int>((K + C::BK - 1) / C::BK);
  const int kt_begin = blockIdx.z * tiles_per_split;
  const int kt_count = min(k_tiles, kt_begin + tiles_per_split) - kt_begin;
  const int64_t groups = K / p.group_size;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ scales = static_cast<const T*>(p.scales);

  // ---- global -> shared, one K tile ----
  auto load_tile = [&](int kt, int slot) {
    const int64_t k0 = int64_t{kt} * C::BK;
    char* a_dst = a_smem + slot * C::A_STAGE_BYTES;
    constexpr int A_UNITS_PER_ROW = C::BK / 8;
#pragma unroll
    for (int i = tid; i < C::BM * A_UNITS_PER_ROW; i += C::THREADS) {
      const int row = i / A_UNITS_PER_ROW, u = i % A_UNITS_PER_ROW;
      const int64_t m = m0 + row, k = k0 + 8 * u;
      const bool valid = m < M && k < K;
      const T* src = valid ? x + m * p.x_row_stride + k : x;
      cp_async_16(a_dst + row * C::A_ROW_BYTES + a_unit(row, u) * 16, src, valid);
    }
    char* b_dst = b_smem + slot * C::B_STAGE_BYTES;
    constexpr int B_UNITS_PER_ROW = C::BK / 32;
#pragma unroll
    for (int i = tid; i < C::BN * B_UNITS_PER_ROW; i += C::THREADS) {
      const int row = i / B_UNITS_PER_ROW, u = i % B_UNITS_PER_ROW;
      const int64_t n = n0 + row, k = k0 + 32 * u;
      const bool valid = n < N && k < K;
      const uint8_t* src = valid ? p.w_packed + n * (K / 2) + k / 2 : p.w_packed;
      const int phys = b_block<C>(row, u / 2) * 2 + u % 2;
      cp_async_16(b_dst + row * C::B_ROW_BYTES + phys * 16, src, valid);
    }
  };

  // ---- group scale and zero point of this thread's weights, per (n8 tile, 64-column block).
  // (bias + z) is pre-added so the dequant is one subtract: (bias + q) - (bias + z) = q - z.
  struct Quant {
    T2 scale[C::NT][C::KB];
    T2 offset[C::NT][C::KB];
  };
  auto load_quant = [&](int kt, Quant& qp) {
    const int64_t k_thread = int64_t{kt} * C::BK + 16 * t;
#pragma unroll
    for (int j = 0; j < C::NT; ++j) {
      // Rows and columns past the edges are clamped: their weights meet zero activations or
      // are never stored, but must be finite and read from inside the tensors.
      const int64_t n = min(n0 + warp_n * C::WN + 8 * j + g, N - 1);
#pragma unroll
      for (int blk = 0; blk < C::KB; ++blk) {
        // The thread's 16 columns [k, k + 16) sit in one group: groups are multiples of 32
        // columns and k is a multiple of 16.
        const int64_t grp = min((k_thread + 64 * blk) / p.group_size, groups - 1);
        const T s = scales[n * groups + grp];
        qp.scale[j][blk] = T2{s, s};
        // Columns past K (when K % 64 == 32, half of the last 64-column block) read as q = 0
        // (zero-filled); a zero point of 0 there makes their weight exactly 0 * s = 0. With the
        // real zero point it would be -z * s: -inf in fp16 once z * s > 65504, and -inf times
        // the zero-filled x is NaN in the accumulator. (Blocks wholly past K are skipped.)
        const bool past_k = k_thread + 64 * blk >= K;
        const int z = past_k ? 0 : kZeros ? static_cast<int>(p.zeros[n * groups + grp]) : 8;
        qp.offset[j][blk] = H::pair(static_cast<float>(H::kMagicValue + z));
      }
    }
  };

  float acc[C::MT][C::NT][4];
#pragma unroll
  for (int i = 0; i < C::MT; ++i)
#pragma unroll
    for (int j = 0; j < C::NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  // ---- one K tile from shared memory through the tensor cores ----
  auto compute_tile = [&](int kt, int slot, const Quant& qp) {
    const char* a_base = a_smem + slot * C::A_STAGE_BYTES;
    const char* b_base = b_smem + slot * C::B_STAGE_BYTES;
#pragma unroll
    for (int blk = 0; blk < C::KB; ++blk) {
      // A 64-column block wholly past K (in the last K tile when BK does not divide K) adds
      // nothing: skipped by a warp-uniform branch (it depends on kt and blk only). With one
      // block per tile (BK = 64) that never happens: tile kt starts inside K.
      if constexpr (C::KB > 1) {
        if (int64_t{kt} * C::BK + 64 * blk >= K) break;
      }
      uint2 wq[C::NT];  // this thread's 16 codes of each of its weight rows
#pragma unroll
      for (int j = 0; j < C::NT; ++j) {
        const int row = warp_n * C::WN + 8 * j + g;
        wq[j] = lds64(b_base + row * C::B_ROW_BYTES + b_block<C>(row, blk) * 32 + 8 * t);
      }
#pragma unroll
      for (int w = 0; w < 2; ++w) {
        uint4 xa[C::MT][2];  // rows g and g + 8 of each m16 tile: x[16t + 8w .. + 8)
#pragma unroll
        for (int i = 0; i < C::MT; ++i) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = warp_m * C::WM + 16 * i + g + 8 * h;
            xa[i][h] = lds128(a_base + row * C::A_ROW_BYTES +
                              a_unit(row, 8 * blk + 2 * t + w) * 16);
          }
        }
        uint32_t wb[C::NT][4];  // dequantised pairs P_0..P_3 of word w
#pragma unroll
        for (int j = 0; j < C::NT; ++j) {
          const uint32_t word = w == 0 ? wq[j].x : wq[j].y;
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint32_t biased = ((word >> (4 * i)) & 0x000F000Fu) | H::kMagic;
            const T2 v = __hmul2(__hsub2(as_pair<T2>(biased), qp.offset[j][blk]),
                                 qp.scale[j][blk]);
            wb[j][i] = as_u32(v);
          }
        }
#pragma unroll
        for (int s = 0; s < 2; ++s) {
#pragma unroll
          for (int i = 0; i < C::MT; ++i) {
            const uint32_t* lo = reinterpret_cast<const uint32_t*>(&xa[i][0]);
            const uint32_t* hi = reinterpret_cast<const uint32_t*>(&xa[i][1]);
            const uint32_t a[4] = {
                __byte_perm(lo[s], lo[s + 2], 0x5410), __byte_perm(hi[s], hi[s + 2], 0x5410),
                __byte_perm(lo[s], lo[s + 2], 0x7632), __byte_perm(hi[s], hi[s + 2], 0x7632)};
#pragma unroll
            for (int j = 0; j < C::NT; ++j) {
              const uint32_t b[2] = {wb[j][2 * s], wb[j][2 * s + 1]};
              gemm::mma_16816<kBF16>(acc[i][j], a, b);
            }
          }
        }
      }
    }
  };

  // ---- the pipeline ----
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < kt_count) load_tile(kt_begin + s, s);
    cp_async_commit();  // always commit, so wait_group counts stay aligned
  }
  // Two register sets, never indexed by a runtime value (that would put them in local memory).
  Quant quant, quant_next;
  if (kt_count > 0) load_quant(kt_begin, quant);
  for (int it = 0; it < kt_count; ++it) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile `it` is visible to all; everyone is done with tile it - 1's slot
    const int next = it + C::STAGES - 1;
    if (next < kt_count) load_tile(kt_begin + next, next % C::STAGES);
    cp_async_commit();
    if (it + 1 < kt_count) load_quant(kt_begin + it + 1, quant_next);
    compute_tile(kt_begin + it, it % C::STAGES, quant);
    quant = quant_next;
  }
  cp_async_wait<0>();

  // ---- epilogue: fp32 partials to the workspace, or (acc + bias) rounded once to T ----
  const bool split = gridDim.z > 1;
  float* ws = split ? workspace + int64_t{blockIdx.z} * M * N : nullptr;
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < C::MT; ++i) {
#pragma unroll
    for (int j = 0; j < C::NT; ++j) {
      const int64_t n = n0 + warp_n * C::WN + 8 * j + 2 * t;
      if (n >= N) continue;
      const bool pair_ok = n + 1 < N;
      float b0 = 0.0f, b1 = 0.0f;
      if (!split && p.bias != nullptr) {
        b0 = p.bias[n];
        if (pair_ok) b1 = p.bias[n + 1];
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t m = m0 + warp_m * C::WM + 16 * i + g + 8 * h;
        if (m >= M) continue;
        const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
        if (split) {
          ws[m * N + n] = v0;
          if (pair_ok) ws[m * N + n + 1] = v1;
        } else if (pair_ok && (N % 2 == 0)) {  // (m * N + n) even: a 4-byte aligned pair store
          *reinterpret_cast<T2*>(out + m * N + n) = H::from_floats(v0 + b0, v1 + b1);
        } else {
          out[m * N + n] = H::from_float(v0 + b0);
          if (pair_ok) out[m * N + n + 1] = H::from_float(v1 + b1);
        }
      }
    }
  }
}

// Sums the split-K partials in split order (deterministic), adds the bias, rounds once.
template <bool kBF16>
__global__ void __launch_bounds__(256)
    int4_weight_mm_reduce(const float* __restrict__ workspace, int splits, int64_t mn,
                          int64_t n, const float* __restrict__ bias, void* out) {
  using H = Half<kBF16>;
  for (int64_t idx = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; idx < mn;
       idx += int64_t{gridDim.x} * blockDim.x) {
    float v = workspace[idx];
    for (int s = 1; s < splits; ++s) v += workspace[s * mn + idx];
    if (bias != nullptr) v += bias[idx % n];
    static_cast<typename H::T*>(out)[idx] = H::from_float(v);
  }
}

template <class C, bool kBF16, bool kZeros>
cudaError_t launch_config(const Int4WeightMmArgs& args, const Int4WeightMmPlan& plan,
                          float* workspace, cudaStream_t stream) {
  static gemm::PerDeviceFlags opted_in = {};  // one per instantiation of this function
  return gemm::launch_split_k<C>(int4_weight_mm_kernel<C, kBF16, kZeros>, opted_in, args, plan,
                                 workspace, stream);
}

template <class C, bool kBF16>
cudaError_t launch_config(const Int4WeightMmArgs& args, const Int4WeightMmPlan& plan,
                          float* workspace, cudaStream_t stream) {
  return args.zeros != nullptr ? launch_config<C, kBF16, true>(args, plan, workspace, stream)
                               : launch_config<C, kBF16, false>(args, plan, workspace, stream);
}

template <bool kBF16>
cudaError_t launch_dtype(const Int4WeightMmArgs& args, const Int4WeightMmPlan& plan,
                         float* workspace, cudaStream_t stream) {
  cudaError_t err;
  switch (plan.config) {
    case 0: err = launch_config<SmallM, kBF16>(args, plan, workspace, stream); break;
    case 1: err = launch_config<MediumM, kBF16>(args, plan, workspace, stream); break;
    default: err = launch_config<LargeM, kBF16>(args, plan, workspace, stream); break;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t mn = args.m * args.n;
  const int blocks = static_cast<int>(std::min<int64_t>((mn + 255) / 256, 4096));
  int4_weight_mm_reduce<kBF16><<<blocks, 256, 0, stream>>>(workspace, plan.splits, mn, args.n,
                                                            args.bias, args.out);
  return cudaGetLastError();
}

}  // namespace

Int4WeightMmPlan plan_int4_weight_mm(int64_t m, int64_t n, int64_t k, int sm_count,
                                     int force_config, int force_splits) {
  int config, bm, bn, bk;
  if (force_config == 0 || (force_config < 0 && m <= SmallM::BM)) {
    config = 0, bm = SmallM::BM, bn = SmallM::BN, bk = SmallM::BK;
  } else if (force_config == 1 || (force_config < 0 && m <= MediumM::BM)) {
    config = 1, bm = MediumM::BM, bn = MediumM::BN, bk = MediumM::BK;
  } else {
    config = 2, bm = LargeM::BM, bn = LargeM::BN, bk = LargeM::BK;
  }
  const int64_t tiles = ((m + bm - 1) / bm) * ((n + bn - 1) / bn);
  const int k_tiles = static_cast<int>((k + bk - 1) / bk);
  const gemm::SplitK split =
      gemm::plan_split_k(tiles, k_tiles, sm_count, /*max_splits=*/16, force_splits);
  return Int4WeightMmPlan{config, split.splits, split.tiles_per_split,
                          split.splits > 1 ? split.splits * m * n : 0, (m + bm - 1) / bm};
}

cudaError_t launch_int4_weight_mm(const Int4WeightMmArgs& args, const Int4WeightMmPlan& plan,
                                  float* workspace, cudaStream_t stream) {
  return args.bf16 ? launch_dtype<true>(args, plan, workspace, stream)
                   : launch_dtype<false>(args, plan, workspace, stream);
}

}  // namespace leanops
