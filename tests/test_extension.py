"""The compiled extension leanops._C: it imports, registers its leanops_C ops with the schemas the
Python dispatcher calls them with, and, when built with a CUDA toolkit, has a CUDA kernel for
every op it should. No GPU needed: this is what catches, in CI, a CUDA build that silently fell
back to a CppExtension or lost a kernel registration (the kernels themselves run in
tests/test_cuda_quantize.py, on a GPU).

In CI (CI=true, as GitHub Actions and most CI systems set) a CUDA toolkit is always present, so
a build without CUDA is a failure there rather than a skip. A pure-Python install
(LEANOPS_NO_EXTENSION=1 at build time and test time) skips the whole file.
"""

import os
import re

import leanops
import pytest
import torch
from leanops import dispatch

# Every op that has a CUDA kernel in kernels/. Adding a kernel means adding its name here.
CUDA_OPS = ["int4_weight_mm", "int8_mm", "quantize_per_token_int8", "sparse24_int4_mm", "sparse24_mm"]
# Every op with a C++ CPU kernel in kernels/cpu/ (the "cpu" backend).
CPU_OPS = [*CUDA_OPS, "int8_dynamic_linear", "int8_weight_mm"]
DEFAULT_ARCHS = "80;89;90a"  # setup.py's default LEANOPS_CUDA_ARCHS
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if os.environ.get("LEANOPS_NO_EXTENSION") == "1":
    pytest.skip("LEANOPS_NO_EXTENSION=1: installed without leanops._C", allow_module_level=True)


@pytest.fixture(scope="module")
def ext():
    module = dispatch.extension()
    assert module is not None, f"leanops._C did not load: {dispatch._C_error}"
    return module


@pytest.fixture(scope="module")
def cuda_build(ext):
    """The extension, when it was built with a CUDA toolkit; a skip otherwise (a failure in CI)."""
    if not ext.with_cuda:
        if IN_CI:
            pytest.fail("CI=true but leanops._C was built without CUDA (setup.py found no toolkit)")
        pytest.skip("leanops._C was built without a CUDA toolkit (CppExtension)")
    return ext


def _leanops_c_schemas():
    return {
        s.name.split("::", 1)[1]: s
        for s in torch._C._jit_get_all_schemas()
        if s.name.startswith("leanops_C::")
    }


def test_extension_imports_and_reports_its_build(ext):
    import leanops._C as direct

    assert direct is ext
    assert isinstance(ext.with_cuda, bool)
    assert ext.cuda_archs is None if not ext.with_cuda else isinstance(ext.cuda_archs, str)
    report = leanops.backends()["cuda"]
    assert report["extension_loaded"] is True
    assert report["extension_with_cuda"] is ext.with_cuda
    assert report["compiled_archs"] == ext.cuda_archs


def test_every_private_op_has_the_schema_of_its_public_twin(ext):
    """OpBackends calls torch.ops.leanops_C.<op>(*args) with the public op's exact arguments, so
    names, types, defaults and returns must agree (only the namespace differs)."""
    schemas = _leanops_c_schemas()
    missing = set(CUDA_OPS) - set(schemas)
    assert not missing, f"schemas missing from kernels/leanops_C.cpp: {sorted(missing)}"
    for name, schema in schemas.items():
        if name.startswith("_"):  # test hooks (_gemm_plan): no public twin
            continue
        public = getattr(torch.ops.leanops, name).default._schema
        assert str(schema).replace("leanops_C::", "leanops::", 1) == str(public)


def test_cuda_kernels_are_registered(cuda_build):
    for op in CUDA_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops_C::{op}", "CUDA"), op
    report = leanops.backends()["cuda"]
    assert report["extension_with_cuda"] is True
    assert report["ops"] == sorted(CUDA_OPS)


def test_cpu_tensors_do_not_reach_the_cuda_kernel(cuda_build):
    x = torch.randn(4, 64)
    # on CPU tensors the dispatcher picks leanops_C's CPU kernel, never the CUDA one
    q, scale = torch.ops.leanops_C.quantize_per_token_int8(x)
    assert q.device.type == "cpu" and scale.device.type == "cpu"
    # the public op, forced onto the cuda backend, says why it cannot
    with leanops.use_backend("cuda"), pytest.raises(RuntimeError, match="need CUDA tensors"):
        leanops.ops.quantize_per_token_int8(x)


def test_cpu_kernels_are_registered_in_every_build(ext):
    """The CPU kernels (kernels/cpu/) are compiled by CUDAExtension and CppExtension builds alike."""
    for op in CPU_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops_C::{op}", "CPU"), op
    report = leanops.backends()["cpu"]
    assert report["available"] is True and report["ops"] == sorted(CPU_OPS)
    assert report["isa"]["active"] in ("generic", "avx512")


def test_cpp_only_build_has_schemas_but_no_cuda_kernels(ext):
    if ext.with_cuda:
        pytest.skip("built with CUDA; this checks the CppExtension build")
    for op in CUDA_OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops_C::{op}", "CUDA")
    assert leanops.backends()["cuda"]["ops"] == []


def test_cuda_archs_names_what_was_compiled(cuda_build):
    archs = cuda_build.cuda_archs.split(";")
    assert all(re.fullmatch(r"\d{2,3}[af]?", a) for a in archs), cuda_build.cuda_archs
    assert all(int(re.match(r"\d+", a).group()) >= 80 for a in archs), "leanops needs sm_80+"
    wanted = os.environ.get("LEANOPS_CUDA_ARCHS")
    if wanted is not None:  # the same setting as the build (bench/gpu_check.sh exports it)
        assert archs == [a.strip() for a in wanted.split(";") if a.strip()]
    elif IN_CI:
        assert cuda_build.cuda_archs == DEFAULT_ARCHS


def test_cuda_archs_cover_the_visible_gpu(cuda_build):
    """A GPU the extension has no code for fails at launch ("no kernel image"), so a build used on
    this GPU must include its arch."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible")
    cap = torch.cuda.get_device_capability()
    archs = cuda_build.cuda_archs.split(";")
    assert any(dispatch.code_runs_on(a, cap) for a in archs), f"sm_{cap[0]}{cap[1]} not covered by {archs}"


def test_code_runs_on_rule():
    assert dispatch.code_runs_on("80", (8, 9)) and dispatch.code_runs_on("80", (8, 0))
    assert not dispatch.code_runs_on("89", (8, 6)) and not dispatch.code_runs_on("80", (9, 0))
    assert dispatch.code_runs_on("90a", (9, 0)) and not dispatch.code_runs_on("90a", (10, 0))
