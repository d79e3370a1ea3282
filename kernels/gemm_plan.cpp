// leanops_C::_gemm_plan, a test hook: the host-side launch plan of the dense CUDA GEMMs
// (int4_weight_mm, int8_mm) for a shape, as [config, splits, tiles_per_split, workspace_elems,
// m_tiles]. The plan is plain host arithmetic (kernels/cuda/gemm_common.cuh's plan_split_k and
// each kernel's tile choice), so tests check it GPU-less (tests/test_extension.py): a division by
// zero there kills a GPU run with SIGFPE, a grid past its limit fails the launch. CUDA builds
// only, like the plans themselves; the only leanops_C schema defined outside leanops_C.cpp,
// because it is not a kernel and has no public twin.

#ifdef LEANOPS_WITH_CUDA

#include <cstdint>
#include <string>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "cuda/int4_weight_mm.h"
#include "cuda/int8_mm.h"

namespace {

std::vector<int64_t> gemm_plan(const std::string& op, int64_t m, int64_t n, int64_t k,
                               int64_t sm_count, int64_t force_config, int64_t force_splits) {
  TORCH_CHECK_VALUE(m >= 0 && n >= 0 && k >= 0 && sm_count >= 1, "leanops_C::_gemm_plan: m, n, k",
                    " must be >= 0 and sm_count >= 1; got ", m, ", ", n, ", ", k, ", ", sm_count);
  const int sms = static_cast<int>(sm_count);
  const int config = static_cast<int>(force_config);
  const int splits = static_cast<int>(force_splits);
  if (op == "int4_weight_mm") {
    const leanops::Int4WeightMmPlan p = leanops::plan_int4_weight_mm(m, n, k, sms, config, splits);
    return {p.config, p.splits, p.tiles_per_split, p.workspace_elems, p.m_tiles};
  }
  if (op == "int8_mm") {
    const leanops::Int8MmPlan p = leanops::plan_int8_mm(m, n, k, sms, config, splits);
    return {p.config, p.splits, p.tiles_per_split, p.workspace_elems, p.m_tiles};
  }
  TORCH_CHECK_VALUE(false, "leanops_C::_gemm_plan: op must be 'int4_weight_mm' or 'int8_mm'; got '",
                    op, "'");
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(leanops_C, m) {
  m.def(
      "_gemm_plan(str op, int m, int n, int k, int sm_count, int force_config=-1, "
      "int force_splits=0) -> int[]",
      &gemm_plan);
}

#endif  // LEANOPS_WITH_CUDA
