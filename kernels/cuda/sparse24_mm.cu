// 2:4 sparse x dense GEMM on the sparse tensor cores: out = x @ W^T + bias, with W [N, K] the
// 2:4 weight in the stored format of leanops.sparsity.sparse24 (values [N, K/2], meta uint8
// [N, K/8]), x [M, K] and out [M, N] fp16 or bf16, fp32 accumulation, one final rounding.
// Numerics follow leanops.ops.sparse24._sparse24_mm_reference (up to fp32 summation order).
//
// The sparse operand of mma.sp is A (row-major M x K), so the kernel computes the transpose,
// out^T [N, M] = W [N, K] . x^T [K, M]: the mma's M dimension runs over weight rows (n), its N
// dimension over tokens (m), and x [M, K] row-major is exactly the "col" (K-major) B operand.
//
// Instruction: mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}.{..}.f32
// (PTX ISA 8.5+, sm_80+). The ::ordered_metadata form is the one the PTX ISA advises ("mma.sp
// may have substantially reduced performance on some target architectures"); it requires i0 < i1
// in every group code, which is exactly the format's rule (check_meta), so the stored codes go
// to the tensor cores unchanged.
//
// --- Where each thread's operands come from (g = lane / 4, t = lane % 4) -------------------
// One mma covers 16 weight rows x 32 input columns (8 groups of 4, 16 stored values per row).
//
// A, the sparse weight (PTX ISA 9.7.14.6.2.2, "Matrix Fragments for sparse mma.m16n8k32 with
// .f16 and .bf16 types", Multiplicand A): four .b32 registers, each holding the two kept values
// of one 4-wide chunk: a0,a1 = row g, chunk t (columns 4t..4t+3); a2,a3 = row g+8, chunk t;
// a4,a5 = row g, chunk t+4 (columns 16+4t..); a6,a7 = row g+8, chunk t+4. In the stored values
// a chunk's two kept entries are adjacent (values[n, 2c], values[n, 2c+1], i0 first: the order
// the mma pairs them with the code's i0 and i1), so in the 16 x 16 tile of stored values this is
// the dense m16n8k16 A layout: register j holds row g + 8*(j&1), stored columns 8*(j>>1) + 2t,
// +1. ldmatrix.x4 on the four 8x8 quadrants (order: top-left, bottom-left, top-right,
// bottom-right) produces exactly that (lane l addresses row l%8 of quadrant l/8).
//
// B, the dense activations (same section, Multiplicand B, Figure 121: the m16n8k32 16-bit B
// layout): register j holds B[k = 8j + 2t, 8j + 2t + 1][n = g], i.e. x[token g][k0 + 8j + 2t,
// +1]: two adjacent columns of one token row. ldmatrix.x4 (non-transposed) on the four 8x8
// blocks "8 tokens x 8 columns" at column offsets 0, 8, 16, 24 produces exactly that.
//
// Metadata (same section, Metadata, Figure 122, and 9.7.14.6.1 "Sparse matrix storage": for
// m16n8k32 a thread PAIR of each quad contributes, selector 0 = threads T0, T1): the .b32 of
// thread t in {0, 1} of quad g holds, in bits 0-15, the 4 group codes (one nibble each, i0 in
// the low two bits, groups in K order) of row g for columns 16t..16t+15 of the k32 slice, and
// in bits 16-31 the same for row g+8. That 16-bit word is word (k0/16 + t) of the row in the
// stored format read as little-endian 16-bit words (byte j = groups 2j | 2j+1 << 4), so each
// thread assembles its register from two 16-bit shared loads, no bit shuffling. Threads 2, 3 of
// each quad load the same words as 0, 1 (lane & 1) and are ignored by the instruction.
// Figure 122 is an image in the PTX ISA; this reading of it is shared by MLIR's sparse mma
// integration test (sparse-mma-2-4-f16.mlir), Triton's SparseDot lowering and CUTLASS's use of
// 16-bit metadata words. If outputs come out wrong on a GPU, check this mapping first.
//
// C/D (PTX ISA 9.7.14.5.8, m16n8k16 float accumulators): c0,c1 = (row g, cols 2t, 2t+1), c2,c3
// = (row g+8, same cols): rows are weight rows n, columns tokens m.
//
// --- Tiling --------------------------------------------------------------------------------
// Two configs (fp16 and bf16 each: four instantiations, for compile time):
//   large  M > 64: CTA 128 weight rows x 128 tokens, BK = 64 input columns per stage,
//          8 warps as 2 (n) x 4 (m), warp tile 64 x 32 (4 x 4 mma tiles), 3 stages.
//   small  M <= 64 (decode): CTA 32 weight rows x 16 tokens, BK = 256 per stage, 4 warps that
//          split each stage's 8 k32 slices between them (intra-CTA split-K, summed in shared
//          memory at the end), 5 stages: many CTAs and ~27 KB of weights in flight per CTA to
//          keep HBM busy when the GEMM is a weight stream.
// Shared memory per stage: values [BN][BK/2] + 16 bytes pad per row, x [BM][BK] + 16 bytes pad,
// meta [BN][BK/8]. The 16-byte pad makes the 8 row addresses of every ldmatrix fall in 8
// distinct 16-byte bank groups (row pitches 80, 144, 272, 528 bytes are 5, 9, 17, 33 units of
// 16: odd, so 8 consecutive rows cover all residues mod 8) -> conflict-free ldmatrix.
// Both fit the 99 KB per-block limit of sm_89 (87 KB large, 89 KB small).
//
// --- Edges ---------------------------------------------------------------------------------
// Every global read is a cp.async of 16 (values, x) or 8 (meta) bytes. Tokens past M and
// columns past K are zero-filled (src-size 0: nothing is read). Weight rows past N are clamped
// to row N-1 instead of zero-filled: a zero metadata byte is an invalid code for mma.sp, and
// those rows' outputs are never stored anyway. K is a multiple of 64 and a k32 slice is either
// wholly inside K or wholly outside, so slices past K (only in the last stage of the small
// config) are skipped by a warp-uniform branch rather than fed zero codes. Offsets that can
// pass 2^31 (row * stride) are int64.
//
// Epilogue: the fp32 accumulators go through shared memory ([kWarpsK][BM][BN + 4] floats,
// reusing the drained pipeline buffers), so the small config sums its split-K partials there
// and both write out with coalesced stores along n (out row-major [M, N]), adding the fp32 bias
// and rounding once.
//
// The kernel skeleton (tile shape, pipeline, x and metadata loads, metadata register, this
// epilogue) is shared with sparse24_int4_mm.cu (sparse24_common.cuh's run_gemm, over the weight
// operand class KeptValues below); the PTX wrappers are in gemm_common.cuh.

#include "sparse24_mm.h"

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gemm_common.cuh"
#include "sparse24_common.cuh"

namespace leanops {
namespace {

using gemm::ldmatrix_x4;
using gemm::mma_sp_16832;

// The weight operand: BK/2 16-bit kept values per row and stage, + 16 bytes of pad (the row
// pitches 80 and 272 bytes are 5 and 17 units of 16: odd, so conflict-free ldmatrix as for x).
template <int BN, int BM, int BK, int WarpsN, int WarpsM, int WarpsK, int Stages, int MinBlocks>
struct Config
    : sparse24::Tile<BN, BM, BK, WarpsN, WarpsM, WarpsK, Stages, MinBlocks, /*APitch=*/BK + 16> {
  using Base =
      sparse24::Tile<BN, BM, BK, WarpsN, WarpsM, WarpsK, Stages, MinBlocks, /*APitch=*/BK + 16>;
  static constexpr int kSlices = BK / 32;  // k32 slices per stage
  static constexpr int kSlicesPerWarp = kSlices / WarpsK;
  static constexpr int kValPitch = Base::kAPitch;  // BK/2 16-bit values + pad
  static_assert(kSlices % WarpsK == 0, "each warp takes the same number of k32 slices");
};

using LargeConfig = Config<128, 128, 64, 2, 4, 1, 3, 2>;
using SmallConfig = Config<32, 16, 256, 1, 1, 4, 5, 2>;
constexpr int64_t kSmallMaxM = 64;

// ---- the kernel ---------------------------------------------------------------------------

// The weight operand of sparse24::run_gemm: 16-bit kept values, ldmatrix'd into the A fragment.
template <typename T, typename C>
struct KeptValues {
  struct State {};  // nothing per k-tile

  const T* __restrict__ values;
  uint32_t a_lane_off;  // this lane's ldmatrix row of the values tile (bytes)

  __device__ __forceinline__ KeptValues(const T* v, const sparse24::Block<C>& b)
      : values(v),
        // quadrant q = lane/8 is (rows 8*(q&1).., stored cols 8*(q>>1)..): a0..a3 above.
        a_lane_off((b.warp_n * C::WN + b.lane % 8 + 8 * ((b.lane / 8) & 1)) * C::kValPitch +
                   ((b.lane / 8) >> 1) * 8 * 2) {}

  // values: BN rows x BK/2 values (BK bytes) = BK/16 chunks of 16 bytes (8 values) per row.
  __device__ __forceinline__ void load(uint32_t dst, int kbase, const sparse24::Block<C>& b,
                                       int n, int k) const {
    // a row of K/2 16-bit values is K bytes; k-tile kbase starts at byte kbase
    sparse24::load_weight_tile<C, C::BK / 16>(dst, C::kValPitch,
                                              reinterpret_cast<const uint8_t*>(values), k, kbase,
                                              b.n0, n, b.tid);
  }

  __device__ __forceinline__ void prepare(int, State&, const sparse24::Block<C>&, int,
                                          int) const {}

  __device__ __forceinline__ void compute(int tile, const unsigned char*, uint32_t vs,
                                          uint32_t xs, const unsigned char* ms, const State&,
                                          float (&acc)[C::MI][C::NI][4],
                                          const sparse24::Block<C>& b, int k) const {
    constexpr bool kBF16 = !std::is_same_v<T, __half>;
#pragma unroll
    for (int j = 0; j < C::kSlicesPerWarp; ++j) {
      const int slice = j * C::kWarpsK + b.warp_k;
      // K % 64 == 0: a slice is wholly in or out of K (warp-uniform branch, never zero codes).
      if (tile * C::BK + slice * 32 >= k) break;
      uint32_t bx[C::NI][4];
      sparse24::load_x_fragments<C>(bx, xs, slice);
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
        uint32_t a[4];
        ldmatrix_x4(a, vs + a_lane_off + mi * 16 * C::kValPitch + slice * 16 * 2);
        const uint32_t e =
            sparse24::meta_register<C>(ms + mi * 16 * C::kMetaPitch + slice * 4);
#pragma unroll
        for (int ni = 0; ni < C::NI; ++ni) mma_sp_16832<kBF16>(acc[mi][ni], a, bx[ni], e);
      }
    }
  }
};

template <typename T, typename C>
__global__ void __launch_bounds__(C::kThreads, C::kMinBlocks)
    sparse24_mm_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ values,
                       const uint8_t* __restrict__ meta, const float* __restrict__ bias,
                       T* __restrict__ out, int m, int n, int k) {
  constexpr bool kBF16 = !std::is_same_v<T, __half>;
  extern __shared__ __align__(16) unsigned char smem[];
  const sparse24::Block<C> blk;
  const KeptValues<T, C> op(values, blk);
  sparse24::run_gemm<C, gemm::Half<kBF16>>(op, blk, smem, x, ldx, meta, bias, out, m, n, k);
}

template <typename T, typename C>
cudaError_t launch(const void* x, int64_t ldx, const void* values, const uint8_t* meta,
                   const float* bias, void* out, int64_t m, int64_t n, int64_t k,
                   cudaStream_t stream) {
  static gemm::PerDeviceFlags opted_in = {};  // one per instantiation of this function
  return sparse24::launch<C>(sparse24_mm_kernel<T, C>, opted_in, m, n, stream,
                             static_cast<const T*>(x), ldx, static_cast<const T*>(values), meta,
                             bias, static_cast<T*>(out), static_cast<int>(m),
                             static_cast<int>(n), static_cast<int>(k));
}

template <typename T>
cudaError_t dispatch(const void* x, int64_t ldx, const void* values, const uint8_t* meta,
                     const float* bias, void* out, int64_t m, int64_t n, int64_t k,
                     cudaStream_t stream) {
  if (m <= kSmallMaxM) {
    return launch<T, SmallConfig>(x, ldx, values, meta, bias, out, m, n, k, stream);
  }
  return launch<T, LargeConfig>(x, ldx, values, meta, bias, out, m, n, k, stream);
}

}  // namespace

cudaError_t launch_sparse24_mm(const void* x, int64_t x_row_stride, const void* values,
                               const uint8_t* meta, const float* bias, void* out,
                               Sparse24Dtype dtype, int64_t m, int64_t n, int64_t k,
                               cudaStream_t stream) {
  if (m < 1 || n < 1 || n > (int64_t{1} << 30) || k < kSparse24KMultiple ||
      k % kSparse24KMultiple != 0 || k > (int64_t{1} << 30) || m > kSparse24MaxM ||
      x_row_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (dtype == Sparse24Dtype::kFloat16) {
    return dispatch<__half>(x, x_row_stride, values, meta, bias, out, m, n, k, stream);
  }
  return dispatch<__nv_bfloat16>(x, x_row_stride, values, meta, bias, out, m, n, k, stream);
}

}  // namespace leanops
