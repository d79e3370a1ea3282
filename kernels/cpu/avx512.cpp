// The AVX-512 CPU kernels (see cpu_kernels.h for what each computes and how exactly). Compiled
// into every x86-64 build with a target pragma rather than -mavx512f, so the rest of the library
// stays runnable on any x86-64 CPU; leanops::cpu::active_isa() only selects them where cpuid
// reports AVX-512 F, BW, DQ, VL and VNNI. Everything here is in this file's own namespace: no
// inline function compiled for AVX-512 can be shared with (and picked by the linker for) code
// that runs on older CPUs.

#include <cstdint>

#include "cpu_kernels.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LEANOPS_AVX512_BUILD 1
#include <immintrin.h>
#endif

namespace leanops::cpu::avx512 {

#ifndef LEANOPS_AVX512_BUILD

bool compiled() { return false; }
void weight_gemv(const Weight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void weight_gemm(const Weight&, const float*, int64_t, int64_t, int64_t, int64_t, float*, int64_t) {}
void quantize_rows(const void*, Dtype, int64_t, const float*, int64_t, int64_t, int64_t, int8_t*,
                   int64_t, uint8_t*, int64_t, float*) {}
void int8_gemm(const uint8_t*, int64_t, const int8_t*, int64_t, const float*, int64_t, int64_t,
               int64_t, int64_t, const Output&) {}

#else

bool compiled() { return true; }

// For one 2:4 metadata byte (two groups, 8 dense columns, 4 kept values): for each column, the
// kept value it takes (bytes of `select`, 0..3) and whether it takes one (bits of `keep`), by
// leanops.sparsity.format's rule: value 0 at i0, value 1 at i1 unless i1 == i0, zero elsewhere.
// Built at compile time (constexpr): no code of this file runs before the ISA check.
struct MetaTables {
  uint64_t select[256] = {};
  uint8_t keep[256] = {};
  constexpr MetaTables() {
    for (int byte = 0; byte < 256; ++byte) {
      for (int half = 0; half < 2; ++half) {
        const int code = (byte >> (4 * half)) & 15, i0 = code & 3, i1 = code >> 2;
        for (int p = 0; p < 4; ++p) {
          const int col = 4 * half + p;
          const int value = p == i0 ? 2 * half : p == i1 ? 2 * half + 1 : -1;
          if (value >= 0) {
            select[byte] |= static_cast<uint64_t>(value) << (8 * col);
            keep[byte] = static_cast<uint8_t>(keep[byte] | (1u << col));
          }
        }
      }
    }
  }
};

constexpr MetaTables kMeta{};


#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own _mm512_undefined_* values
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")
#endif

namespace {

// Register tiles are arrays of vectors indexed by template constants: fully unrolled loops keep
// them in registers (GCC 12 otherwise keeps a 24-vector tile on the stack).
#if defined(__clang__)
#define LEANOPS_UNROLL _Pragma("unroll")
#else
#define LEANOPS_UNROLL _Pragma("GCC unroll 32")
#endif

// ------------------------------------------------------------------------------ conversions

inline __m512 from_bf16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 elements of dtype at p (element offset i) as fp32; `mask` selects the lanes read (others 0).
inline __m512 load16(const void* p, Dtype dtype, int64_t i, __mmask16 mask = 0xFFFF) {
  switch (dtype) {
    case Dtype::kFloat16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
    case Dtype::kBFloat16:
      return from_bf16(_mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + i));
    default:
      return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + i);
  }
}

// fp32 -> the nearest bfloat16 (half to even), as c10::BFloat16 rounds; NaN -> 0x7FC0.
inline __m512 round_bf16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000)));
}

inline __m512 round_to(__m512 v, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:  // F16C conversion: IEEE round half to even, as c10::Half
      return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    case Dtype::kBFloat16:
      return round_bf16(v);
    default:
      return v;
  }
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : static_cast<__mmask16>((1u << (count > 0 ? count : 0)) - 1);
}

// ------------------------------------------------------------------- int4: one table per group

// The 16 dense values of codes 0..15 of group `group` of row n: (c - z) * s rounded to the
// scales' dtype, then to x's dtype (leanops.quant.int4's definition); vpermps looks codes up.
inline __m512 int4_table(const Weight& w, int64_t n, int64_t group) {
  const int64_t at = n * (w.k / w.group_size) + group;
  const float s = load_as_float(w.scales, w.scales_dtype, at);
  const float z = static_cast<float>(w.zeros ? w.zeros[at] : 8);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 v = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
  const __m512 in_scales_dtype = round_to(v, w.scales_dtype);
  // a second rounding to x's dtype changes nothing when it is the same or fp32
  return w.x_dtype == w.scales_dtype ? in_scales_dtype : round_to(in_scales_dtype, w.x_dtype);
}

// 32 codes (16 bytes, low nibble first) -> 32 dense values in column order.
inline void int4_decode32(const uint8_t* p, __m512 table, __m512& w0, __m512& w1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, nib);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table);
  w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), table);
}

// 16 codes (8 bytes, low nibble first) -> 16 values in stored order (2:4 + int4 kept values).
inline __m512 int4_decode16(const uint8_t* p, __m512 table) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i nib = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, nib);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), table);
}

// ------------------------------------------------------- 2:4: placing kept values by metadata



// 16 kept values (8 groups) and their 4 metadata bytes -> the 32 dense columns.
inline void sparse_place(__m512 kept, const uint8_t* meta, __m512& w0, __m512& w1) {
  const uint8_t b0 = meta[0], b1 = meta[1], b2 = meta[2], b3 = meta[3];
  const __m128i i01 = _mm_set_epi64x(
      static_cast<long long>(kMeta.select[b1] + 0x0404040404040404ull),
      static_cast<long long>(kMeta.select[b0]));
  const __m128i i23 = _mm_set_epi64x(
      static_cast<long long>(kMeta.select[b3] + 0x0C0C0C0C0C0C0C0Cull),
      static_cast<long long>(kMeta.select[b2] + 0x0808080808080808ull));
  const __mmask16 k01 = static_cast<__mmask16>(kMeta.keep[b0] | (kMeta.keep[b1] << 8));
  const __mmask16 k23 = static_cast<__mmask16>(kMeta.keep[b2] | (kMeta.keep[b3] << 8));
  w0 = _mm512_maskz_permutexvar_ps(k01, _mm512_cvtepu8_epi32(i01), kept);
  w1 = _mm512_maskz_permutexvar_ps(k23, _mm512_cvtepu8_epi32(i23), kept);
}

// ------------------------------------------- row readers: 32 dense columns of NR rows at a time
//
// start(kb) is called once per 32-column block (in increasing order, from any multiple of 32)
// before load(r, kb, ...) for each row r, so the int4 readers rebuild their per-row tables only
// where a group begins (group sizes are multiples of 32: a block never straddles two groups).

template <int NR>
struct Int8Rows {
  const int8_t* row[NR];
  Int8Rows(const Weight& w, int64_t n) {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) row[r] = static_cast<const int8_t*>(w.data) + (n + r) * w.k;
  }
  void start(int64_t) {}
  void load(int r, int64_t kb, __m512& w0, __m512& w1) const {
    const __m128i* p = reinterpret_cast<const __m128i*>(row[r] + kb);
    w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p)));
    w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p + 1)));
  }
};

// The per-row int4 tables of NR rows from row n, rebuilt where a group begins: the int4 readers'
// start().
template <int NR>
struct GroupTables {
  const Weight& w;
  int64_t n;
  __m512 table[NR];
  int64_t next_group = 0;
  GroupTables(const Weight& w_, int64_t n_) : w(w_), n(n_) {}
  void start(int64_t kb) {
    if (kb >= next_group) {  // the first block read (any column), or a new group
      const int64_t group = kb / w.group_size;
      LEANOPS_UNROLL
      for (int r = 0; r < NR; ++r) table[r] = int4_table(w, n + r, group);
      next_group = (group + 1) * w.group_size;
    }
  }
};

template <int NR>
struct Int4Rows : GroupTables<NR> {
  const uint8_t* row[NR];
  Int4Rows(const Weight& w, int64_t n) : GroupTables<NR>(w, n) {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) row[r] = static_cast<const uint8_t*>(w.data) + (n + r) * (w.k / 2);
  }
  void load(int r, int64_t kb, __m512& w0, __m512& w1) const {
    int4_decode32(row[r] + kb / 2, this->table[r], w0, w1);
  }
};

// The GEMV's int4 reader: the 32 values of a block in "even/odd" order (columns kb, kb+2, ...,
// kb+30, then kb+1, ..., kb+31), which x is permuted to once per call (see gemv_format). One
// zero-extension gives 16 bytes in 16 lanes; vpermps reads only the low 4 bits of an index, so
// the low nibbles need no mask and the high ones one shift: 3 shuffle-port instructions per 32
// weights instead of 6 for column order.
template <int NR>
struct Int4EvenOddRows : Int4Rows<NR> {
  using Int4Rows<NR>::Int4Rows;
  static constexpr bool kEvenOdd = true;
  void load(int r, int64_t kb, __m512& w0, __m512& w1) const {
    const __m512i b = _mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(this->row[r] + kb / 2)));
    w0 = _mm512_permutexvar_ps(b, this->table[r]);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), this->table[r]);
  }
};

template <int NR>
struct Sparse24Rows {
  const Weight& w;
  const char* values[NR];
  const uint8_t* meta[NR];
  bool round;  // values in another dtype than x: rounded to x's (the reference's .to(x.dtype))
  Sparse24Rows(const Weight& w_, int64_t n) : w(w_) {
    const int64_t bytes = dtype_bytes(w.data_dtype);
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) {
      values[r] = static_cast<const char*>(w.data) + (n + r) * (w.k / 2) * bytes;
      meta[r] = w.meta + (n + r) * (w.k / 8);
    }
    round = w.data_dtype != w.x_dtype && w.x_dtype != Dtype::kFloat32;
  }
  void start(int64_t) {}
  void load(int r, int64_t kb, __m512& w0, __m512& w1) const {
    __m512 kept = load16(values[r], w.data_dtype, kb / 2);
    if (round) kept = round_to(kept, w.x_dtype);
    sparse_place(kept, meta[r] + kb / 8, w0, w1);
  }
};

template <int NR>
struct Sparse24Int4Rows : GroupTables<NR> {
  const uint8_t* codes[NR];
  const uint8_t* meta[NR];
  Sparse24Int4Rows(const Weight& w, int64_t n) : GroupTables<NR>(w, n) {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) {
      codes[r] = static_cast<const uint8_t*>(w.data) + (n + r) * (w.k / 4);
      meta[r] = w.meta + (n + r) * (w.k / 8);
    }
  }
  void load(int r, int64_t kb, __m512& w0, __m512& w1) const {
    sparse_place(int4_decode16(codes[r] + kb / 4, this->table[r]), meta[r] + kb / 8, w0, w1);
  }
};

// ------------------------------------------------------------------------------ weight GEMV

// acc[i * ldacc + r] = sum_k x[i, k] * W[n + r, k] for i < MR, r < NR.
template <template <int> class Rows, int MR, int NR>
void gemv_tile(const Weight& w, const float* x, int64_t ldx, int64_t n, float* acc,
               int64_t ldacc) {
  Rows<NR> rows(w, n);
  // fp32 chains of at most 16 products per lane (8 blocks), added into running totals: a
  // chain over all of K would be several times less accurate than BLAS
  __m512 a[NR][MR], total[NR][MR];
  LEANOPS_UNROLL
  for (int r = 0; r < NR; ++r) {
    LEANOPS_UNROLL
    for (int i = 0; i < MR; ++i) a[r][i] = total[r][i] = _mm512_setzero_ps();
  }
  const int64_t full = w.k & ~int64_t{31};
  for (int64_t kb = 0; kb < full; kb += 32) {
    if (kb % 256 == 0 && kb > 0) {
      LEANOPS_UNROLL
      for (int r = 0; r < NR; ++r) {
        LEANOPS_UNROLL
        for (int i = 0; i < MR; ++i) {
          total[r][i] = _mm512_add_ps(total[r][i], a[r][i]);
          a[r][i] = _mm512_setzero_ps();
        }
      }
    }
    rows.start(kb);
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) {
      __m512 w0, w1;
      rows.load(r, kb, w0, w1);
      LEANOPS_UNROLL
      for (int i = 0; i < MR; ++i) {
        a[r][i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * ldx + kb), a[r][i]);
        a[r][i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * ldx + kb + 16), a[r][i]);
      }
    }
  }
  if (full < w.k) {  // int8 and 2:4 weights whose K is not a multiple of 32
    const int64_t rest = w.k - full;
    const __mmask16 m0 = first_lanes(rest), m1 = first_lanes(rest - 16);
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) {
      alignas(64) float tail[32] = {};
      generic::dequantize_columns(w, n + r, full, w.k, tail);
      const __m512 w0 = _mm512_load_ps(tail), w1 = _mm512_load_ps(tail + 16);
      LEANOPS_UNROLL
      for (int i = 0; i < MR; ++i) {
        a[r][i] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + i * ldx + full), a[r][i]);
        a[r][i] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x + i * ldx + full + 16), a[r][i]);
      }
    }
  }
  LEANOPS_UNROLL
  for (int r = 0; r < NR; ++r) {
    LEANOPS_UNROLL
    for (int i = 0; i < MR; ++i) {
      acc[i * ldacc + r] = _mm512_reduce_add_ps(_mm512_add_ps(total[r][i], a[r][i]));
    }
  }
}

template <template <int> class Rows, int MR>
void gemv_rows(const Weight& w, const float* x, int64_t ldx, int64_t n0, int64_t n1, float* acc,
               int64_t ldacc) {
  constexpr int kNR = 4;
  int64_t n = n0;
  for (; n + kNR <= n1; n += kNR) gemv_tile<Rows, MR, kNR>(w, x, ldx, n, acc + (n - n0), ldacc);
  for (; n < n1; ++n) gemv_tile<Rows, MR, 1>(w, x, ldx, n, acc + (n - n0), ldacc);
}

template <class Reader, class = void>
struct is_even_odd {
  static constexpr bool value = false;
};
template <class Reader>
struct is_even_odd<Reader, decltype(void(Reader::kEvenOdd))> {
  static constexpr bool value = Reader::kEvenOdd;
};

template <template <int> class Rows>
void gemv_format(const Weight& w, const float* x, int64_t ldx, int64_t m, int64_t n0, int64_t n1,
                 float* acc, int64_t ldacc) {
  float* permuted = nullptr;
  if constexpr (is_even_odd<Rows<1>>::value) {
    // x in the reader's order: per block of 32 columns the even ones, then the odd ones
    permuted = new float[m * w.k];
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t kb = 0; kb < w.k; kb += 32) {
        for (int j = 0; j < 16; ++j) {
          permuted[i * w.k + kb + j] = x[i * ldx + kb + 2 * j];
          permuted[i * w.k + kb + 16 + j] = x[i * ldx + kb + 2 * j + 1];
        }
      }
    }
    x = permuted;
    ldx = w.k;
  }
  switch (m) {
    case 1: gemv_rows<Rows, 1>(w, x, ldx, n0, n1, acc, ldacc); break;
    case 2: gemv_rows<Rows, 2>(w, x, ldx, n0, n1, acc, ldacc); break;
    case 3: gemv_rows<Rows, 3>(w, x, ldx, n0, n1, acc, ldacc); break;
    default: gemv_rows<Rows, 4>(w, x, ldx, n0, n1, acc, ldacc); break;
  }
  delete[] permuted;
}

// Rows [n0, n1) x columns [k0, k1) of the dense weight into dst (row stride ld); k0 a multiple
// of 32.
template <template <int> class Rows>
void dequantize_block(const Weight& w, int64_t n0, int64_t n1, int64_t k0, int64_t k1, float* dst,
                      int64_t ld) {
  const int64_t full = k0 + ((k1 - k0) & ~int64_t{31});
  for (int64_t n = n0; n < n1; ++n) {
    Rows<1> rows(w, n);
    float* out = dst + (n - n0) * ld - k0;
    for (int64_t kb = k0; kb < full; kb += 32) {
      rows.start(kb);
      __m512 w0, w1;
      rows.load(0, kb, w0, w1);
      _mm512_storeu_ps(out + kb, w0);
      _mm512_storeu_ps(out + kb + 16, w1);
    }
    if (full < k1) generic::dequantize_columns(w, n, full, k1, out + full);
  }
}

// ------------------------------------------------------------- weight GEMM (M > kGemvMaxRows)
//
// out^T = W x^T, blocked like a BLAS GEMM with W as the broadcast operand: per block of kGemmKc
// columns, R rows of W are dequantised once into an L1-resident buffer (each weight element is
// dequantised once per panel of up to 64 rows of x) and a register tile of R rows x 16V rows of
// x accumulates R x V vectors: per column, V loads of x^T, R broadcasts of W, R x V FMAs (24 of
// them: 12 cycles of the two FMA ports). x^T (columns x rows of x, padded to 16V) is packed once
// per panel; the accumulators live in c [rows of W][16V] between column blocks.

constexpr int64_t kGemmKc = 256;
constexpr int64_t kGemmPanel = 64;  // rows of x per panel: V = 4 vectors at most
constexpr int64_t kGemmXtBytes = 1 << 20;  // x^T of a panel stays in L2: fewer rows for long K

// fp32 sums of at most kGemmChain products, added into fp32 totals in c: two short chains
// instead of one over all of K (which measured several times less accurate than MKL; these are
// as accurate or better, at the cost of one load/add/store per accumulator per 32 columns).
constexpr int64_t kGemmChain = 32;

template <int R, int V>
void gemm_micro(const float* wt, const float* xt, int64_t kc, float* c) {
  constexpr int64_t mp = 16 * V;
  for (int64_t k0 = 0; k0 < kc; k0 += kGemmChain) {
    const int64_t k1 = k0 + kGemmChain < kc ? k0 + kGemmChain : kc;
    __m512 acc[R][V];
    LEANOPS_UNROLL
    for (int r = 0; r < R; ++r) {
      LEANOPS_UNROLL
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    for (int64_t k = k0; k < k1; ++k) {
      __m512 xv[V];
      LEANOPS_UNROLL
      for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xt + k * mp + 16 * v);
      LEANOPS_UNROLL
      for (int r = 0; r < R; ++r) {
        const __m512 b = _mm512_set1_ps(wt[r * kGemmKc + k]);
        LEANOPS_UNROLL
        for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(b, xv[v], acc[r][v]);
      }
    }
    LEANOPS_UNROLL
    for (int r = 0; r < R; ++r) {
      LEANOPS_UNROLL
      for (int v = 0; v < V; ++v) {
        float* t = c + r * mp + 16 * v;
        _mm512_storeu_ps(t, _mm512_add_ps(_mm512_loadu_ps(t), acc[r][v]));
      }
    }
  }
}

// c[n - n0][i] = sum_k W[n, k] * xt[k][i] for n in [n0, n1), i < 16V; c has n1 - n0 rows
// rounded up to R.
template <template <int> class Rows, int V>
void gemm_panel(const Weight& w, const float* xt, int64_t n0, int64_t n1, float* c) {
  constexpr int R = 24 / V;
  constexpr int64_t mp = 16 * V;
  alignas(64) float wt[R * kGemmKc];
  // rows outermost: each row of W is read front to back once (sequential, prefetched), and x^T
  // (at most 1 MB, see gemm_format) is re-read from L2 for every R rows
  for (int64_t r0 = n0; r0 < n1; r0 += R) {
    const int64_t rows = n1 - r0 < R ? n1 - r0 : R;
    for (int64_t k0 = 0; k0 < w.k; k0 += kGemmKc) {
      const int64_t kc = w.k - k0 < kGemmKc ? w.k - k0 : kGemmKc;
      dequantize_block<Rows>(w, r0, r0 + rows, k0, k0 + kc, wt, kGemmKc);
      for (int64_t r = rows; r < R; ++r) {  // past the last row: zeros, results unused
        for (int64_t j = 0; j < kc; ++j) wt[r * kGemmKc + j] = 0.0f;
      }
      gemm_micro<R, V>(wt, xt + k0 * mp, kc, c + (r0 - n0) * mp);
    }
  }
}

template <template <int> class Rows>
void gemm_format(const Weight& w, const float* x, int64_t ldx, int64_t m, int64_t n0, int64_t n1,
                 float* acc, int64_t ldacc) {
  const int64_t k = w.k, width = n1 - n0;
  int64_t panel = kGemmXtBytes / (4 * k) / 16 * 16;
  panel = panel < 16 ? 16 : panel > kGemmPanel ? kGemmPanel : panel;
  float* xt = new float[k * panel];
  float* c = new float[(width + 24) * panel];
  for (int64_t m0 = 0; m0 < m; m0 += panel) {
    const int64_t rows = m - m0 < panel ? m - m0 : panel;
    const int v = static_cast<int>((rows + 15) / 16);
    const int64_t mp = 16 * v;
    for (int64_t kk = 0; kk < k; ++kk) {
      float* dst = xt + kk * mp;
      for (int64_t i = 0; i < rows; ++i) dst[i] = x[(m0 + i) * ldx + kk];
      for (int64_t i = rows; i < mp; ++i) dst[i] = 0.0f;
    }
    for (int64_t j = 0; j < (width + 24) * mp; ++j) c[j] = 0.0f;
    switch (v) {
      case 1: gemm_panel<Rows, 1>(w, xt, n0, n1, c); break;
      case 2: gemm_panel<Rows, 2>(w, xt, n0, n1, c); break;
      case 3: gemm_panel<Rows, 3>(w, xt, n0, n1, c); break;
      default: gemm_panel<Rows, 4>(w, xt, n0, n1, c); break;
    }
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < width; ++j) acc[(m0 + i) * ldacc + j] = c[j * mp + i];
    }
  }
  delete[] c;
  delete[] xt;
}

// ---------------------------------------------------------------------------------- int8

// acc += u8 x s8 dot products of 4 bytes per int32 lane (vpdpbusd), accumulating in place.
// Written as asm: GCC 12 copies the accumulator around every _mm512_dpbusd_epi32 in a register-
// blocked loop (two extra vector moves per instruction, half the throughput).
inline void dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
}

inline __mmask64 first_bytes(int64_t count) {
  return count >= 64 ? ~__mmask64{0} : ((__mmask64{1} << count) - 1);
}

// Columns are summed in chunks of 65536: a 16-lane int32 total of u8 x s8 products then stays
// below 255 * 127 * 65536 < 2^31, so chunk totals are exact in int32 and are added up in int64.
constexpr int64_t kInt8Chunk = 65536;

// [sum of the lanes of a, of b, of c, of d] in one transposing reduction (13 instructions for
// four vectors instead of ~9 each).
inline __m128i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd =
      _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// Adds the lane totals of acc[0..NR) to out[0..NR) (int64).
template <int NR>
inline void add_totals(const __m512i* acc, int64_t* out) {
  alignas(16) int32_t t[4];
  if constexpr (NR == 4) {
    _mm_store_si128(reinterpret_cast<__m128i*>(t), sum4(acc[0], acc[1], acc[2], acc[3]));
    LEANOPS_UNROLL
    for (int r = 0; r < 4; ++r) out[r] += t[r];
  } else {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) out[r] += _mm512_reduce_add_epi32(acc[r]);
  }
}

// dot[i][r] = sum_k a_u8[i, k] * b[r, k] (exact, int64) for i < MR, r < NR; with kSum also
// bsum[r] = sum_k b[r, k] (by vpdpbusd with all-ones bytes, in the same pass over b: at M = 1
// every byte of the weight is then read once).
template <int MR, int NR, bool kSum>
void int8_tile(const uint8_t* a, int64_t lda, const int8_t* b, int64_t k, int64_t dot[MR][NR],
               int64_t* bsum) {
  LEANOPS_UNROLL
  for (int i = 0; i < MR; ++i) {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) dot[i][r] = 0;
  }
  if constexpr (kSum) {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) bsum[r] = 0;
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t c0 = 0; c0 < k; c0 += kInt8Chunk) {
    const int64_t c1 = c0 + kInt8Chunk < k ? c0 + kInt8Chunk : k;
    __m512i acc[MR][NR];
    __m512i sacc[NR];
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) {
      sacc[r] = _mm512_setzero_si512();
      LEANOPS_UNROLL
      for (int i = 0; i < MR; ++i) acc[i][r] = _mm512_setzero_si512();
    }
    // the steady loop and the masked tail are written out twice: as one lambda, GCC 12 kept
    // the whole accumulator tile on the stack
    int64_t kb = c0;
    for (; kb + 64 <= c1; kb += 64) {
      __m512i bv[NR];
      LEANOPS_UNROLL
      for (int r = 0; r < NR; ++r) bv[r] = _mm512_loadu_si512(b + r * k + kb);
      LEANOPS_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m512i av = _mm512_loadu_si512(a + i * lda + kb);
        LEANOPS_UNROLL
        for (int r = 0; r < NR; ++r) dpbusd(acc[i][r], av, bv[r]);
      }
      if constexpr (kSum) {
        LEANOPS_UNROLL
        for (int r = 0; r < NR; ++r) dpbusd(sacc[r], ones, bv[r]);
      }
    }
    if (kb < c1) {  // masked-out bytes are 0 in both operands: they add nothing
      const __mmask64 mask = first_bytes(c1 - kb);
      __m512i bv[NR];
      LEANOPS_UNROLL
      for (int r = 0; r < NR; ++r) bv[r] = _mm512_maskz_loadu_epi8(mask, b + r * k + kb);
      LEANOPS_UNROLL
      for (int i = 0; i < MR; ++i) {
        const __m512i av = _mm512_maskz_loadu_epi8(mask, a + i * lda + kb);
        LEANOPS_UNROLL
        for (int r = 0; r < NR; ++r) dpbusd(acc[i][r], av, bv[r]);
      }
      if constexpr (kSum) {
        LEANOPS_UNROLL
        for (int r = 0; r < NR; ++r) dpbusd(sacc[r], ones, bv[r]);
      }
    }
    LEANOPS_UNROLL
    for (int i = 0; i < MR; ++i) add_totals<NR>(acc[i], dot[i]);
    if constexpr (kSum) add_totals<NR>(sacc, bsum);
  }
}

constexpr int kInt8MR = 4, kInt8NR = 4;
constexpr int64_t kInt8Block = 64;  // rows of b per block: 64 x K bytes stay in L2

// One MR x NR tile of the output block, as fp32 float(exact dot) * a_scale into `tile`.
template <int MR, int NR, bool kSum>
void int8_block_tile(const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k,
                     const float* a_scale, int64_t* bsum, int64_t m, int64_t n, float* tile,
                     int64_t ldt) {
  int64_t dot[MR][NR];
  int8_tile<MR, NR, kSum>(a_u8 + m * lda, lda, b + n * k, k, dot, bsum);
  LEANOPS_UNROLL
  for (int i = 0; i < MR; ++i) {
    LEANOPS_UNROLL
    for (int r = 0; r < NR; ++r) {
      // a = a_u8 - 128, so sum a * b = sum a_u8 * b - 128 * sum b
      const int64_t exact = dot[i][r] - 128 * bsum[r];
      tile[i * ldt + r] = static_cast<float>(exact) * a_scale[m + i];
    }
  }
}

// Rows [m, m + MR) x columns [nb0, nb1) of the output; kSum: the first rows of a block, which
// also compute bsum for the rest.
template <int MR, bool kSum>
void int8_block_row(const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k,
                    const float* a_scale, int64_t* bsum, int64_t m, int64_t nb0, int64_t nb1,
                    float* tile, int64_t ldt) {
  int64_t n = nb0;
  for (; n + kInt8NR <= nb1; n += kInt8NR) {
    int8_block_tile<MR, kInt8NR, kSum>(a_u8, lda, b, k, a_scale, bsum + (n - nb0), m, n,
                                       tile + (n - nb0), ldt);
  }
  for (; n < nb1; ++n) {
    int8_block_tile<MR, 1, kSum>(a_u8, lda, b, k, a_scale, bsum + (n - nb0), m, n,
                                 tile + (n - nb0), ldt);
  }
}

template <bool kSum>
void int8_rows(int64_t rows, const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k,
               const float* a_scale, int64_t* bsum, int64_t m, int64_t nb0, int64_t nb1,
               float* tile) {
  switch (rows) {
    case 1: return int8_block_row<1, kSum>(a_u8, lda, b, k, a_scale, bsum, m, nb0, nb1, tile, kInt8Block);
    case 2: return int8_block_row<2, kSum>(a_u8, lda, b, k, a_scale, bsum, m, nb0, nb1, tile, kInt8Block);
    case 3: return int8_block_row<3, kSum>(a_u8, lda, b, k, a_scale, bsum, m, nb0, nb1, tile, kInt8Block);
    default: return int8_block_row<4, kSum>(a_u8, lda, b, k, a_scale, bsum, m, nb0, nb1, tile, kInt8Block);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ entry points

void weight_gemm(const Weight& w, const float* x, int64_t ldx, int64_t m, int64_t n0, int64_t n1,
                 float* acc, int64_t ldacc) {
  switch (w.format) {
    case Format::kInt8: return gemm_format<Int8Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
    case Format::kInt4: return gemm_format<Int4Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
    case Format::kSparse24: return gemm_format<Sparse24Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
    case Format::kSparse24Int4:
      return gemm_format<Sparse24Int4Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
  }
}

void weight_gemv(const Weight& w, const float* x, int64_t ldx, int64_t m, int64_t n0, int64_t n1,
                 float* acc, int64_t ldacc) {
  switch (w.format) {
    case Format::kInt8: return gemv_format<Int8Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
    case Format::kInt4: return gemv_format<Int4EvenOddRows>(w, x, ldx, m, n0, n1, acc, ldacc);
    case Format::kSparse24: return gemv_format<Sparse24Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
    case Format::kSparse24Int4:
      return gemv_format<Sparse24Int4Rows>(w, x, ldx, m, n0, n1, acc, ldacc);
  }
}

void quantize_rows(const void* x, Dtype xdt, int64_t ldx, const float* smooth, int64_t k,
                   int64_t m0, int64_t m1, int8_t* q, int64_t ldq, uint8_t* q_u8, int64_t ldu,
                   float* scale) {
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * ldx;
    auto load = [&](int64_t j, __mmask16 mask) {
      __m512 v = load16(x, xdt, base + j, mask);
      if (smooth) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, smooth + j));
      return v;
    };
    __m512 amax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t j = 0; j < k; j += 16) {
      const __m512 v = load(j, first_lanes(k - j));
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
      bad |= _mm512_fpclass_ps_mask(v, 0x99);  // QNaN | +Inf | -Inf | SNaN
    }
    if (bad) {  // the reference: scale NaN, codes 0
      scale[m] = __builtin_nanf("");
      for (int64_t j = 0; j < k; ++j) {
        if (q) q[m * ldq + j] = 0;
        if (q_u8) q_u8[m * ldu + j] = 128;
      }
      continue;
    }
    // IEEE division by 127 (leanops.quant.common.div_exact), clamped to the smallest normal
    float s = _mm512_reduce_max_ps(amax) / 127.0f;
    s = s < 1.17549435e-38f ? 1.17549435e-38f : s;
    scale[m] = s;
    const __m512 sv = _mm512_set1_ps(s);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t j = 0; j < k; j += 16) {
      const __mmask16 mask = first_lanes(k - j);
      const __m512 d = _mm512_div_ps(load(j, mask), sv);  // IEEE, as the reference divides
      __m512i c = _mm512_cvt_roundps_epi32(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      c = _mm512_min_epi32(_mm512_max_epi32(c, lo), hi);
      if (q) _mm_mask_storeu_epi8(q + m * ldq + j, mask, _mm512_cvtepi32_epi8(c));
      if (q_u8) {
        const __m512i u = _mm512_add_epi32(c, _mm512_set1_epi32(128));
        _mm_mask_storeu_epi8(q_u8 + m * ldu + j, mask, _mm512_cvtepi32_epi8(u));
      }
    }
  }
}

void int8_gemm(const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k, const float* a_scale,
               int64_t m0, int64_t m1, int64_t n0, int64_t n1, const Output& out) {
  alignas(64) float tile[kInt8MR * kInt8Block];
  int64_t bsum[kInt8Block];
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kInt8Block) {
    const int64_t nb1 = nb0 + kInt8Block < n1 ? nb0 + kInt8Block : n1;
    for (int64_t m = m0; m < m1; m += kInt8MR) {
      const int64_t rows = m1 - m < kInt8MR ? m1 - m : kInt8MR;
      if (m == m0) {
        int8_rows<true>(rows, a_u8, lda, b, k, a_scale, bsum, m, nb0, nb1, tile);
      } else {
        int8_rows<false>(rows, a_u8, lda, b, k, a_scale, bsum, m, nb0, nb1, tile);
      }
      generic::store_rows(tile, kInt8Block, m, m + rows, nb0, nb1, out);
    }
  }
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // LEANOPS_AVX512_BUILD

}  // namespace leanops::cpu::avx512
