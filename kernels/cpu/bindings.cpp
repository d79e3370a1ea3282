// CPU bindings of the leanops_C ops (schemas in kernels/leanops_C.cpp): argument checks, output
// and scratch allocation, the split over threads (at::parallel_for), and the choice between
// leanops' kernels (cpu_kernels.h) and ATen's own where those pay. leanops.dispatch calls these
// as the "cpu" backend with exactly the public op's arguments; the checks are repeated here
// because torch.ops.leanops_C.* is callable directly and a bad pointer in a kernel is a crash.
//
// Also defines the namespace leanops_cpu: isa() / detected_isa() / set_isa(name), which
// implementation runs (tests run both on one machine, `leanops info` reports it), and
// threads_used(chunks), how many threads the kernels' split really runs on.
//
// Per call, nothing of the weight is repacked or copied: the kernels read the stored layouts
// (leanops.quant.int4, leanops.sparsity.format) as they are. Only activations are converted:
// x to fp32 for the weight-only matmuls (M x K, small next to the weight), x quantised to
// u8 codes for the W8A8 ones.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_kernels.h"

namespace {

using leanops::cpu::Dtype;
using leanops::cpu::Format;
using leanops::cpu::Isa;
using leanops::cpu::Output;
using leanops::cpu::Weight;
namespace kern = leanops::cpu;

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

Dtype dtype_of(at::ScalarType t) {
  return t == at::kHalf ? Dtype::kFloat16 : t == at::kBFloat16 ? Dtype::kBFloat16 : Dtype::kFloat32;
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor; got one on ",
                    t.device());
}

void check_x(const char* op, const at::Tensor& x) {
  check_cpu(op, "x", x);
  TORCH_CHECK_VALUE(x.dim() == 2 && is_float(x.scalar_type()), op,
                    ": x must be a float16, bfloat16 or float32 [M, K]; got ", x.scalar_type(),
                    " of shape ", x.sizes());
}

void check_matrix(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                  int64_t rows, int64_t cols, const char* what) {
  check_cpu(op, name, t);
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == rows &&
                        t.size(1) == cols && t.is_contiguous(),
                    op, ": ", name, " must be contiguous ", dtype, " ", what, " = [", rows, ", ",
                    cols, "]; got ", t.scalar_type(), " of shape ", t.sizes(),
                    t.is_contiguous() ? "" : " (not contiguous)");
}

// A float vector [size] (scales, bias, smooth) as fp32 contiguous: exact, as the references'
// .float().
at::Tensor fp32_vector(const char* op, const char* name, const at::Tensor& t, int64_t size) {
  check_cpu(op, name, t);
  TORCH_CHECK_VALUE(is_float(t.scalar_type()) && t.dim() == 1 && t.size(0) == size, op, ": ",
                    name, " must be a float [", size, "]; got ", t.scalar_type(), " of shape ",
                    t.sizes());
  return t.to(at::kFloat).contiguous();
}

std::optional<at::Tensor> fp32_vector(const char* op, const char* name,
                                      const std::optional<at::Tensor>& t, int64_t size) {
  if (!t.has_value()) return std::nullopt;
  return fp32_vector(op, name, *t, size);
}

const float* ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

// Rows per task so that a task has at least 2^20 multiply-adds (~50-100 us on one core). Waking
// and joining threads costs a few us on an idle machine but far more on a loaded one (a thread
// that lost its core holds up the join): a decode-size layer of a small model (512 x 512 at
// M = 1, 20 us) ran 4x slower on two busy cores than on one with a 64K grain.
int64_t grain_rows(int64_t work_per_row) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, work_per_row));
}

// ------------------------------------------------------------------------------ weight-only
//
// With AVX-512: M <= kGemvMaxRows (decode) by avx512::weight_gemv, the weight dequantised in
// registers and multiplied with every row of x in one pass (each weight byte read once per
// call); larger M (prefill, batches) by avx512::weight_gemm, rows of the weight dequantised once
// per block of columns into L1 and reused for up to 64 rows of x by a register-blocked FMA
// kernel. (MKL's sgemm, tried first on dequantised tiles, reached only 20-35% of the FMA peak
// on these skinny shapes, and its long fp32 chains were the less accurate.)
// Elsewhere: blocks of rows dequantised into a 512 KB fp32 buffer, then generic::dense_gemm.

constexpr int64_t kTileBytes = 512 * 1024;

at::Tensor weight_only_mm(const Weight& w, const at::Tensor& x_arg,
                          const std::optional<at::Tensor>& col_scale,
                          const std::optional<at::Tensor>& bias) {
  const int64_t m = x_arg.size(0), n = w.n, k = w.k;
  at::Tensor out = at::empty({m, n}, x_arg.options());
  if (m == 0 || n == 0) return out;
  // x in fp32 with unit column stride (exact for fp16 / bf16, as the references' x.float())
  at::Tensor x = x_arg.to(at::kFloat);
  if (x.stride(1) != 1) x = x.contiguous();
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const Output o{out.data_ptr(), w.x_dtype, n, ptr(col_scale), ptr(bias)};

  if (kern::active_isa() == Isa::kAvx512) {
    const bool gemv = m <= kern::kGemvMaxRows;
    // column ranges of at most 256 outputs per call bound the scratch to M x 256 floats
    at::parallel_for(0, n, std::max<int64_t>(24, grain_rows(k * m)), [&](int64_t c0, int64_t c1) {
      std::unique_ptr<float[]> acc(new float[m * std::min<int64_t>(256, c1 - c0)]);
      for (int64_t n0 = c0; n0 < c1; n0 += 256) {
        const int64_t n1 = std::min(c1, n0 + 256);
        if (gemv) {
          kern::avx512::weight_gemv(w, xp, ldx, m, n0, n1, acc.get(), n1 - n0);
        } else {
          kern::avx512::weight_gemm(w, xp, ldx, m, n0, n1, acc.get(), n1 - n0);
        }
        kern::generic::store_rows(acc.get(), n1 - n0, 0, m, n0, n1, o);
      }
    });
    return out;
  }

  const int64_t tile = std::clamp<int64_t>(kTileBytes / (4 * k), 4, 256);
  const int64_t tiles = (n + tile - 1) / tile;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::unique_ptr<float[]> dense(new float[tile * k]);
    std::unique_ptr<float[]> acc(new float[m * tile]);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * tile, n1 = std::min(n, n0 + tile), rows = n1 - n0;
      kern::generic::dequantize_rows(w, n0, n1, dense.get());
      kern::generic::dense_gemm(dense.get(), rows, k, xp, ldx, m, acc.get(), rows);
      kern::generic::store_rows(acc.get(), rows, 0, m, n0, n1, o);
    }
  });
  return out;
}

constexpr const char* kInt8WeightMm = "leanops_C::int8_weight_mm";

at::Tensor int8_weight_mm_cpu(const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  const char* op = kInt8WeightMm;
  check_x(op, x);
  const int64_t k = x.size(1);
  TORCH_CHECK_VALUE(w.dim() == 2, op, ": w must be int8 [N, K]; got shape ", w.sizes());
  const int64_t n = w.size(0);
  check_matrix(op, "w", w, at::kChar, n, k, "[N, K]");
  const auto scale = fp32_vector(op, "w_scale", w_scale, n);
  const auto b = fp32_vector(op, "bias", bias, n);
  const Weight wt{Format::kInt8, n, k, w.data_ptr(), Dtype::kFloat32, nullptr, nullptr,
                  Dtype::kFloat32, nullptr, 0, dtype_of(x.scalar_type())};
  return weight_only_mm(wt, x, scale, b);
}

// The int4 group arguments both int4 formats take: scales [N, G] float, zeros uint8 [N, G] or
// None, with G = K / group_size.
void check_groups(const char* op, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                  int64_t n, int64_t groups) {
  check_cpu(op, "scales", scales);
  TORCH_CHECK_VALUE(is_float(scales.scalar_type()), op,
                    ": scales must be float16, bfloat16 or float32; got ", scales.scalar_type());
  check_matrix(op, "scales", scales, scales.scalar_type(), n, groups, "[N, K/group_size]");
  if (zeros.has_value()) check_matrix(op, "zeros", *zeros, at::kByte, n, groups, "[N, K/group_size]");
}

at::Tensor int4_weight_mm_cpu(const at::Tensor& x, const at::Tensor& w_packed,
                              const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                              int64_t group_size, const std::optional<at::Tensor>& bias) {
  const char* op = "leanops_C::int4_weight_mm";
  check_x(op, x);
  const int64_t k = x.size(1);
  TORCH_CHECK_VALUE(w_packed.dim() == 2, op, ": w_packed must be uint8 [N, K/2]; got shape ",
                    w_packed.sizes());
  const int64_t n = w_packed.size(0);
  TORCH_CHECK_VALUE(k % 2 == 0, op, ": K must be even; got K = ", k);
  check_matrix(op, "w_packed", w_packed, at::kByte, n, k / 2, "[N, K/2]");
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 32 == 0 && k % group_size == 0, op,
                    ": group_size must be a positive multiple of 32 dividing K = ", k, "; got ",
                    group_size);
  check_groups(op, scales, zeros, n, k / group_size);
  const auto b = fp32_vector(op, "bias", bias, n);
  const Weight wt{Format::kInt4, n, k, w_packed.data_ptr(), Dtype::kFloat32, nullptr,
                  scales.data_ptr(), dtype_of(scales.scalar_type()),
                  zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, group_size,
                  dtype_of(x.scalar_type())};
  return weight_only_mm(wt, x, std::nullopt, b);
}

int64_t check_sparse(const char* op, const at::Tensor& x, const at::Tensor& values,
                     const at::Tensor& meta, int64_t values_per_row, const char* what,
                     at::ScalarType values_dtype) {
  check_x(op, x);
  const int64_t k = x.size(1);
  TORCH_CHECK_VALUE(k % 8 == 0, op, ": K must be a multiple of 8 (2:4 groups, two per metadata "
                    "byte); got K = ", k);
  TORCH_CHECK_VALUE(values.dim() == 2, op, ": values must be 2-D ", what, "; got shape ",
                    values.sizes());
  const int64_t n = values.size(0);
  check_matrix(op, "values", values, values_dtype, n, values_per_row, what);
  check_matrix(op, "meta", meta, at::kByte, n, k / 8, "[N, K/8]");
  return n;
}

at::Tensor sparse24_mm_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& meta,
                           const std::optional<at::Tensor>& bias) {
  const char* op = "leanops_C::sparse24_mm";
  check_cpu(op, "values", values);
  TORCH_CHECK_VALUE(is_float(values.scalar_type()), op,
                    ": values must be float16, bfloat16 or float32; got ", values.scalar_type());
  check_x(op, x);
  const int64_t k = x.size(1);
  const int64_t n = check_sparse(op, x, values, meta, k / 2, "[N, K/2]", values.scalar_type());
  const auto b = fp32_vector(op, "bias", bias, n);
  const Weight wt{Format::kSparse24, n, k, values.data_ptr(), dtype_of(values.scalar_type()),
                  meta.data_ptr<uint8_t>(), nullptr, Dtype::kFloat32, nullptr, 0,
                  dtype_of(x.scalar_type())};
  return weight_only_mm(wt, x, std::nullopt, b);
}

at::Tensor sparse24_int4_mm_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const at::Tensor& scales,
                                const std::optional<at::Tensor>& zeros, int64_t group_size,
                                const std::optional<at::Tensor>& bias) {
  const char* op = "leanops_C::sparse24_int4_mm";
  check_x(op, x);
  const int64_t k = x.size(1);
  const int64_t n = check_sparse(op, x, values, meta, k / 4, "uint8 [N, K/4]", at::kByte);
  TORCH_CHECK_VALUE(group_size > 0 && group_size % 64 == 0 && k % group_size == 0, op,
                    ": group_size must be a positive multiple of 64 dividing K = ", k, "; got ",
                    group_size);
  check_groups(op, scales, zeros, n, k / group_size);
  const auto b = fp32_vector(op, "bias", bias, n);
  const Weight wt{Format::kSparse24Int4, n, k, values.data_ptr(), Dtype::kFloat32,
                  meta.data_ptr<uint8_t>(), scales.data_ptr(), dtype_of(scales.scalar_type()),
                  zeros.has_value() ? zeros->data_ptr<uint8_t>() : nullptr, group_size,
                  dtype_of(x.scalar_type())};
  return weight_only_mm(wt, x, std::nullopt, b);
}

// ---------------------------------------------------------------------------------- int8

// Rows [m0, m1) of x quantised per token (into q and/or q_u8, see cpu_kernels.h).
void quantize(const at::Tensor& x, const float* smooth, int8_t* q, uint8_t* q_u8, float* scale) {
  const int64_t m = x.size(0), k = x.size(1);
  const void* xp = x.data_ptr();
  const Dtype dt = dtype_of(x.scalar_type());
  const int64_t ldx = x.stride(0);
  const bool avx512 = kern::active_isa() == Isa::kAvx512;
  at::parallel_for(0, m, grain_rows(k), [&](int64_t m0, int64_t m1) {
    if (avx512) {
      kern::avx512::quantize_rows(xp, dt, ldx, smooth, k, m0, m1, q, k, q_u8, k, scale);
    } else {
      kern::generic::quantize_rows(xp, dt, ldx, smooth, k, m0, m1, q, k, q_u8, k, scale);
    }
  });
}

at::Tensor unit_column_stride(const at::Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8_cpu(
    const at::Tensor& x_arg, const std::optional<at::Tensor>& smooth_arg) {
  const char* op = "leanops_C::quantize_per_token_int8";
  check_x(op, x_arg);
  const int64_t m = x_arg.size(0), k = x_arg.size(1);
  TORCH_CHECK_VALUE(k > 0, op, ": x must have at least one column; got shape ", x_arg.sizes());
  const auto smooth = fp32_vector(op, "smooth", smooth_arg, k);
  const at::Tensor x = unit_column_stride(x_arg);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, x.options().dtype(at::kFloat));
  quantize(x, ptr(smooth), q.data_ptr<int8_t>(), nullptr, scale.data_ptr<float>());
  return {q, scale};
}

// out = int8 GEMM of a_u8 (a + 128, [M, K] contiguous) and b [N, K], see cpu_kernels.h. Tasks
// are blocks of 256 rows x 64 columns: a block of b (64 x K bytes) stays in L2 while the rows
// of a stream past it.
void int8_gemm(const uint8_t* a_u8, const at::Tensor& b, const float* a_scale, int64_t m,
               const Output& o) {
  const int64_t n = b.size(0), k = b.size(1);
  constexpr int64_t kRows = 256, kCols = 64;
  const int64_t mt = (m + kRows - 1) / kRows, nt = (n + kCols - 1) / kCols;
  const int8_t* bp = b.data_ptr<int8_t>();
  const bool avx512 = kern::active_isa() == Isa::kAvx512;
  const int64_t grain = std::max<int64_t>(1, grain_rows(k * std::min(m, kRows)) / kCols);
  at::parallel_for(0, mt * nt, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = (t / nt) * kRows, n0 = (t % nt) * kCols;
      const int64_t m1 = std::min(m, m0 + kRows), n1 = std::min(n, n0 + kCols);
      if (avx512) {
        kern::avx512::int8_gemm(a_u8, k, bp, k, a_scale, m0, m1, n0, n1, o);
      } else {
        kern::generic::int8_gemm(a_u8, k, bp, k, a_scale, m0, m1, n0, n1, o);
      }
    }
  });
}

void check_int8_weight(const char* op, const at::Tensor& b, const char* name, int64_t k) {
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": ", name, " must be int8 [N, K]; got shape ", b.sizes());
  check_matrix(op, name, b, at::kChar, b.size(0), k, "[N, K]");
}

at::Tensor int8_mm_cpu(const at::Tensor& a_arg, const at::Tensor& b, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype_arg) {
  const char* op = "leanops_C::int8_mm";
  check_cpu(op, "a", a_arg);
  TORCH_CHECK_VALUE(a_arg.scalar_type() == at::kChar && a_arg.dim() == 2, op,
                    ": a must be int8 [M, K]; got ", a_arg.scalar_type(), " of shape ",
                    a_arg.sizes());
  const int64_t m = a_arg.size(0), k = a_arg.size(1);
  check_int8_weight(op, b, "b", k);
  const int64_t n = b.size(0);
  // the public op's default (leanops.ops.int8.DEFAULT_OUT_DTYPE; a test checks they agree)
  const at::ScalarType out_dtype = out_dtype_arg.value_or(at::kBFloat16);
  TORCH_CHECK_VALUE(is_float(out_dtype), op,
                    ": out_dtype must be float16, bfloat16 or float32; got ", out_dtype);
  const at::Tensor as = fp32_vector(op, "a_scale", a_scale, m);
  const at::Tensor bs = fp32_vector(op, "b_scale", b_scale, n);
  const auto bias32 = fp32_vector(op, "bias", bias, n);
  at::Tensor out = at::empty({m, n}, a_arg.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  // the kernels' unsigned operand: a + 128 (flipping the sign bit), contiguous
  at::Tensor a_u8 = at::empty({m, k}, a_arg.options().dtype(at::kByte));
  const at::Tensor a = unit_column_stride(a_arg);
  const int8_t* ap = a.data_ptr<int8_t>();
  uint8_t* up = a_u8.data_ptr<uint8_t>();
  const int64_t lda = a.stride(0);
  at::parallel_for(0, m, grain_rows(k), [&](int64_t m0, int64_t m1) {
    for (int64_t i = m0; i < m1; ++i) {
      for (int64_t j = 0; j < k; ++j) up[i * k + j] = static_cast<uint8_t>(ap[i * lda + j] ^ 0x80);
    }
  });
  const Output o{out.data_ptr(), dtype_of(out_dtype), n, bs.data_ptr<float>(), ptr(bias32)};
  int8_gemm(up, b, as.data_ptr<float>(), m, o);
  return out;
}

// The W8A8 linear layer fused: x quantised per token straight into the GEMM's u8 operand (no
// int8 tensor, no second op call), then int8_gemm. Bit-exact with quantize_per_token_int8 +
// int8_mm, which is what the reference composes.
at::Tensor int8_dynamic_linear_cpu(const at::Tensor& x_arg, const at::Tensor& w,
                                   const at::Tensor& w_scale,
                                   const std::optional<at::Tensor>& smooth_arg,
                                   const std::optional<at::Tensor>& bias) {
  const char* op = "leanops_C::int8_dynamic_linear";
  check_x(op, x_arg);
  const int64_t m = x_arg.size(0), k = x_arg.size(1);
  check_int8_weight(op, w, "w", k);
  const int64_t n = w.size(0);
  const at::Tensor ws = fp32_vector(op, "w_scale", w_scale, n);
  const auto smooth = fp32_vector(op, "smooth", smooth_arg, k);
  const auto bias32 = fp32_vector(op, "bias", bias, n);
  TORCH_CHECK_VALUE(k > 0, op, ": x must have at least one column; got shape ", x_arg.sizes());
  at::Tensor out = at::empty({m, n}, x_arg.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor x = unit_column_stride(x_arg);
  at::Tensor a_u8 = at::empty({m, k}, x.options().dtype(at::kByte));
  at::Tensor a_scale = at::empty({m}, x.options().dtype(at::kFloat));
  quantize(x, ptr(smooth), nullptr, a_u8.data_ptr<uint8_t>(), a_scale.data_ptr<float>());
  const Output o{out.data_ptr(), dtype_of(x.scalar_type()), n, ws.data_ptr<float>(), ptr(bias32)};
  int8_gemm(a_u8.data_ptr<uint8_t>(), w, a_scale.data_ptr<float>(), m, o);
  return out;
}

// ---------------------------------------------------------------------------- ISA control

std::string isa() { return kern::isa_name(kern::active_isa()); }

std::string detected_isa() { return kern::isa_name(kern::detected_isa()); }

std::string set_isa(const std::string& name) {
  const std::string previous = isa();
  TORCH_CHECK_VALUE(name == "generic" || name == "avx512",
                    "leanops_cpu::set_isa: name must be 'generic' or 'avx512'; got '", name, "'");
  const Isa want = name == "avx512" ? Isa::kAvx512 : Isa::kGeneric;
  TORCH_CHECK_VALUE(kern::set_isa(want), "leanops_cpu::set_isa: this CPU cannot run '", name,
                    "' (detected: ", detected_isa(), ")");
  return previous;
}

// How many threads an at::parallel_for over `chunks` chunks of one item ran on: the kernels'
// split, as compiled into this library (without OpenMP at build time it is always 1).
int64_t threads_used(int64_t chunks) {
  TORCH_CHECK_VALUE(chunks >= 1, "leanops_cpu::threads_used: chunks must be >= 1, got ", chunks);
  std::vector<std::atomic<int>> seen(at::get_num_threads());
  at::parallel_for(0, chunks, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[t].store(1);
  });
  int64_t n = 0;
  for (auto& s : seen) n += s.load();
  return n;
}

}  // namespace

TORCH_LIBRARY_IMPL(leanops_C, CPU, m) {
  m.impl("quantize_per_token_int8", quantize_per_token_int8_cpu);
  m.impl("int8_mm", int8_mm_cpu);
  m.impl("int8_dynamic_linear", int8_dynamic_linear_cpu);
  m.impl("int8_weight_mm", int8_weight_mm_cpu);
  m.impl("int4_weight_mm", int4_weight_mm_cpu);
  m.impl("sparse24_mm", sparse24_mm_cpu);
  m.impl("sparse24_int4_mm", sparse24_int4_mm_cpu);
}

// Not ops of the model: which CPU implementation runs. Its own namespace, so every leanops_C op
// keeps a public twin (tests/test_extension.py checks that).
TORCH_LIBRARY(leanops_cpu, m) {
  m.def("isa() -> str", isa);
  m.def("detected_isa() -> str", detected_isa);
  m.def("set_isa(str name) -> str", set_isa);
  m.def("threads_used(int chunks) -> int", threads_used);
}
