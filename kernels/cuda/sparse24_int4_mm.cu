// 2:4 sparse + int4 GEMM on the sparse tensor cores: out = x @ W^T + bias, with W [N, K] the 2:4
// weight whose kept values are int4 group-quantised, in the stored format of
// leanops.sparsity.sparse24 (values uint8 [N, K/4] = int4 codes of the K/2 kept values, low nibble
// = even kept index; scales [N, K/g]; zeros uint8 [N, K/g] or none (zero point 8); meta uint8
// [N, K/8]); x [M, K] and out [M, N] fp16 or bf16, fp32 accumulation, one final rounding.
// Numerics follow leanops.ops.sparse24._sparse24_int4_mm_reference (up to fp32 summation order).
//
// This is sparse24_mm.cu (read its header first: out^T = W x^T with the weight as mma.sp's
// sparse A operand, mma.sp::ordered_metadata m16n8k32, the B and metadata fragments, the
// clamped rows and the shared-memory epilogue are the same) with the A fragment built from the
// packed codes instead of ldmatrix on 16-bit values. What the two kernels share is written once,
// in sparse24_common.cuh (the kernel skeleton run_gemm: tile shape, pipeline, x and metadata
// loads, metadata register, epilogue; this file's weight operand is the class KeptCodes) and
// gemm_common.cuh (PTX wrappers, the 16-bit traits and magic numbers of the int4 dequant).
//
// --- The A fragment from the codes (g = lane / 4, t = lane % 4) ----------------------------
// Per 16-row x 32-input-column mma (16 kept values per row), register j of A holds row
// g + 8*(j&1), kept columns 8*(j>>1) + 2t, +1 (sparse24_mm.cu: the dense m16n8k16 A layout on the
// 16 x 16 tile of kept values). Kept columns 2c, 2c+1 (the two entries of 4-input group c, i0's
// first) are exactly byte c of the row's codes (low nibble 2c, high nibble 2c+1), and a k32 slice
// is 8 code bytes. So
//   a0 = byte t   of row g      a1 = byte t   of row g+8
//   a2 = byte t+4 of row g      a3 = byte t+4 of row g+8
// i.e. with the slice's 8 bytes of a row read as two 32-bit words (w.x = bytes 0-3, w.y = 4-7):
// byte t of w.x and of w.y. Each thread reads them with one 64-bit shared load per row (all four
// threads of a quad load the same 8 bytes: a broadcast) and expands each byte b to a half2
// (b & 15, b >> 4) in the 16-bit type:
//   v = prmt(w, w >> 4, sel_t)      bytes [w.b_t, -, (w>>4).b_t, -]: low nibbles = b.lo, b.hi
//   v = (v & 0x000F000F) | magic    halves 1024 + q (fp16, 0x6400) / 128 + q (bf16, 0x4300),
//                                   exact (the ulp there is 1)
//   a = (v - (magic + z)) * s       __hsub2 exact (q - z, a small integer), __hmul2 the single
//                                   rounding of the format: bit-identical to the reference
// (shift + prmt + lop3 + hsub2 + hmul2 per register; int4_weight_mm.cu uses the same exact
// dequant).
//
// Why this, and not the alternatives:
//  - int4_weight_mm.cu's trick (give each thread contiguous K and permute x to match) does not
//    carry over: a sparse A chunk is tied to its metadata nibble and to 4 B rows that other
//    threads hold, so a K permutation must move whole groups of 4, which breaks ldmatrix for x
//    and needs nibble shuffles of the metadata. Keeping K in order keeps B and metadata exactly
//    as in sparse24_mm.cu (already reasoned about once) and costs ~5 ALU ops per A register.
//  - Repacking the codes offline (Marlin-style interleave) would make the A loads one 128-bit
//    load per thread with no byte picking, but the stored format is the one passed around
//    (no second copy of the weight, same bytes for every backend); not done in this version.
//  - Scales/zeros are not staged through shared memory: a stage holds BK/g <= 4 scales per row
//    (2 bytes each, under cp.async's 4-byte minimum and not 4-byte aligned in general). Each
//    thread reads its rows' scales (and zeros) from global memory (L1/L2-resident: <= 1/32 of
//    the code bytes) one k-tile ahead of their use, as int4_weight_mm.cu does.
// A group spans g >= 64 input columns and a warp works on whole 64-column k-blocks (2 slices,
// 16 code bytes per row), so one scale per (row, k-block) covers both slices.
//
// --- Tiling --------------------------------------------------------------------------------
// Two configs (x fp16/bf16 x symmetric/zero points: eight instantiations, for compile time):
//   large  M > 64: CTA 128 weight rows x 128 tokens, BK = 64 (one k-block) per stage, 8 warps
//          as 2 (n) x 4 (m), warp tile 64 x 32 (4 x 4 mma tiles), 4 stages (84 KB).
//   small  M <= 64 (decode): CTA 32 weight rows x 16 tokens, BK = 256 per stage, 4 warps that
//          take one 64-column k-block of each stage each (intra-CTA split-K, summed in shared
//          memory at the end), 6 stages (70.5 KB): the weight is 3x smaller per column than
//          sparse24_mm's, so one more stage keeps as many weight bytes in flight per CTA.
// Shared memory per stage: codes [BN][BK/4 (+16 when BK/4 is an even number of 16-byte units)],
// x [BM][BK] + 16 bytes pad per row, meta [BN][BK/8]. Code row pitches 16 (large) and 80 (small)
// bytes put the 8 rows g of a 64-bit code load in 8 distinct bank pairs (conflict-free); x as in
// sparse24_mm.cu (odd multiples of 16 bytes: conflict-free ldmatrix).
//
// --- Edges ---------------------------------------------------------------------------------
// As sparse24_mm.cu: cp.async of 16 (codes, x) or 8 (meta) bytes, zero-filled past M; weight rows
// past N clamped to row N-1 (a zero metadata code is invalid for mma.sp; those outputs are never
// stored); K % 64 == 0 so a k-block is wholly in or out of K, and blocks past K (only in the last
// stage of the small config) are skipped by a warp-uniform branch, never fed zero codes. Scale
// reads clamp the row to N-1 and the group to K/g - 1. Offsets that can pass 2^31 are int64.

#include "sparse24_int4_mm.h"

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_common.cuh"
#include "sparse24_common.cuh"

namespace leanops {
namespace {

using gemm::as_pair;
using gemm::as_u32;
using gemm::Half;
using gemm::mma_sp_16832;

// The weight operand: code_row = BK/4 code bytes per row and stage, padded by 16 bytes when that
// is an even number of 16-byte units (see the header comment: row pitches 16 and 80 bytes).
constexpr int code_pitch(int code_row) {
  return (code_row / 16) % 2 == 1 ? code_row : code_row + 16;
}

template <int BN, int BM, int BK, int WarpsN, int WarpsM, int WarpsK, int Stages, int MinBlocks>
struct Config : sparse24::Tile<BN, BM, BK, WarpsN, WarpsM, WarpsK, Stages, MinBlocks,
                               code_pitch(BK / 4)> {
  using Base =
      sparse24::Tile<BN, BM, BK, WarpsN, WarpsM, WarpsK, Stages, MinBlocks, code_pitch(BK / 4)>;
  static constexpr int kBlocks = BK / 64;  // 64-column k-blocks per stage
  static constexpr int kBlocksPerWarp = kBlocks / WarpsK;  // k64 blocks per warp per stage
  static constexpr int kCodePitch = Base::kAPitch;
  static_assert(kBlocks % WarpsK == 0, "each warp takes the same number of k64 blocks");
};

using LargeConfig = Config<128, 128, 64, 2, 4, 1, 4, 1>;
using SmallConfig = Config<32, 16, 256, 1, 1, 4, 6, 2>;
constexpr int64_t kSmallMaxM = 64;

// Byte t of `word` (sel = the lane's selector, see the header) -> half2 (b & 15, b >> 4) of the
// kept values (q - z) * s: low half the even kept index (i0's value), high half the odd one.
template <bool kBF16>
__device__ __forceinline__ uint32_t dequant_byte(uint32_t word, uint32_t sel,
                                                 typename Half<kBF16>::T2 offset,
                                                 typename Half<kBF16>::T2 scale) {
  using H = Half<kBF16>;
  const uint32_t v = (__byte_perm(word, word >> 4, sel) & 0x000F000Fu) | H::kMagic;
  return as_u32(__hmul2(__hsub2(as_pair<typename H::T2>(v), offset), scale));
}

// ---- the kernel ---------------------------------------------------------------------------

// The weight operand of sparse24::run_gemm: int4 codes of the kept values, dequantised in
// registers into the A fragment with this thread's rows' scales (and zero points).
template <bool kBF16, bool kZeros, typename C>
struct KeptCodes {
  using H = Half<kBF16>;
  using T = typename H::T;
  using T2 = typename H::T2;

  // Scale and (magic + zero point) of this thread's rows (g, g+8 of each mma tile) for each of
  // the warp's k64 blocks of one k-tile. (magic + z) is pre-added so the dequant is one
  // subtract: (magic + q) - (magic + z) = q - z exactly.
  struct State {
    T2 scale[C::kBlocksPerWarp][C::MI][2];
    T2 offset[kZeros ? C::kBlocksPerWarp : 1][kZeros ? C::MI : 1][2];
  };

  const uint8_t* __restrict__ codes;
  const T* __restrict__ scales;
  const uint8_t* __restrict__ zeros;
  int group_size;
  uint32_t code_lane_off;  // row g of each 16-row tile (and g+8); the byte is picked by `sel`
  // prmt selector: bytes [w.b_t, w.b_t, (w>>4).b_t, (w>>4).b_t] (bytes 1, 3 are masked off).
  uint32_t sel;
  T2 sym_offset;

  __device__ __forceinline__ KeptCodes(const uint8_t* c, const T* s, const uint8_t* z, int gs,
                                       const sparse24::Block<C>& b)
      : codes(c),
        scales(s),
        zeros(z),
        group_size(gs),
        code_lane_off((b.warp_n * C::WN + b.lane / 4) * C::kCodePitch),
        sel((b.lane % 4) | ((b.lane % 4) << 4) | ((4 + b.lane % 4) << 8) |
            ((4 + b.lane % 4) << 12)),
        sym_offset(H::pair(static_cast<float>(H::kMagicValue + 8))) {}

  // codes: BN rows x BK/4 bytes = BK/64 chunks of 16 bytes (one k64 block each) per row.
  __device__ __forceinline__ void load(uint32_t dst, int kbase, const sparse24::Block<C>& b,
                                       int n, int k) const {
    // a row of K/2 4-bit codes is K/4 bytes; k-tile kbase starts at byte kbase / 4
    sparse24::load_weight_tile<C, C::BK / 64>(dst, C::kCodePitch, codes, k / 4, kbase / 4,
                                              b.n0, n, b.tid);
  }

  __device__ __forceinline__ void prepare(int tile, State& qp, const sparse24::Block<C>& b,
                                          int n, int k) const {
    const int64_t groups = k / group_size;
    const int g = b.lane / 4;
#pragma unroll
    for (int jb = 0; jb < C::kBlocksPerWarp; ++jb) {
      const int64_t kcol =
          static_cast<int64_t>(tile) * C::BK + (jb * C::kWarpsK + b.warp_k) * 64;
      // A k64 block lies in one group (g is a multiple of 64); blocks past K (skipped) clamp.
      const int64_t grp = min(kcol / group_size, groups - 1);
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t row = min(b.n0 + C::WN * b.warp_n + 16 * mi + g + 8 * h, n - 1);
          const T s = scales[row * groups + grp];
          qp.scale[jb][mi][h] = T2{s, s};
          if constexpr (kZeros) {
            const int z = zeros[row * groups + grp];
            qp.offset[jb][mi][h] = H::pair(static_cast<float>(H::kMagicValue + z));
          }
        }
      }
    }
  }

  __device__ __forceinline__ void compute(int tile, const unsigned char* w_stage, uint32_t,
                                          uint32_t xs, const unsigned char* ms,
                                          const State& quant, float (&acc)[C::MI][C::NI][4],
                                          const sparse24::Block<C>& b, int k) const {
    const unsigned char* cs = w_stage + code_lane_off;
#pragma unroll
    for (int jb = 0; jb < C::kBlocksPerWarp; ++jb) {
      const int block = jb * C::kWarpsK + b.warp_k;
      // K % 64 == 0: a block is wholly in or out of K (warp-uniform branch, never zero codes).
      if (tile * C::BK + block * 64 >= k) break;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int slice = 2 * block + half;  // k32 slice within the stage
        uint32_t bx[C::NI][4];
        sparse24::load_x_fragments<C>(bx, xs, slice);
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi) {
          // The slice's 8 code bytes of rows g and g+8.
          const unsigned char* crow = cs + mi * 16 * C::kCodePitch + slice * 8;
          const uint2 lo = *reinterpret_cast<const uint2*>(crow);
          const uint2 hi = *reinterpret_cast<const uint2*>(crow + 8 * C::kCodePitch);
          T2 off0 = sym_offset, off1 = sym_offset;
          if constexpr (kZeros) {
            off0 = quant.offset[jb][mi][0];
            off1 = quant.offset[jb][mi][1];
          }
          const T2 s0 = quant.scale[jb][mi][0];
          const T2 s1 = quant.scale[jb][mi][1];
          const uint32_t a[4] = {
              dequant_byte<kBF16>(lo.x, sel, off0, s0),   // row g,   group t
              dequant_byte<kBF16>(hi.x, sel, off1, s1),   // row g+8, group t
              dequant_byte<kBF16>(lo.y, sel, off0, s0),   // row g,   group t+4
              dequant_byte<kBF16>(hi.y, sel, off1, s1)};  // row g+8, group t+4
          const uint32_t e =
              sparse24::meta_register<C>(ms + mi * 16 * C::kMetaPitch + slice * 4);
#pragma unroll
          for (int ni = 0; ni < C::NI; ++ni) mma_sp_16832<kBF16>(acc[mi][ni], a, bx[ni], e);
        }
      }
    }
  }
};

template <bool kBF16, bool kZeros, typename C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    sparse24_int4_mm_kernel(const typename Half<kBF16>::T* __restrict__ x, int64_t ldx,
                            const uint8_t* __restrict__ codes, const uint8_t* __restrict__ meta,
                            const typename Half<kBF16>::T* __restrict__ scales,
                            const uint8_t* __restrict__ zeros, int group_size,
                            const float* __restrict__ bias, typename Half<kBF16>::T* __restrict__ out,
                            int m, int n, int k) {
  extern __shared__ __align__(16) unsigned char smem[];
  const sparse24::Block<C> blk;
  const KeptCodes<kBF16, kZeros, C> op(codes, scales, zeros, group_size, blk);
  sparse24::run_gemm<C, Half<kBF16>>(op, blk, smem, x, ldx, meta, bias, out, m, n, k);
}

template <bool kBF16, bool kZeros, typename C>
cudaError_t launch(const void* x, int64_t ldx, const uint8_t* codes, const uint8_t* meta,
                   const void* scales, const uint8_t* zeros, int64_t group_size,
                   const float* bias, void* out, int64_t m, int64_t n, int64_t k,
                   cudaStream_t stream) {
  using T = typename Half<kBF16>::T;
  static gemm::PerDeviceFlags opted_in = {};  // one per instantiation of this function
  return sparse24::launch<C>(sparse24_int4_mm_kernel<kBF16, kZeros, C>, opted_in, m, n, stream,
                             static_cast<const T*>(x), ldx, codes, meta,
                             static_cast<const T*>(scales), zeros, static_cast<int>(group_size),
                             bias, static_cast<T*>(out), static_cast<int>(m),
                             static_cast<int>(n), static_cast<int>(k));
}

template <bool kBF16, bool kZeros>
cudaError_t dispatch(const void* x, int64_t ldx, const uint8_t* codes, const uint8_t* meta,
                     const void* scales, const uint8_t* zeros, int64_t group_size,
                     const float* bias, void* out, int64_t m, int64_t n, int64_t k,
                     cudaStream_t stream) {
  if (m <= kSmallMaxM) {
    return launch<kBF16, kZeros, SmallConfig>(x, ldx, codes, meta, scales, zeros, group_size,
                                              bias, out, m, n, k, stream);
  }
  return launch<kBF16, kZeros, LargeConfig>(x, ldx, codes, meta, scales, zeros, group_size, bias,
                                            out, m, n, k, stream);
}

template <bool kBF16>
cudaError_t dispatch_zeros(const void* x, int64_t ldx, const uint8_t* codes, const uint8_t* meta,
                           const void* scales, const uint8_t* zeros, int64_t group_size,
                           const float* bias, void* out, int64_t m, int64_t n, int64_t k,
                           cudaStream_t stream) {
  if (zeros != nullptr) {
    return dispatch<kBF16, true>(x, ldx, codes, meta, scales, zeros, group_size, bias, out, m, n,
                                 k, stream);
  }
  return dispatch<kBF16, false>(x, ldx, codes, meta, scales, zeros, group_size, bias, out, m, n,
                                k, stream);
}

}  // namespace

cudaError_t launch_sparse24_int4_mm(const void* x, int64_t x_row_stride, const uint8_t* values,
                                    const uint8_t* meta, const void* scales, const uint8_t* zeros,
                                    int64_t group_size, const float* bias, void* out,
                                    Sparse24Dtype dtype, int64_t m, int64_t n, int64_t k,
                                    cudaStream_t stream) {
  if (m < 1 || n < 1 || n > (int64_t{1} << 30) || k < kSparse24Int4KMultiple ||
      k % kSparse24Int4KMultiple != 0 || k > (int64_t{1} << 30) || m > kSparse24Int4MaxM ||
      x_row_stride < 0 || group_size < 64 || group_size % 64 != 0 || k % group_size != 0) {
    return cudaErrorInvalidValue;
  }
  if (dtype == Sparse24Dtype::kFloat16) {
    return dispatch_zeros<false>(x, x_row_stride, values, meta, scales, zeros, group_size, bias,
                                 out, m, n, k, stream);
  }
  return dispatch_zeros<true>(x, x_row_stride, values, meta, scales, zeros, group_size, bias, out,
                              m, n, k, stream);
}

}  // namespace leanops
