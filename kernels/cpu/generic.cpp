// The portable CPU kernels (see cpu_kernels.h): plain C++ loops shaped so the compiler
// vectorises them, the path of every CPU without AVX-512 (and what tests compare the AVX-512
// kernels with, besides the PyTorch references). On Linux x86-64 with GCC the hot loops are
// also compiled for AVX2+FMA+F16C (Haswell and later) and picked at load time (target_clones).

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu_kernels.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define LEANOPS_HOT __attribute__((target_clones("arch=haswell", "default")))
#else
#define LEANOPS_HOT
#endif

namespace leanops::cpu {

// ------------------------------------------------------------------------------ the ISA switch

namespace {

Isa cpu_best() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (avx512::compiled() && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
    return Isa::kAvx512;
  }
#endif
  return Isa::kGeneric;
}

Isa g_active = detected_isa();  // cpuid once (detected_isa keeps it)

}  // namespace

const char* isa_name(Isa isa) { return isa == Isa::kAvx512 ? "avx512" : "generic"; }

Isa detected_isa() {
  static const Isa best = cpu_best();
  return best;
}

Isa active_isa() { return g_active; }

bool set_isa(Isa isa) {
  if (isa == Isa::kAvx512 && detected_isa() != Isa::kAvx512) return false;
  g_active = isa;
  return true;
}

// ------------------------------------------------------------------------------- scalar rules

float round_to(float v, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16:
      return static_cast<float>(c10::Half(v));
    case Dtype::kBFloat16:
      return static_cast<float>(c10::BFloat16(v));  // round half to even, NaN stays NaN
    default:
      return v;
  }
}

float load_as_float(const void* p, Dtype dtype, int64_t i) {
  switch (dtype) {
    case Dtype::kFloat16:
      return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    case Dtype::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    default:
      return static_cast<const float*>(p)[i];
  }
}

namespace {

constexpr int kSymmetricZero = 8;

// The 16 dense values of an int4 group (codes 0..15): (q - z) * s in the scales' dtype (one
// rounding: q - z and s are exact there), then converted to x's dtype.
void int4_table(const Weight& w, int64_t n, int64_t group, float* table) {
  const int64_t groups = w.k / w.group_size;
  const float s = load_as_float(w.scales, w.scales_dtype, n * groups + group);
  const int z = w.zeros ? w.zeros[n * groups + group] : kSymmetricZero;
  for (int c = 0; c < 16; ++c) {
    table[c] = round_to(round_to(static_cast<float>(c - z) * s, w.scales_dtype), w.x_dtype);
  }
}

// The in-group positions of a 2:4 group code: value 0 at i0, value 1 at i1 unless i1 == i0 (an
// invalid code: leanops.sparsity.format's total rule keeps only value 0).
inline void place_group(uint8_t code, float v0, float v1, float* dst) {
  const int i0 = code & 3, i1 = code >> 2;
  dst[0] = dst[1] = dst[2] = dst[3] = 0.0f;
  dst[i1] = v1;
  dst[i0] = v0;
}

// Dense columns [k0, k1) of row n into dst (k0, k1 multiples of 32 for the int4 formats, of 8
// for the 2:4 ones; within one group for the int4 formats).
void dequantize_segment(const Weight& w, int64_t n, int64_t k0, int64_t k1, float* dst) {
  const int64_t len = k1 - k0;
  switch (w.format) {
    case Format::kInt8: {
      const int8_t* src = static_cast<const int8_t*>(w.data) + n * w.k + k0;
      for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<float>(src[j]);
      return;
    }
    case Format::kInt4: {
      float table[16];
      int4_table(w, n, k0 / w.group_size, table);
      const uint8_t* src = static_cast<const uint8_t*>(w.data) + n * (w.k / 2) + k0 / 2;
      for (int64_t j = 0; j < len / 2; ++j) {
        dst[2 * j] = table[src[j] & 15];
        dst[2 * j + 1] = table[src[j] >> 4];
      }
      return;
    }
    case Format::kSparse24: {
      const int64_t half = w.k / 2;
      const char* values = static_cast<const char*>(w.data);
      const uint8_t* meta = w.meta + n * (w.k / 8) + k0 / 8;
      for (int64_t g = 0; g < len / 4; ++g) {
        const int64_t kept = n * half + k0 / 2 + 2 * g;
        const float v0 = round_to(load_as_float(values, w.data_dtype, kept), w.x_dtype);
        const float v1 = round_to(load_as_float(values, w.data_dtype, kept + 1), w.x_dtype);
        place_group((meta[g / 2] >> (4 * (g & 1))) & 15, v0, v1, dst + 4 * g);
      }
      return;
    }
    case Format::kSparse24Int4: {
      // the kept values are int4 with group_size / 2 kept values per group of group_size columns
      float table[16];
      int4_table(w, n, k0 / w.group_size, table);
      const uint8_t* codes = static_cast<const uint8_t*>(w.data) + n * (w.k / 4) + k0 / 4;
      const uint8_t* meta = w.meta + n * (w.k / 8) + k0 / 8;
      for (int64_t g = 0; g < len / 4; ++g) {
        const uint8_t byte = codes[g];  // kept values 2g (low nibble) and 2g + 1 (high)
        place_group((meta[g / 2] >> (4 * (g & 1))) & 15, table[byte & 15], table[byte >> 4],
                    dst + 4 * g);
      }
      return;
    }
  }
}

// The segment length the row loops use: 256 columns, or the largest power-of-two multiple of 32
// dividing the group size (int4 segments never straddle groups).
int64_t segment_length(const Weight& w) {
  if (w.format == Format::kInt4 || w.format == Format::kSparse24Int4) {
    int64_t seg = 256;
    while (w.group_size % seg != 0) seg /= 2;
    return seg;
  }
  return 256;
}

}  // namespace

// ------------------------------------------------------------------------------ the kernels

namespace generic {

LEANOPS_HOT
void store_rows(const float* acc, int64_t ldacc, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                const Output& out) {
  const int64_t width = n1 - n0;
  float row[256];
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t j0 = 0; j0 < width; j0 += 256) {
      const int64_t len = std::min<int64_t>(256, width - j0);
      const float* a = acc + (m - m0) * ldacc + j0;
      const int64_t n = n0 + j0;
      // the references' order: (acc * scale) + bias, each rounded to fp32
      for (int64_t j = 0; j < len; ++j) row[j] = a[j];
      if (out.col_scale) {
        for (int64_t j = 0; j < len; ++j) row[j] = row[j] * out.col_scale[n + j];
      }
      if (out.bias) {
        for (int64_t j = 0; j < len; ++j) row[j] = row[j] + out.bias[n + j];
      }
      switch (out.dtype) {
        case Dtype::kFloat32: {
          float* o = static_cast<float*>(out.data) + m * out.ld + n;
          std::memcpy(o, row, len * sizeof(float));
          break;
        }
        case Dtype::kBFloat16: {
          c10::BFloat16* o = static_cast<c10::BFloat16*>(out.data) + m * out.ld + n;
          for (int64_t j = 0; j < len; ++j) o[j] = c10::BFloat16(row[j]);
          break;
        }
        case Dtype::kFloat16: {
          c10::Half* o = static_cast<c10::Half*>(out.data) + m * out.ld + n;
          for (int64_t j = 0; j < len; ++j) o[j] = c10::Half(row[j]);
          break;
        }
      }
    }
  }
}

void dequantize_columns(const Weight& w, int64_t n, int64_t k0, int64_t k1, float* dst) {
  dequantize_segment(w, n, k0, k1, dst);
}

LEANOPS_HOT
void dequantize_rows(const Weight& w, int64_t n0, int64_t n1, float* dst) {
  const int64_t seg = segment_length(w);
  for (int64_t n = n0; n < n1; ++n) {
    float* row = dst + (n - n0) * w.k;
    for (int64_t k0 = 0; k0 < w.k; k0 += seg) {
      dequantize_segment(w, n, k0, std::min(k0 + seg, w.k), row + k0);
    }
  }
}

LEANOPS_HOT
void dense_gemm(const float* wt, int64_t rows, int64_t k, const float* x, int64_t ldx, int64_t m,
                float* acc, int64_t ldacc) {
  for (int64_t i0 = 0; i0 < m; i0 += kGemvMaxRows) {
    const int64_t mr = std::min(kGemvMaxRows, m - i0);
    for (int64_t n = 0; n < rows; ++n) {
      const float* wn = wt + n * k;
      double total[kGemvMaxRows] = {};
      for (int64_t k0 = 0; k0 < k; k0 += 256) {
        const int64_t len = std::min<int64_t>(256, k - k0), full = len & ~int64_t{15};
        // 16 lanes of at most 16 fp32 terms per row of x (the compiler maps the lanes onto
        // vector registers), then fp64 totals: no long fp32 chains
        float part[kGemvMaxRows][16] = {};
        for (int64_t j = 0; j < full; j += 16) {
          for (int64_t i = 0; i < mr; ++i) {
            const float* xi = x + (i0 + i) * ldx + k0 + j;
            for (int l = 0; l < 16; ++l) part[i][l] += wn[k0 + j + l] * xi[l];
          }
        }
        for (int64_t i = 0; i < mr; ++i) {
          const float* xi = x + (i0 + i) * ldx + k0;
          for (int64_t j = full; j < len; ++j) part[i][j - full] += wn[k0 + j] * xi[j];
          double seg = 0.0;
          for (int l = 0; l < 16; ++l) seg += part[i][l];
          total[i] += seg;
        }
      }
      for (int64_t i = 0; i < mr; ++i) acc[(i0 + i) * ldacc + n] = static_cast<float>(total[i]);
    }
  }
}

LEANOPS_HOT
void quantize_rows(const void* x, Dtype xdt, int64_t ldx, const float* smooth, int64_t k,
                   int64_t m0, int64_t m1, int8_t* q, int64_t ldq, uint8_t* q_u8, int64_t ldu,
                   float* scale) {
  float row[256];
  for (int64_t m = m0; m < m1; ++m) {
    const int64_t base = m * ldx;
    auto load = [&](int64_t j0, int64_t len) {
      for (int64_t j = 0; j < len; ++j) row[j] = load_as_float(x, xdt, base + j0 + j);
      if (smooth) {
        for (int64_t j = 0; j < len; ++j) row[j] = row[j] * smooth[j0 + j];
      }
    };
    float amax = 0.0f;
    bool finite = true;
    for (int64_t j0 = 0; j0 < k; j0 += 256) {
      const int64_t len = std::min<int64_t>(256, k - j0);
      load(j0, len);
      for (int64_t j = 0; j < len; ++j) {
        amax = std::max(amax, std::fabs(row[j]));
        finite = finite && std::isfinite(row[j]);
      }
    }
    // IEEE division by 127 (leanops.quant.common.div_exact), clamped to the smallest normal
    const float s = finite ? std::max(amax / 127.0f, FLT_MIN) : NAN;
    scale[m] = s;
    for (int64_t j0 = 0; j0 < k; j0 += 256) {
      const int64_t len = std::min<int64_t>(256, k - j0);
      int8_t codes[256];
      if (finite) {
        load(j0, len);
        for (int64_t j = 0; j < len; ++j) {
          const float c = std::nearbyint(row[j] / s);  // round half to even
          codes[j] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, c)));
        }
      } else {
        std::memset(codes, 0, sizeof(codes));
      }
      if (q) std::memcpy(q + m * ldq + j0, codes, len);
      if (q_u8) {
        for (int64_t j = 0; j < len; ++j) {
          q_u8[m * ldu + j0 + j] = static_cast<uint8_t>(codes[j] + 128);
        }
      }
    }
  }
}

LEANOPS_HOT
void int8_gemm(const uint8_t* a_u8, int64_t lda, const int8_t* b, int64_t k, const float* a_scale,
               int64_t m0, int64_t m1, int64_t n0, int64_t n1, const Output& out) {
  // int32 partial sums over chunks short enough never to overflow (127 * 127 * 65536 < 2^31),
  // added up in int64: exact for any K
  constexpr int64_t kChunk = 65536;
  float acc[256];
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* a = a_u8 + m * lda;
    for (int64_t j0 = n0; j0 < n1; j0 += 256) {
      const int64_t j1 = std::min(n1, j0 + 256);
      for (int64_t n = j0; n < j1; ++n) {
        const int8_t* bn = b + n * k;
        int64_t total = 0;
        for (int64_t c0 = 0; c0 < k; c0 += kChunk) {
          const int64_t c1 = std::min(k, c0 + kChunk);
          int32_t s = 0;
          for (int64_t i = c0; i < c1; ++i) {
            s += (static_cast<int32_t>(a[i]) - 128) * static_cast<int32_t>(bn[i]);
          }
          total += s;
        }
        acc[n - j0] = static_cast<float>(total) * a_scale[m];
      }
      store_rows(acc, 0, m, m + 1, j0, j1, out);
    }
  }
}

}  // namespace generic

}  // namespace leanops::cpu
