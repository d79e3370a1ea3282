// Dynamic per-token (per-row) int8 quantisation: the activation side of the W8A8 linear layer.
//
// Arithmetic, bit-exact with leanops.quant.int8.quantize_per_token_int8 (which defines it):
//   xs    = fp32(x) * fp32(smooth)               one IEEE multiply (__fmul_rn: never fused)
//   amax  = max |xs| over the row
//   scale = max(amax / 127, FLT_MIN)             IEEE division (__fdiv_rn)
//   q     = clamp(rint(xs / scale), -127, 127)   IEEE division, round half to even
//   a row holding a NaN or an Inf (in xs)        scale = NaN, q = 0
// setup.py passes no --use_fast_math, and the explicit _rn intrinsics keep this exact even if
// someone adds it: a reciprocal-multiply (or flushing denormals) differs from the reference in
// the last bit of some scales and hence of some codes.
//
// Performance: the op is memory bound (M*K*(in_bytes + 1) + 4*M bytes). A group of
// kThreadsPerRow threads owns a row (several rows per block when rows are short, so blocks stay
// big enough). Each thread first issues up to kItems loads of one pack each (16 bytes: 8 halves
// or 4 floats) into registers and only then reduces, so several loads are in flight per thread;
// a row of up to kThreadsPerRow * kItems packs is read from memory exactly once. Longer rows are
// walked in chunks of that size: the amax pass reads every chunk, the quantise pass reuses the
// last chunk from registers and re-reads the others, which the amax pass has just pulled into
// L2. The 16-byte path needs 16-byte aligned rows and K a multiple of the pack; anything else
// runs the same code with one element per pack (still coalesced, more instructions).
//
// No torch header here on purpose (see quantize_per_token.h): the binding is
// kernels/quantize_per_token.cpp.

#include "quantize_per_token.h"

#include <cfloat>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace leanops {
namespace {

constexpr float kQMax = 127.0f;

// kVec elements of T held as raw 32-bit words. Keeping 16-bit values two to a register (rather
// than an array of __half / __nv_bfloat16, which nvcc unpacks one value per register) halves
// the registers the cached row needs; they are widened to fp32 only when used.
template <typename T, int kVec>
struct Pack {
  static_assert(kVec == 1 || kVec * sizeof(T) == 16, "a pack is one element or 16 bytes");
  static constexpr int kWords = kVec == 1 ? 1 : 4;
  uint32_t w[kWords];

  // Element j as fp32; exact for every input (bf16 is the top half of an fp32).
  __device__ __forceinline__ float get(int j) const {
    if constexpr (sizeof(T) == 4) {
      return __uint_as_float(w[j]);
    } else {
      const uint32_t word = w[j / 2];
      const uint32_t bits = j % 2 ? word >> 16 : word & 0xffffu;  // little-endian: j even is low
      if constexpr (std::is_same_v<T, __half>) {
        return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
      } else {
        return __uint_as_float(bits << 16);
      }
    }
  }
};

// Pack p of a row: one 16-byte load (the caller guarantees 16-byte alignment) or one element.
template <typename T, int kVec>
__device__ __forceinline__ Pack<T, kVec> load_pack(const T* __restrict__ row, int p) {
  Pack<T, kVec> out;
  if constexpr (kVec == 1) {
    if constexpr (sizeof(T) == 2) {
      out.w[0] = reinterpret_cast<const uint16_t*>(row)[p];
    } else {
      out.w[0] = reinterpret_cast<const uint32_t*>(row)[p];
    }
  } else {
    const uint4 v = reinterpret_cast<const uint4*>(row)[p];
    out.w[0] = v.x;
    out.w[1] = v.y;
    out.w[2] = v.z;
    out.w[3] = v.w;
  }
  return out;
}

// fp32(x) * fp32(smooth) for pack p. Without smooth the factor is 1.0f: x * 1 is exact for every
// fp32 value (NaN stays NaN, subnormals stay: no fast-math, no FTZ), so both cases share one
// code path instead of doubling the unrolled code. smooth is 16-byte aligned whenever kVec > 1,
// so 8 factors are two 16-byte loads (smooth is K floats shared by every row: they hit L1/L2).
template <typename T, int kVec>
__device__ __forceinline__ void scaled(const Pack<T, kVec>& x, const float* __restrict__ smooth,
                                       int p, float (&xs)[kVec]) {
  float s[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) s[j] = 1.0f;
  if (smooth != nullptr) {
    if constexpr (kVec == 1) {
      s[0] = smooth[p];
    } else {
#pragma unroll
      for (int j = 0; j < kVec; j += 4) {
        const float4 f = reinterpret_cast<const float4*>(smooth + p * kVec + j)[0];
        s[j] = f.x;
        s[j + 1] = f.y;
        s[j + 2] = f.z;
        s[j + 3] = f.w;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kVec; ++j) xs[j] = __fmul_rn(x.get(j), s[j]);
}

// |v|, with NaN mapped to +Inf: fmaxf drops NaN operands, so without this a NaN would vanish
// from the row max. After the reduction "amax is not finite" <=> "the row holds a NaN or Inf".
__device__ __forceinline__ float magnitude(float v) {
  const float a = fabsf(v);
  return a <= FLT_MAX ? a : __int_as_float(0x7f800000);
}

__device__ __forceinline__ uint32_t quantize(float xs, float scale, bool finite) {
  if (!finite) return 0;
  // scale = fl(amax / 127) can round down, so |xs / scale| may exceed 127 by an ulp or so: the
  // clamp catches that (as in the reference). It must not see a NaN (fminf/fmaxf would turn NaN
  // into a bound), hence the early return for non-finite rows.
  const float r = fminf(fmaxf(rintf(__fdiv_rn(xs, scale)), -kQMax), kQMax);
  return static_cast<uint8_t>(static_cast<int8_t>(__float2int_rn(r)));
}

// Max over the kThreadsPerRow threads of a row: xor-shuffles inside a warp (or inside the
// aligned group of kThreadsPerRow < 32 lanes), then one shared-memory round between warps.
// Every thread of the block must call it (it may __syncthreads).
template <int kThreadsPerRow>
__device__ __forceinline__ float row_max(float v, float* smem) {
  constexpr int kLanes = kThreadsPerRow < 32 ? kThreadsPerRow : 32;
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  if constexpr (kThreadsPerRow > 32) {
    constexpr int kWarps = kThreadsPerRow / 32;
    float* row_smem = smem + (threadIdx.x / kThreadsPerRow) * kWarps;
    if (threadIdx.x % 32 == 0) row_smem[(threadIdx.x % kThreadsPerRow) / 32] = v;
    __syncthreads();
    v = row_smem[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) v = fmaxf(v, row_smem[w]);
  }
  return v;
}

template <typename T, int kVec, int kItems, int kThreadsPerRow>
__device__ __forceinline__ void load_chunk(Pack<T, kVec> (&cache)[kItems],
                                           const T* __restrict__ xrow, int base, int npacks,
                                           int lane) {
  // All loads of the chunk are issued before any is used: memory-level parallelism.
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int p = base + i * kThreadsPerRow + lane;
    if (p < npacks) cache[i] = load_pack<T, kVec>(xrow, p);
  }
}

template <typename T, int kVec, int kItems, int kThreadsPerRow>
__device__ __forceinline__ void quantize_chunk(const Pack<T, kVec> (&cache)[kItems],
                                               const float* __restrict__ smooth,
                                               int8_t* __restrict__ qrow, int base, int npacks,
                                               int lane, float scale, bool finite) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int p = base + i * kThreadsPerRow + lane;
    if (p < npacks) {
      float xs[kVec];
      scaled(cache[i], smooth, p, xs);
      // kVec codes stored with one 8-, 4- or 1-byte store (q's row stride is K, a multiple of
      // kVec, and the allocation is aligned).
      if constexpr (kVec == 8) {
        uint2 out;
        out.x = quantize(xs[0], scale, finite) | quantize(xs[1], scale, finite) << 8 |
                quantize(xs[2], scale, finite) << 16 | quantize(xs[3], scale, finite) << 24;
        out.y = quantize(xs[4], scale, finite) | quantize(xs[5], scale, finite) << 8 |
                quantize(xs[6], scale, finite) << 16 | quantize(xs[7], scale, finite) << 24;
        reinterpret_cast<uint2*>(qrow)[p] = out;
      } else if constexpr (kVec == 4) {
        reinterpret_cast<uint32_t*>(qrow)[p] =
            quantize(xs[0], scale, finite) | quantize(xs[1], scale, finite) << 8 |
            quantize(xs[2], scale, finite) << 16 | quantize(xs[3], scale, finite) << 24;
      } else {
        qrow[p] = static_cast<int8_t>(quantize(xs[0], scale, finite));
      }
    }
  }
}

template <typename T, int kVec, int kItems, int kThreadsPerRow, int kBlock>
__global__ void __launch_bounds__(kBlock)
    quantize_per_token_int8_kernel(const T* __restrict__ x, const float* __restrict__ smooth,
                                   int8_t* __restrict__ q, float* __restrict__ scale, int64_t m,
                                   int k, int64_t x_row_stride) {
  static_assert(kBlock % kThreadsPerRow == 0, "a block holds whole rows");
  static_assert(kThreadsPerRow < 32 ? 32 % kThreadsPerRow == 0 : kThreadsPerRow % 32 == 0,
                "a row group is a power-of-two part of a warp or whole warps");
  constexpr int kRowsPerBlock = kBlock / kThreadsPerRow;
  constexpr int kChunk = kThreadsPerRow * kItems;  // packs held in registers per row
  __shared__ float smem[kThreadsPerRow > 32 ? kRowsPerBlock * (kThreadsPerRow / 32) : 1];

  const int lane = threadIdx.x % kThreadsPerRow;
  // int64: M * K can pass 2^31 elements.
  const int64_t row =
      static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const bool active = row < m;
  // Threads of rows past the end load nothing but still take part in the reduction.
  const int npacks = active ? k / kVec : 0;
  const T* xrow = x + (active ? row : 0) * x_row_stride;

  Pack<T, kVec> cache[kItems];
  float amax = 0.0f;
  int last = 0;  // first pack of the last chunk, the one left in `cache`
  for (int base = 0; base < npacks; base += kChunk) {
    last = base;
    load_chunk<T, kVec, kItems, kThreadsPerRow>(cache, xrow, base, npacks, lane);
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      const int p = base + i * kThreadsPerRow + lane;
      if (p < npacks) {
        float xs[kVec];
        scaled(cache[i], smooth, p, xs);
#pragma unroll
        for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, magnitude(xs[j]));
      }
    }
  }
  amax = row_max<kThreadsPerRow>(amax, smem);
  if (!active) return;

  const bool finite = amax <= FLT_MAX;
  const float s = finite ? fmaxf(__fdiv_rn(amax, kQMax), FLT_MIN)
                         : __int_as_float(0x7fc00000);  // the NaN torch writes for float('nan')
  if (lane == 0) scale[row] = s;

  int8_t* qrow = q + row * k;
  // Last chunk first, straight from registers; earlier chunks (long rows only) are re-read.
  for (int base = last; base >= 0; base -= kChunk) {
    if (base != last) load_chunk<T, kVec, kItems, kThreadsPerRow>(cache, xrow, base, npacks, lane);
    quantize_chunk<T, kVec, kItems, kThreadsPerRow>(cache, smooth, qrow, base, npacks, lane, s,
                                                    finite);
  }
}

template <typename T, int kVec, int kItems, int kThreadsPerRow, int kBlock>
cudaError_t launch(const T* x, const float* smooth, int8_t* q, float* scale, int64_t m, int k,
                   int64_t x_row_stride, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kBlock / kThreadsPerRow;
  const int64_t blocks = (m + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;  // gridDim.x limit
  quantize_per_token_int8_kernel<T, kVec, kItems, kThreadsPerRow, kBlock>
      <<<static_cast<unsigned>(blocks), kBlock, 0, stream>>>(x, smooth, q, scale, m, k,
                                                             x_row_stride);
  return cudaGetLastError();
}

// The smallest row group that holds the whole row in registers; rows longer than the largest
// group holds take the chunk loop. Four group sizes x {16-byte, scalar} x 3 dtypes = 24
// kernels, and only those (compile time).
template <typename T, int kVec, int kItems>
cudaError_t launch_for_row_length(const T* x, const float* smooth, int8_t* q, float* scale,
                                  int64_t m, int k, int64_t x_row_stride, cudaStream_t stream) {
  const int npacks = k / kVec;
  if (npacks <= 8 * kItems) {
    return launch<T, kVec, kItems, 8, 256>(x, smooth, q, scale, m, k, x_row_stride, stream);
  }
  if (npacks <= 32 * kItems) {
    return launch<T, kVec, kItems, 32, 256>(x, smooth, q, scale, m, k, x_row_stride, stream);
  }
  if (npacks <= 128 * kItems) {
    return launch<T, kVec, kItems, 128, 256>(x, smooth, q, scale, m, k, x_row_stride, stream);
  }
  return launch<T, kVec, kItems, 1024, 1024>(x, smooth, q, scale, m, k, x_row_stride, stream);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T>
cudaError_t launch_typed(const void* x_ptr, int64_t m, int64_t k, int64_t x_row_stride,
                         const float* smooth, int8_t* q, float* scale, cudaStream_t stream) {
  const T* x = static_cast<const T*>(x_ptr);
  constexpr int kVec = 16 / sizeof(T);
  // Every row start and every pack must be 16-byte aligned for x and smooth (q then is 8- or
  // 4-byte aligned: it is a fresh allocation with row stride k, a multiple of kVec).
  const bool vectorized = k % kVec == 0 && aligned16(x) && (m == 1 || x_row_stride % kVec == 0) &&
                          (smooth == nullptr || aligned16(smooth));
  const int k32 = static_cast<int>(k);
  if (vectorized) {
    // 4 packs of 16 bytes per thread: 16 registers of row, 64 bytes in flight per thread (far
    // more than the ~20 KB per SM that saturates HBM), rows up to 1024 * 4 packs (32768 halves,
    // 16384 floats) in one read.
    return launch_for_row_length<T, kVec, 4>(x, smooth, q, scale, m, k32, x_row_stride, stream);
  }
  // One element per pack: 8 of them per thread (rows up to 8192 elements in one read).
  return launch_for_row_length<T, 1, 8>(x, smooth, q, scale, m, k32, x_row_stride, stream);
}

}  // namespace

cudaError_t launch_quantize_per_token_int8(const void* x, FloatType x_type, int64_t m, int64_t k,
                                           int64_t x_row_stride, const float* smooth, int8_t* q,
                                           float* scale, cudaStream_t stream) {
  // Column indices are int inside the kernel; 2^30 leaves room for the chunk arithmetic.
  if (m < 1 || k < 1 || k > (int64_t{1} << 30) || x_row_stride < 0) return cudaErrorInvalidValue;
  switch (x_type) {
    case FloatType::kFloat16:
      return launch_typed<__half>(x, m, k, x_row_stride, smooth, q, scale, stream);
    case FloatType::kBFloat16:
      return launch_typed<__nv_bfloat16>(x, m, k, x_row_stride, smooth, q, scale, stream);
    case FloatType::kFloat32:
      return launch_typed<float>(x, m, k, x_row_stride, smooth, q, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace leanops
