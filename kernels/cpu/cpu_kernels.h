// leanops' CPU kernels: plain C++ on raw pointers, no torch headers (so these translation units
// compile in seconds). kernels/cpu/bindings.cpp checks arguments, allocates, splits the work over
// threads (at::parallel_for) and calls them; leanops.dispatch reaches those bindings as the "cpu"
// backend.
//
// Two implementations of every kernel, chosen at run time (active_isa()):
//   generic   portable C++ written so the compiler vectorises it (x86-64 baseline, aarch64, ...);
//             on Linux x86-64 with GCC its hot loops are also cloned for AVX2 (target_clones)
//   avx512    hand-written AVX-512 (F, BW, DQ, VL) + VNNI intrinsics (Cascade Lake, Ice Lake,
//             Sapphire Rapids, Zen 4 and later), compiled with a target pragma into the same
//             library and only called when cpuid says the CPU has all of them
//
// Numerics (the PyTorch references in leanops/ops/ are the definition):
//   - the int8 paths are exact: int32 dot products (reduced in int64), then the reference's fp32
//     epilogue in its order, (acc * a_scale) * b_scale + bias, one rounding per operation (built
//     with -ffp-contract=off so no multiply-add is fused), rounded once to the output dtype;
//   - quantize_rows is bit-exact with leanops.quant.int8.quantize_per_token_int8 (IEEE division,
//     round half to even);
//   - the weight-only paths dequantise exactly as the reference does (int4: (q - z) * s rounded to
//     the scales' dtype, then to x's dtype; 2:4: the values placed by the metadata rule, rounded
//     to x's dtype) and accumulate x * W in fp32 chains of at most 32 products, added into
//     fp32 or fp64 totals: only the order (and length of chains) of that sum differs from the
//     reference's BLAS call, an error as small as BLAS's or smaller.
#pragma once

#include <cstdint>

namespace leanops::cpu {

enum class Dtype : int8_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline int dtype_bytes(Dtype d) { return d == Dtype::kFloat32 ? 4 : 2; }

enum class Isa : int8_t { kGeneric = 0, kAvx512 = 1 };

// "generic" / "avx512".
const char* isa_name(Isa isa);
// The best implementation this CPU can run (cpuid), and the one in use (the best, unless forced
// by set_isa: tests run both paths on one machine).
Isa detected_isa();
Isa active_isa();
// Force an implementation; false (and no change) if this CPU cannot run it.
bool set_isa(Isa isa);

// A weight-only matmul's weight in its stored layout (see leanops.quant.int4 and
// leanops.sparsity.format); the kernels read it as it is, nothing is repacked.
enum class Format : int8_t { kInt8, kInt4, kSparse24, kSparse24Int4 };

struct Weight {
  Format format;
  int64_t n;                 // rows (out_features)
  int64_t k;                 // dense columns (in_features)
  const void* data;          // kInt8: int8 [N, K]; kInt4: uint8 [N, K/2]; kSparse24: values
                             // [N, K/2]; kSparse24Int4: uint8 [N, K/4] (int4 codes of the values)
  Dtype data_dtype;          // kSparse24: the values' dtype
  const uint8_t* meta;       // sparse formats: uint8 [N, K/8]
  const void* scales;        // int4 formats: [N, K/group_size]
  Dtype scales_dtype;
  const uint8_t* zeros;      // int4 formats: uint8 [N, K/group_size], or null (symmetric: 8)
  int64_t group_size;        // int4 formats, in dense input columns
  Dtype x_dtype;             // the dense weight is rounded to x's dtype (the references' .to())
};

// Where a matmul's fp32 results go: out[m, n] = round_to_dtype(acc * col_scale[n] + bias[n]),
// col_scale and bias optional (a null pointer skips the operation, as the references do).
struct Output {
  void* data;                // [M, N] row stride ld, elements of dtype
  Dtype dtype;
  int64_t ld;
  const float* col_scale;    // [N] or null
  const float* bias;         // [N] or null
};

// Rows of x the register-blocked weight-only GEMV (avx512::weight_gemv) takes in one pass, and
// the generic dense_gemm's row block.
constexpr int64_t kGemvMaxRows = 4;

namespace generic {

// acc[m0..m1) x [n0..n1) (row stride ldacc, column n at n - n0) -> out, see Output.
void store_rows(const float* acc, int64_t ldacc, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                const Output& out);

// Rows [n0, n1) of the dense weight in fp32, exactly as the reference dequantises it (kInt8:
// the int8 codes, unscaled: the reference scales after the matmul); dst [n1 - n0, K].
void dequantize_rows(const Weight& w, int64_t n0, int64_t n1, float* dst);
// Columns [k0, k1) of row n (k0 a multiple of 8, and for the int4 formats [k0, k1) inside one
// group): the AVX-512 kernels' tails.
void dequantize_columns(const Weight& w, int64_t n, int64_t k0, int64_t k1, float* dst);

// acc[i, n] = sum_k x[i, k] * wt[n, k] for i < m, n < rows: wt a dequantised block of rows of the
// weight (fp32 [rows, k], contiguous), x fp32 [m, k] (row stride ldx). The matmul of machines
// without AVX-512: fp32 products in chains of at most 16 per lane, fp64 totals (as accurate as
// BLAS or more, where one fp32 chain over all of K is not).
void dense_gemm(const float* wt, int64_t rows, int64_t k, const float* x, int64_t ldx, int64_t m,
                float* acc, int64_t ldacc);

// Dynamic per-row int8 quantisation, bit-exact with leanops.quant.int8.quantize_per_token_int8:
// for rows [m0, m1) of x (dtype xdt, row stride ldx, K columns), times smooth [K] (fp32, or
// null): scale[m] = max(amax / 127, FLT_MIN) (NaN if the row holds NaN/Inf), codes
// round_half_even(x / scale) clamped to [-127, 127] (0 in a non-finite row). Writes the codes
// to q (int8, row stride ldq) if not null, and code + 128 to q_u8 (row stride ldu) if not null
// (the unsigned operand of the u8 x s8 dot products).
void quantize_rows(const void* x, Dtype xdt, int64_t ldx, const float* smooth, int64_t k,
                   int64_t m0, int64_t m1, int8_t* q, int64_t ldq, uint8_t* q_u8, int64_t ldu,
                   float* scale);

// W8A8: out[m, n] = ((float(sum_k a[m, k] * b[n, k]) * a_scale[m]) * b_scale[n]) + bias[n] for
// m in [m0, m1), n in [n0, n1). a is given as a_u8 = a + 128 (row stride lda), b int8 [N, K]
// contiguous; out.col_scale must be b_scale. Exact integer sums (int64), any K.
void int8_gemm(const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k, const float* a_scale,
               int64_t m0, int64_t m1, int64_t n0, int64_t n1, const Output& out);

}  // namespace generic

namespace avx512 {

// Whether this library was compiled with the AVX-512 kernels (x86-64 GCC/Clang builds).
bool compiled();

// acc[i, n - n0] = sum_k x[i, k] * W[n, k] for i < m <= kGemvMaxRows, n in [n0, n1); x fp32
// [m, K] (row stride ldx). The weight is dequantised in registers (int4
// through a 16-entry table per group and vpermps, 2:4 by a masked permute of the kept values)
// and multiplied with all m rows, so each weight byte is read once per call.
void weight_gemv(const Weight& w, const float* x, int64_t ldx, int64_t m, int64_t n0, int64_t n1,
                 float* acc, int64_t ldacc);
// The same for any m (meant for m > kGemvMaxRows): rows of the weight dequantised once per
// block of 256 columns into an L1 buffer and multiplied by a register-blocked FMA kernel with
// every row of x (in panels of 64), like a BLAS GEMM whose W operand is decoded on the fly.
void weight_gemm(const Weight& w, const float* x, int64_t ldx, int64_t m, int64_t n0, int64_t n1,
                 float* acc, int64_t ldacc);
void quantize_rows(const void* x, Dtype xdt, int64_t ldx, const float* smooth, int64_t k,
                   int64_t m0, int64_t m1, int8_t* q, int64_t ldq, uint8_t* q_u8, int64_t ldu,
                   float* scale);
// As generic::int8_gemm, on VNNI (vpdpbusd: u8 x s8, four products per int32 lane): 4x4 tiles
// of (row of a, row of b) dot products; sum_k b[n, k] (for the +128 offset) by vpdpbusd of ones.
void int8_gemm(const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k, const float* a_scale,
               int64_t m0, int64_t m1, int64_t n0, int64_t n1, const Output& out);

}  // namespace avx512

// fp32 -> the nearest value of dtype (round half to even; NaN stays NaN), as torch converts.
float round_to(float v, Dtype dtype);
float load_as_float(const void* p, Dtype dtype, int64_t i);

}  // namespace leanops::cpu
