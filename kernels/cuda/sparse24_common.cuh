// What only the two 2:4 sparse GEMMs (sparse24_mm.cu, sparse24_int4_mm.cu) share: the tile
// shape and shared-memory plan, the cp.async loads of the x and metadata tiles, the metadata
// register of mma.sp, the shared-memory epilogue, and the kernel skeleton itself (run_gemm:
// warp roles, the cp.async pipeline, accumulators, epilogue). The two differ only in the weight
// operand (16-bit kept values read with ldmatrix vs int4 codes dequantised in registers): its
// shared row pitch is a parameter of the tile, and its load, per-k-tile registers and the mma
// loop over one stage are the operand class each kernel passes to run_gemm.
// The fragment layouts this code relies on are derived in sparse24_mm.cu's header.
// (Device building blocks of all the GEMMs are in gemm_common.cuh.)
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "gemm_common.cuh"

namespace leanops::sparse24 {

// Shared memory one SM holds for its resident blocks, on the arch this device pass compiles for
// (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"): 164 KB on
// sm_80, 100 KB on sm_86/sm_89, 228 KB on sm_90; the system reserves 1 KB more per block. The
// host pass (no __CUDA_ARCH__) never reads it: __launch_bounds__ is a device attribute.
constexpr int smem_per_sm_bytes() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return 228 * 1024;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 800
  return 164 * 1024;
#else
  return 100 * 1024;
#endif
}
constexpr int kSmemReservedPerBlock = 1024;

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
  static constexpr int kWantBlocks = MinBlocks_;  // CTAs per SM the config is designed for
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
  // __launch_bounds__' minimum CTAs per SM: the design's, capped at what this arch's shared
  // memory holds. Asking for 2 where only 1 fits (an ~88 KB config on sm_80's 164 KB or sm_89's
  // 100 KB) would cap registers at 128 per thread (and spill) for an occupancy never reached.
  static constexpr int kFitBlocks = smem_per_sm_bytes() / (kSmemBytes + kSmemReservedPerBlock);
  static constexpr int kMinBlocks = kWantBlocks < kFitBlocks ? kWantBlocks : kFitBlocks;
  static_assert(kFitBlocks >= 1, "one CTA must fit an SM's shared memory");

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

// cp.async of the weight operand's tile: BN rows of kChunksPerRow 16-byte chunks, chunk `col`
// of tile row `row` from byte column kbyte0 + 16 col of weight row n0 + row, which holds
// row_bytes bytes (chunks past it zero-filled: nothing is read). Weight rows past n are clamped
// to row n - 1, not zero-filled: their metadata must stay valid for mma.sp (load_meta_tile), and
// those rows' outputs are never stored.
template <class C, int kChunksPerRow>
__device__ __forceinline__ void load_weight_tile(uint32_t dst, int pitch,
                                                 const uint8_t* __restrict__ w,
                                                 int64_t row_bytes, int64_t kbyte0, int n0,
                                                 int n, int tid) {
#pragma unroll
  for (int c = tid; c < C::BN * kChunksPerRow; c += C::kThreads) {
    const int row = c / kChunksPerRow;
    const int col = c % kChunksPerRow;
    const int64_t kb = kbyte0 + col * 16;  // byte column
    const int wrow = min(n0 + row, n - 1);
    const bool valid = kb < row_bytes;
    const uint8_t* src = valid ? w + static_cast<int64_t>(wrow) * row_bytes + kb : w;
    gemm::cp_async_16(dst + row * pitch + col * 16, src, valid);
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

// The B (x) fragments of k32 slice `slice` of a landed stage, one ldmatrix.x4 per 8-token mma
// tile: xs is this lane's row address in the stage's x tile (run_gemm passes it to compute).
template <class C>
__device__ __forceinline__ void load_x_fragments(uint32_t (&bx)[C::NI][4], uint32_t xs,
                                                 int slice) {
#pragma unroll
  for (int ni = 0; ni < C::NI; ++ni) {
    gemm::ldmatrix_x4(bx[ni], xs + ni * 8 * C::kXPitch + slice * 32 * 2);
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

// This thread's place in the CTA. Warp roles: n fastest, then m, then k (the intra-CTA split-K
// index of the small configs).
template <class C>
struct Block {
  int tid, lane, warp_n, warp_m, warp_k, n0, m0;
  __device__ __forceinline__ Block()
      : tid(threadIdx.x),
        lane(tid % 32),
        warp_n((tid / 32) % C::kWarpsN),
        warp_m((tid / 32 / C::kWarpsN) % C::kWarpsM),
        warp_k(tid / 32 / (C::kWarpsN * C::kWarpsM)),
        n0(blockIdx.x * C::BN),
        m0(blockIdx.y * C::BM) {}
};

// The kernel body of both 2:4 GEMMs, over the weight operand `op`, which provides
//   State                          registers op needs per k-tile, loaded one k-tile ahead
//                                  (the int4 kernel's scales and zero points; empty otherwise)
//   load(dst, kbase, blk, n, k)    cp.async of the weight tile at input column kbase into the
//                                  stage at shared address dst (C::kABytes per stage)
//   prepare(tile, State&, blk, n, k)  fill State for k-tile `tile`
//   compute(tile, w_ptr, w_addr, xs, ms, State, acc, blk, k)
//                                  the mma.sp of one landed stage: its weight tile (generic
//                                  pointer and shared address), xs = this lane's ldmatrix row
//                                  of the x tile, ms = this lane's metadata word
// The operand holds only its own pointers and lane offsets; the problem size (n, k: kernel
// parameters) and the thread's place (blk) are passed to each call rather than copied into it,
// which keeps them out of registers where the compiler can re-read them (the large config sits
// at its 128-register cap on sm_90a).
// Pipeline: kStages - 1 k-tiles in flight, one barrier per k-tile; then the epilogue.
template <class C, class H, class Op>
__device__ __forceinline__ void run_gemm(const Op& op, const Block<C>& blk, unsigned char* smem,
                                         const typename H::T* __restrict__ x, int64_t ldx,
                                         const uint8_t* __restrict__ meta,
                                         const float* __restrict__ bias,
                                         typename H::T* __restrict__ out, int m, int n, int k) {
  const int64_t meta_k = k / 8;  // metadata bytes per weight row
  const int num_tiles = (k + C::BK - 1) / C::BK;
  const uint32_t smem_base = gemm::smem_addr(smem);
  auto w_stage = [&](int s) { return smem_base + s * C::kStageBytes; };
  auto x_stage = [&](int s) { return smem_base + s * C::kStageBytes + C::kABytes; };
  auto meta_stage = [&](int s) { return s * C::kStageBytes + C::kABytes + C::kXBytes; };

  // Issue the cp.async copies of k-tile `tile` into stage `s`.
  auto load_tile = [&](int tile, int s) {
    const int kbase = tile * C::BK;
    op.load(w_stage(s), kbase, blk, n, k);
    load_x_tile<C>(x_stage(s), x, ldx, blk.m0, m, k, kbase, blk.tid);
    load_meta_tile<C>(smem_base + meta_stage(s), meta, meta_k, blk.n0, n, kbase, blk.tid);
  };

  float acc[C::MI][C::NI][4];
#pragma unroll
  for (int i = 0; i < C::MI; ++i)
#pragma unroll
    for (int j = 0; j < C::NI; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;

  // Per-lane offsets (bytes), fixed for the whole kernel.
  //   B (x): ldmatrix block q = lane/8 is (tokens 0..7, columns 8q..8q+7).
  //   Metadata: row g of each 16-row tile (and g+8), 16-bit word (lane & 1) of the k32 slice.
  const uint32_t b_lane_off =
      (blk.warp_m * C::WM + blk.lane % 8) * C::kXPitch + (blk.lane / 8) * 8 * 2;
  const int meta_lane_off = (blk.warp_n * C::WN + blk.lane / 4) * C::kMetaPitch + (blk.lane & 1) * 2;

  // Prologue: fill kStages - 1 stages.
#pragma unroll
  for (int s = 0; s < C::kStages - 1; ++s) {
    if (s < num_tiles) load_tile(s, s);
    gemm::cp_async_commit();
  }
  // Two register sets, never indexed by a runtime value (that would put them in local memory).
  typename Op::State state, state_next;
  op.prepare(0, state, blk, n, k);

  for (int tile = 0; tile < num_tiles; ++tile) {
    // Tile `tile` has landed once at most kStages - 2 younger groups are pending; the barrier
    // also tells every warp that the stage read in the previous iteration is free again.
    gemm::cp_async_wait<C::kStages - 2>();
    __syncthreads();
    {
      const int next = tile + C::kStages - 1;
      if (next < num_tiles) load_tile(next, next % C::kStages);
      gemm::cp_async_commit();  // always, so the group count per iteration stays fixed
    }
    if (tile + 1 < num_tiles) op.prepare(tile + 1, state_next, blk, n, k);

    const int s = tile % C::kStages;
    op.compute(tile, smem + (w_stage(s) - smem_base), w_stage(s), x_stage(s) + b_lane_off,
               smem + meta_stage(s) + meta_lane_off, state, acc, blk, k);
    state = state_next;
  }

  store_output<C, H>(acc, smem, blk.tid, blk.lane, blk.warp_n, blk.warp_m, blk.warp_k, blk.m0,
                     blk.n0, m, n, bias, out);
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
