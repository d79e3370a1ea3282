// The Python module leanops._C, and the schema of every op in the private namespace leanops_C.
//
// The public ops (namespace `leanops`: schemas, fake kernels, autograd, backend choice) are
// defined in Python, in leanops/ops/, so they exist even when this extension is missing. When
// leanops.dispatch picks the "cuda" backend it calls torch.ops.leanops_C.<op>(*args) with exactly
// the public op's arguments, so each schema here must match its public twin argument for
// argument. All leanops_C op schemas live here, in one place (the one exception is the test hook
// _gemm_plan, kernels/gemm_plan.cpp: no kernel, no public twin); each kernels/<op>.cpp only adds
// implementations (TORCH_LIBRARY_IMPL) for the dispatch keys it has kernels for, guarded by
// LEANOPS_WITH_CUDA for the CUDA ones, so a CppExtension build (no toolkit) still compiles and
// imports, with schemas but no CUDA kernels; kernels/cpu/bindings.cpp adds the CPU kernels of
// every build (the "cpu" backend).
//
// No pybind11: the module has no functions, only two attributes, and the pybind11 headers (via
// torch/extension.h) would cost seconds of compile time per translation unit. Loading the shared
// library runs the static registrars of TORCH_LIBRARY / TORCH_LIBRARY_IMPL, so `import
// leanops._C` is what registers the ops.

#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(leanops_C, m) {
  // Dynamic per-token int8 quantisation (kernels/quantize_per_token.cpp): x [M, K] float16,
  // bfloat16 or float32, smooth [K] any float dtype -> (q int8 [M, K], scale fp32 [M]);
  // bit-exact with leanops.quant.int8.quantize_per_token_int8.
  m.def("quantize_per_token_int8(Tensor x, Tensor? smooth=None) -> (Tensor, Tensor)");
  // W8A8 GEMM (kernels/int8_mm.cpp): a int8 [M, K] x b int8 [N, K]^T with the per-token x
  // per-channel scale and bias epilogue fused; bit-exact with leanops.ops.int8's reference.
  m.def(
      "int8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  // W8A16 GEMM and the fused dynamic W8A8 linear layer (CPU only: kernels/cpu/bindings.cpp;
  // on GPUs they run on Triton, and int8_dynamic_linear as quantize_per_token_int8 + int8_mm).
  m.def("int8_weight_mm(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor");
  m.def(
      "int8_dynamic_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? smooth=None, "
      "Tensor? bias=None) -> Tensor");
  // W4A16 GEMM (kernels/int4_weight_mm.cpp) on the stored int4 layout of leanops.quant.int4.
  m.def(
      "int4_weight_mm(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int group_size, "
      "Tensor? bias=None) -> Tensor");
  // 2:4 sparse GEMM (kernels/sparse24_mm.cpp) on the stored format of leanops.sparsity.sparse24.
  m.def("sparse24_mm(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor");
  // 2:4 sparse + int4 kept values (kernels/sparse24_int4_mm.cpp), the format of
  // leanops.sparsity.sparse24.compress_24_int4.
  m.def(
      "sparse24_int4_mm(Tensor x, Tensor values, Tensor meta, Tensor scales, Tensor? zeros, "
      "int group_size, Tensor? bias=None) -> Tensor");
}

#if defined(LEANOPS_WITH_CUDA) && !defined(LEANOPS_CUDA_ARCHS)
#error "setup.py defines LEANOPS_CUDA_ARCHS (the SM list) along with LEANOPS_WITH_CUDA"
#endif

namespace {

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "leanops' compiled kernels. Importing it registers the torch.ops.leanops_C.* ops.\n\n"
    "with_cuda   True if built with a CUDA toolkit (CUDAExtension), so CUDA kernels exist\n"
    "cuda_archs  the SM targets compiled, e.g. '80;89;90a', or None without CUDA\n",
    -1,       // no per-module state
    nullptr,  // no functions
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef LEANOPS_WITH_CUDA
  const int failed = PyModule_AddObjectRef(module, "with_cuda", Py_True) < 0 ||
                     PyModule_AddStringConstant(module, "cuda_archs", LEANOPS_CUDA_ARCHS) < 0;
#else
  const int failed = PyModule_AddObjectRef(module, "with_cuda", Py_False) < 0 ||
                     PyModule_AddObjectRef(module, "cuda_archs", Py_None) < 0;
#endif
  if (failed) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
