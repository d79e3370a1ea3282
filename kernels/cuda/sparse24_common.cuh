// What only the two 2:4 sparse GEMMs (sparse24_mm.cu, sparse24_int4_mm.cu) share: the tile
// shape and shared-memory plan, the cp.async loads of the x and metadata tiles, the metadata
// register of mma.sp, and the shared-memory epilogue. The two differ only in the weight operand
// (16-bit kept values read with ldmatrix vs int4 codes dequantised in registers): its shared
// row pitch is a parameter of the tile, its load and its A fragment stay in each kernel.
// The fragment layouts this code relies on are derived in sparse24_mm.cu's header.
// (Device building blocks of all the GEMMs are in gemm_common.cuh.)
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "gemm_common.cuh"

namespace leanops::sparse24 {

// CTA tile: BN weight rows (the mma's M) x BM tokens (the mma's N), BK input columns (logical K)
// per pipeline stage; kWarpsN x kWarpsM x kWarpsK warps, the last splitting each stage's K
// between warps (intra-CTA split-K, summed in the epilogue). APitch is the weight operand's
// shared row pitch in bytes per stage (each kernel's header says why that pitch).
//
// Shared memory per stage: weight [BN][APitch], x [BM][BK] + 16 bytes pad per row, meta
// [BN][BK/8]. The x pad makes the 8 row addresses of every ldmatrix fall in 8 distinct 16-byte
// bank groups (2 BK + 16 bytes is an odd number of 16-byte units, so 8 consecutive rows cover
// all residues mod 8): conflict-free ldmatrix. The epilogue's fp32 tile [kWarpsK][BM][BN + 4] reuses the
// drained pipeline buffers.
template <int BN_, int BM_, int BK_, int WarpsN_, int WarpsM_, int WarpsK_, int Stages_,
          int MinBlocks_, int APitch_>
struct Tile {
  static constexpr int BN = BN_;          // weight rows per CTA (mma M)
  static constexpr int BM = BM_;          // tokens per CTA (mma N)
  static constexpr int BK = BK_;          // input columns (logical K) per pipeline stage
  static constexpr int kWarpsN = WarpsN_;
  static constexpr int kWarpsM = WarpsM_;
  static constexpr int kWarpsK = WarpsK_;  // warps sharing one stage's K (split-K in the CTA)
  static constexpr int kStages = Stages_;
  static constexpr int kMinBlocks = MinBlocks_;  // __launch_bounds__: CTAs per SM to fit
  static constexpr int kWarps = WarpsN_ * WarpsM_ * WarpsK_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int WN = BN / kWarpsN;  // weight rows per warp
  static constexpr int WM = BM / kWarpsM;  // tokens per warp
  static constexpr int MI = WN / 16;       // mma tiles along n per warp
  static constexpr int NI = WM / 8;        // mma tiles along m per warp

  // Shared-memory pitches and sizes in bytes.
  static constexpr int kAPitch = APitch_;       // weight operand, per row
  static constexpr int kXPitch = BK * 2 + 16;   // BK 16-bit values + pad
  static constexpr int kMetaPitch = BK / 8;     // one nibble per group of 4
  static constexpr int kABytes = BN * kAPitch;
  static constexpr int kXBytes = BM * kXPitch;
  static constexpr int kMetaBytes = BN * kMetaPitch;
  static constexpr int kStageBytes = kABytes + kXBytes + kMetaBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kRedPitch = BN + 4;  // floats; +4 spreads the accumulator stores
  static constexpr int kRedBytes = kWarpsK * BM * kRedPitch * 4;
  static constexpr int kSmemBytes = kPipeBytes > kRedBytes ? kPipeBytes : kRedBytes;

  static_assert(BK % 64 == 0 && WN % 16 == 0 && WM % 8 == 0, "tile shape");
  static_assert(kABytes % 16 == 0 && kXBytes % 16 == 0 && kMetaBytes % 16 == 0, "alignment");
  static_assert(kSmemBytes <= 99 * 1024, "must fit sm_89's per-block shared memory");
};

// cp.async of the x tile of k-tile `kbase / BK` into the stage at shared address `dst`:
// BM rows x BK values = BK/8 chunks of 16 bytes per row; tokens past m and columns past k
// zero-filled (nothing is read).
template <class C, typename T>
__device__ __forceinline__ void load_x_tile(uint32_t dst, const T* __restrict__ x, int64_t ldx,
                                            int m0, int m, int k, int kbase, int tid) {
  constexpr int kXChunksPerRow = C::BK / 8;
#pragma unroll
  for (int c = tid; c < C::BM * kXChunksPerRow; c += C::kThreads) {
    const int row = c / kXChunksPerRow;
    const int col = c % kXChunksPerRow;
    const int kx = kbase + col * 8;
    const bool valid = (m0 + row < m) && (kx < k);
    const T* src = valid ? x + static_cast<int64_t>(m0 + row) * ldx + kx : x;
    gemm::cp_async_16(dst + row * C::kXPitch + col * 16, src, valid);
  }
}

// cp.async of the metadata tile: BN rows x BK/8 bytes = BK/64 chunks of 8 bytes per row.
// Weight rows past n are clamped to row n - 1, not zero-filled: a zero metadata byte is an
// invalid code for mma.sp, and those rows' outputs are never stored.
template <class C>
__device__ __forceinline__ void load_meta_tile(uint32_t dst, const uint8_t* __restrict__ meta,
                                               int64_t meta_k, int n0, int n, int kbase,
                                               int tid) {
  constexpr int kMetaChunksPerRow = C::BK / 64;
#pragma unroll
  for (int c = tid; c < C::BN * kMetaChunksPerRow; c += C::kThreads) {
    const int row = c / kMetaChunksPerRow;
    const int col = c % kMetaChunksPerRow;
    const int64_t kb = kbase / 8 + col * 8;  // metadata byte column
    const int wrow = min(n0 + row, n - 1);
    const bool valid = kb < meta_k;
    const uint8_t* src = valid ? meta + static_cast<int64_t>(wrow) * meta_k + kb : meta;
    gemm::cp_async_8(dst + row * C::kMetaPitch + col * 8, src, valid);
  }
}

// The metadata register e of one m16n8k32 mma.sp: `mrow` points at this lane's 16-bit word
// of row g of the 16-row tile (word lane & 1 of the k32 slice, see sparse24_mm.cu's header);
// bits 0-15 are row g's four group codes, bits 16-31 row g+8's. The stored format's words go
// to the tensor cores as they are, no bit shuffling.
template <class C>
__device__ __forceinline__ uint32_t meta_register(const unsigned char* mrow) {
  const uint32_t lo = *reinterpret_cast<const uint16_t*>(mrow);
  const uint32_t hi = *reinterpret_cast<const uint16_t*>(mrow + 8 * C::kMetaPitch);
  return lo | (hi << 16);
}

// Epilogue. The fp32 accumulators (rows weight rows n, columns tokens m: c0,c1 = (row g, cols
// 2t, 2t+1), c2,c3 = (row g+8, same cols)) go through shared memory ([kWarpsK][BM][kRedPitch],
// reusing the drained pipeline buffers), so the kWarpsK split-K partials are summed there in
// warp order, and written out with coalesced stores along n (out row-major [m, n]), adding the
// fp32 bias and rounding once to H::T.
template <class C, class H>
__device__ __forceinline__ void store_output(const float (&acc)[C::MI][C::NI][4],
                                             unsigned char* smem, int tid, int lane, int warp_n,
                                             int warp_m, int warp_k, int m0, int n0, int m,
                                             int n, const float* __restrict__ bias,
                                             typename H::T* __restrict__ out) {
  // Drain the (empty) trailing groups and make sure no warp still reads a stage before the
  // buffers are reused for the fp32 tile.
  gemm::cp_async_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(smem);  // [kWarpsK][BM][kRedPitch], indexed [m][n]
  const int g = lane / 4;
  const int t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int nn = warp_n * C::WN + mi * 16 + g;
      const int mm = warp_m * C::WM + ni * 8 + 2 * t;
      float* base = red + (warp_k * C::BM + mm) * C::kRedPitch + nn;
      base[0] = acc[mi][ni][0];                 // (n, m)
      base[C::kRedPitch] = acc[mi][ni][1];      // (n, m + 1)
      base[8] = acc[mi][ni][2];                 // (n + 8, m)
      base[C::kRedPitch + 8] = acc[mi][ni][3];  // (n + 8, m + 1)
    }
  }
  __syncthreads();
  // Consecutive threads take consecutive n: coalesced stores along out's rows.
  for (int idx = tid; idx < C::BM * C::BN; idx += C::kThreads) {
    const int mm = idx / C::BN;
    const int nn = idx % C::BN;
    const int gm = m0 + mm;
    const int gn = n0 + nn;
    if (gm >= m || gn >= n) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < C::kWarpsK; ++w) v += red[(w * C::BM + mm) * C::kRedPitch + nn];
    if (bias != nullptr) v += bias[gn];
    out[static_cast<int64_t>(gm) * n + gn] = H::from_float(v);
  }
}

// Opts the kernel into C::kSmemBytes of dynamic shared memory (once per device: `opted_in` is
// the caller's static, one per kernel instantiation) and launches it on the grid (N tiles,
// M tiles). Every 2:4 config is above 48 KB, and the opt-in is made whatever the size.
template <class C, typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, gemm::PerDeviceFlags& opted_in, int64_t m, int64_t n,
                   cudaStream_t stream, Args... args) {
  const cudaError_t err = gemm::allow_dynamic_smem(kernel, C::kSmemBytes, opted_in);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>((n + C::BN - 1) / C::BN),
                  static_cast<unsigned>((m + C::BM - 1) / C::BM));
  kernel<<<grid, C::kThreads, C::kSmemBytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace leanops::sparse24
