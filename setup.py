"""Builds leanops._C from kernels/.

A CUDAExtension whenever a CUDA toolkit is found, decided by the toolkit and never by a GPU, so a
GPU-less CI machine still compiles (and so checks) every CUDA source. A CppExtension otherwise.

Environment knobs:
  CUDA_HOME            the toolkit to use (otherwise found from nvcc, see _find_cuda_home)
  LEANOPS_CUDA_ARCHS   semicolon list of SM targets, default "80;89;90a" (sm_90a unlocks wgmma);
                       a dev build for one GPU can say e.g. "90a" to compile a third as much
  LEANOPS_NO_EXTENSION set to 1 to skip the extension (pure Python: Triton and reference paths)
  MAX_JOBS             parallel compile jobs (ninja), honoured by torch's BuildExtension
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80;89;90a"


def _find_cuda_home():
    """The toolkit root, or None. Prefer an explicit CUDA_HOME/CUDA_PATH; else follow nvcc.

    torch guesses the root as dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a
    wrapper script (e.g. /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc), so every
    candidate is checked for the headers we actually need.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"]
    for root in candidates:
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _cuda_archs():
    """LEANOPS_CUDA_ARCHS as a clean list, e.g. ["80", "89", "90a"]."""
    archs = [a.strip() for a in os.environ.get("LEANOPS_CUDA_ARCHS", DEFAULT_ARCHS).split(";")]
    archs = [a for a in archs if a]
    if not archs:
        raise ValueError("LEANOPS_CUDA_ARCHS names no architecture")
    return archs


def _gencode_flags(archs):
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]


def _extensions():
    if os.environ.get("LEANOPS_NO_EXTENSION") == "1":
        return [], {}
    cuda_home = _find_cuda_home()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # Relative paths: setuptools refuses absolute source paths in an editable/wheel build.
    cpp_sources = sorted(glob.glob("kernels/*.cpp") + glob.glob("kernels/cpu/*.cpp"))
    cu_sources = sorted(glob.glob("kernels/cuda/*.cu"))
    # C++20: the headers of torch >= 2.10 need it (std::strong_ordering, string_view::starts_with).
    # -g0 overrides the -g in Python's own CFLAGS: host debug info of the torch headers makes
    # each object ~30x bigger (a 6 MB _C.so for one op) and the compile ~20% slower.
    # -ffp-contract=off: no fused multiply-add where the source has a multiply and an add (the
    # CPU kernels' epilogues must round each operation as the fp32 references do).
    # -fopenmp: at::parallel_for is a header template; compiled without OpenMP it runs every
    # chunk on the calling thread, so the CPU kernels ignored torch.set_num_threads (measured:
    # int8_weight_mm 4096 x 4096 at M = 1, 902 us on 1 thread and 877 us on 2; 482 us with it).
    # The extension then needs libgomp.so.1, which torch has already loaded: one OpenMP runtime.
    cxx_flags = ["-O3", "-std=c++20", "-g0", "-ffp-contract=off", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if cuda_home:
        archs = _cuda_archs()
        nvcc_flags = [
            "-O3",
            "-std=c++20",
            "--expt-relaxed-constexpr",
            # no --use_fast_math: the quantisation kernels must round exactly like the reference
            *_gencode_flags(archs),
        ]
        ext = CUDAExtension(
            "leanops._C",
            cpp_sources + cu_sources,
            define_macros=[
                ("LEANOPS_WITH_CUDA", "1"),
                # a C string literal: leanops._C.cuda_archs reports what was compiled
                ("LEANOPS_CUDA_ARCHS", '"{}"'.format(";".join(archs))),
            ],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "leanops._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    package_dir={"": "pyext"},
    packages=find_packages("pyext"),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
