"""Which kernels run: the four backends, how one is chosen, and the report of what is available.

Backends, fastest first:
  "cuda"       hand-written CUDA C++ kernels in the compiled extension leanops._C (CUDA tensors)
  "triton"     Triton kernels in leanops.triton (CUDA tensors; CPU tensors only under the Triton
               interpreter, TRITON_INTERPRET=1, which is how CI tests them)
  "cpu"        C++ CPU kernels in leanops._C (kernels/cpu/: AVX-512/VNNI where the CPU has it,
               portable C++ elsewhere, BLAS for the large-M weight-only GEMMs) (CPU tensors)
  "reference"  PyTorch math, any device: the definition of every op and the ground truth the
               tests compare with; the CPU path of the ops without a "cpu" kernel

With no backend forced, an op on CUDA tensors takes the first of cuda -> triton that has a kernel
for it and supports the arguments, and an op on CPU tensors takes "cpu" where the op has CPU
kernels (never "triton", even under the interpreter: that is a test mode, reached by forcing
it); where none can run it falls back to the reference with a one-time warning (never a silent
slow path). `use_backend(name)` forces one, for tests and benchmarks; a forced backend that
cannot run the call raises instead of falling back.

The C++ kernels are registered under the private op namespace `leanops_C` (schemas in
kernels/leanops_C.cpp); the public ops in namespace `leanops` are defined in Python
(leanops/ops/) so they exist, with fake kernels and autograd, even when _C is missing or broken.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import importlib.util
import warnings

import torch

from leanops._env import triton_interpreter_active

BACKENDS = ("cuda", "triton", "cpu", "reference")

# None means "auto". A ContextVar rather than a global so threads and asyncio tasks that force a
# backend for a benchmark do not leak it into each other.
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("leanops_backend", default=None)

# The minimum compute capability our GPU kernels are built and tuned for (sm_80: Ampere).
MIN_CAPABILITY = (8, 0)


def _load_extension():
    """Import leanops._C once; never raise. Returns (module or None, reason if None)."""
    try:
        module = importlib.import_module("leanops._C")
    except Exception as exc:  # ImportError, OSError (undefined symbol from another torch), ...
        reason = f"leanops._C could not be imported ({type(exc).__name__}: {exc})"
        warnings.warn(
            f"{reason}; the CUDA C++ kernels are disabled and leanops uses its Triton and "
            "reference paths. Rebuild with `pip install --no-build-isolation -e .` against the "
            "installed torch.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    return module, None


_C, _C_error = _load_extension()


def extension():
    """The compiled extension module leanops._C, or None if it could not be loaded."""
    return _C


class use_backend(contextlib.ContextDecorator):
    """Force the backend of every leanops op run inside the block (or the decorated function).

    >>> with leanops.use_backend("triton"):
    ...     y = model(x)

    Arguments:
        name: "cuda", "triton" or "reference", or None for automatic choice (cuda -> triton ->
            reference). A forced backend that cannot run a call raises a RuntimeError that says
            why, instead of falling back.

    Raises: ValueError for any other name.
    """

    def __init__(self, name: str | None):
        if name is not None and name not in BACKENDS:
            raise ValueError(f"use_backend: name must be one of {BACKENDS} or None, got {name!r}")
        self.name = name
        self._tokens: list[contextvars.Token] = []

    def __enter__(self):
        self._tokens.append(_forced.set(self.name))
        return self

    def __exit__(self, *exc):
        _forced.reset(self._tokens.pop())
        return False


def forced_backend() -> str | None:
    return _forced.get()


@functools.cache
def _triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"import triton failed ({type(exc).__name__}: {exc})"
    return None


@functools.cache
def _gpu_capability_error(device_index: int) -> str | None:
    cap = torch.cuda.get_device_capability(device_index)
    if cap < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device_index)
        return (
            f"{name} is sm_{cap[0]}{cap[1]}; leanops GPU kernels need sm_"
            f"{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]} or newer"
        )
    return None


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton backend cannot run on `device`, or None if it can."""
    err = _triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if triton_interpreter_active():
            return "TRITON_INTERPRET=1 is set: Triton runs in the CPU interpreter, not on CUDA tensors"
        return _gpu_capability_error(_device_index(device))
    if device.type == "cpu":
        if not triton_interpreter_active():
            return "Triton runs on CPU tensors only under the interpreter (TRITON_INTERPRET=1)"
        return None
    return f"Triton kernels do not run on {device.type} tensors"


def code_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether machine code compiled for `arch` ("80", "89", "90a") runs on a GPU of
    `capability`: plain sm_XY code runs on later minors of its major (sm_80 on sm_86 and sm_89);
    "a" (arch-specific: wgmma, setmaxnreg) code runs on exactly its arch. We ship no PTX, so
    nothing else runs."""
    digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
    num, cap = int(digits), capability[0] * 10 + capability[1]
    if arch != digits:
        return num == cap
    return num // 10 == capability[0] and num <= cap


@functools.cache
def _arch_coverage_error(device_index: int) -> str | None:
    archs = (getattr(_C, "cuda_archs", None) or "").split(";")
    cap = torch.cuda.get_device_capability(device_index)
    if not any(code_runs_on(a, cap) for a in archs if a):
        return (
            f"leanops._C was compiled for sm_{', sm_'.join(archs)}, which cannot run on this "
            f"sm_{cap[0]}{cap[1]} GPU; rebuild with LEANOPS_CUDA_ARCHS including {cap[0]}{cap[1]}"
        )
    return None


def cuda_unavailable(device: torch.device, op: str | None = None) -> str | None:
    """Why the CUDA C++ backend cannot run (op `op`) on `device`, or None if it can."""
    if _C is None:
        return _C_error
    if not getattr(_C, "with_cuda", False):
        return "leanops._C was built without a CUDA toolkit (CppExtension): no CUDA kernels"
    if device.type != "cuda":
        return f"CUDA kernels need CUDA tensors, got {device.type} tensors"
    if op is not None and not _has_kernel(op, "CUDA"):
        return f"leanops._C has no CUDA kernel for {op}"
    index = _device_index(device)
    return _gpu_capability_error(index) or _arch_coverage_error(index)


@functools.cache
def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"leanops_C::{op}", key)


def cpu_unavailable(device: torch.device, op: str | None = None) -> str | None:
    """Why the C++ CPU backend cannot run (op `op`) on `device`, or None if it can.

    device: where the call's tensors are (only "cpu" qualifies).
    op: a leanops_C op name, e.g. "int4_weight_mm"; None checks the extension only.
    Returns None, or the reason as a sentence (extension missing, not CPU tensors, no CPU kernel
    for `op`). Never raises.
    """
    if _C is None:
        return _C_error
    if device.type != "cpu":
        return f"CPU kernels need CPU tensors, got {device.type} tensors"
    if op is not None and not _has_kernel(op, "CPU"):
        return f"leanops._C has no CPU kernel for {op}"
    return None


def cpu_isa() -> dict[str, str | None]:
    """Which implementation of the CPU kernels runs.

    Returns {"active": ..., "detected": ...}: the one in use (torch.ops.leanops_cpu.set_isa can
    force "generic") and the best this CPU can run, each "avx512" (AVX-512 F/BW/DQ/VL + VNNI) or
    "generic" (portable C++), or None when leanops._C is not loaded.
    """
    if _C is None:
        return {"active": None, "detected": None}
    return {"active": torch.ops.leanops_cpu.isa(), "detected": torch.ops.leanops_cpu.detected_isa()}


def _ops_with_kernel(key: str) -> list[str]:
    """Sorted leanops_C op names with a kernel for dispatch key `key` ("CPU", "CUDA")."""
    names = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
             if s.name.startswith("leanops_C::")}
    return sorted(n for n in names if _has_kernel(n, key))


def cpu_ops() -> list[str]:
    """Ops for which the loaded extension registers a CPU kernel: sorted leanops_C op names
    ([] without the extension)."""
    return [] if _C is None else _ops_with_kernel("CPU")


def cuda_ops() -> list[str]:
    """Ops for which the loaded extension registers a CUDA kernel."""
    if _C is None or not getattr(_C, "with_cuda", False):
        return []
    return _ops_with_kernel("CUDA")


def backends() -> dict[str, dict]:
    """What can run here and, where something cannot, why not.

    Returns {"cuda": {...}, "triton": {...}, "cpu": {...}, "reference": {...}, "device": {...}};
    each backend entry has "available" (bool) and "reason" (str or None), plus details such as
    versions and, for "cuda" and "cpu", the ops with a compiled kernel (and for "cpu" which
    implementation runs, see cpu_isa()).
    """
    gpu = torch.device("cuda") if torch.cuda.is_available() else None
    report: dict[str, dict] = {}

    if gpu is not None:
        cuda_reason = cuda_unavailable(gpu)
    elif _C is None:
        cuda_reason = _C_error
    elif not getattr(_C, "with_cuda", False):
        cuda_reason = cuda_unavailable(torch.device("cpu"))  # says: built without a toolkit
    else:
        cuda_reason = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
    report["cuda"] = {
        "available": cuda_reason is None,
        "reason": cuda_reason,
        "extension_loaded": _C is not None,
        "extension_with_cuda": bool(getattr(_C, "with_cuda", False)),
        "compiled_archs": getattr(_C, "cuda_archs", None),
        "ops": cuda_ops(),
    }

    if gpu is not None:
        triton_reason = triton_unavailable(gpu)
    elif triton_interpreter_active():
        triton_reason = triton_unavailable(torch.device("cpu"))
    else:
        triton_reason = _triton_import_error() or "no CUDA GPU is visible (and TRITON_INTERPRET is unset)"
    triton_version = None
    if _triton_import_error() is None:
        import triton

        triton_version = triton.__version__
    report["triton"] = {
        "available": triton_reason is None,
        "reason": triton_reason,
        "version": triton_version,
        "interpreter": triton_interpreter_active(),
    }
    cpu_reason = cpu_unavailable(torch.device("cpu"))
    report["cpu"] = {
        "available": cpu_reason is None,
        "reason": cpu_reason,
        "isa": cpu_isa(),
        "ops": cpu_ops(),
    }
    report["reference"] = {"available": True, "reason": None}
    report["device"] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if gpu is not None else None,
        "capability": (
            "sm_{}{}".format(*torch.cuda.get_device_capability()) if gpu is not None else None
        ),
        "forced_backend": forced_backend(),
    }
    return report


class OpBackends:
    """The kernels of one public op and the rule that picks one for a call.

    `triton` is a lazy reference "module:function" so importing leanops never imports Triton;
    the "cuda" and "cpu" kernels are the op of the same name in the leanops_C namespace, on its
    CUDA or CPU dispatch key. `cpu=True` says the op has CPU kernels: CPU calls then go to them
    (and fall back to the reference with a warning if they cannot run); without, the reference
    is the op's CPU path. `cuda_supports` / `triton_supports` / `cpu_supports` take the call's
    arguments and return None or the reason that kernel cannot take them.
    """

    def __init__(
        self,
        name: str,
        reference,
        triton: str | None = None,
        triton_supports=None,
        cuda_supports=None,
        cpu: bool = False,
        cpu_supports=None,
    ):
        self.name = name
        self.reference = reference
        self._triton_ref = triton
        self._triton_fn = None
        self.triton_supports = triton_supports
        self.cuda_supports = cuda_supports
        self.has_cpu = cpu
        self.cpu_supports = cpu_supports
        self._warned: set[str] = set()

    def triton(self):
        if self._triton_fn is None:
            module, fn = self._triton_ref.split(":")
            self._triton_fn = getattr(importlib.import_module(module), fn)
        return self._triton_fn

    def native(self):
        """torch.ops.leanops_C.<name>: the C++ kernels (the dispatcher picks CUDA or CPU; torch
        caches the op on its namespace after the first lookup)."""
        return getattr(torch.ops.leanops_C, self.name)

    def _why_not(self, backend: str, device: torch.device, args) -> str | None:
        if backend == "reference":
            return None
        if backend == "triton":
            if self._triton_ref is None:
                return f"leanops::{self.name} has no Triton kernel"
            reason = triton_unavailable(device)
            if reason is None and self.triton_supports is not None:
                reason = self.triton_supports(*args)
            return reason
        if backend == "cpu":
            if not self.has_cpu:
                return f"leanops::{self.name} has no CPU kernel"
            reason = cpu_unavailable(device, self.name)
            if reason is None and self.cpu_supports is not None:
                reason = self.cpu_supports(*args)
            return reason
        reason = cuda_unavailable(device, self.name)
        if reason is None and self.cuda_supports is not None:
            reason = self.cuda_supports(*args)
        return reason

    def select(self, device: torch.device, args) -> str:
        """The backend that runs this call: forced, or the first of cuda -> triton -> reference
        (CUDA tensors), cpu -> reference (CPU tensors, ops with CPU kernels)."""
        forced = _forced.get()
        if forced is not None:
            reason = self._why_not(forced, device, args)
            if reason is not None:
                raise RuntimeError(
                    f"leanops::{self.name}: the forced backend {forced!r} cannot run this call: "
                    f"{reason}"
                )
            return forced
        if device.type == "cpu" and self.has_cpu:
            candidates = ("cpu",)
        elif device.type != "cuda":
            return "reference"
        else:
            candidates = ("cuda", "triton")
        reasons = []
        for backend in candidates:
            reason = self._why_not(backend, device, args)
            if reason is None:
                return backend
            reasons.append(f"{backend}: {reason}")
        key = "; ".join(reasons)
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(
                f"leanops::{self.name} runs its slow PyTorch reference on {device.type.upper()} "
                f"tensors ({key})",
                RuntimeWarning,
                stacklevel=4,
            )
        return "reference"

    def __call__(self, *args):
        device = args[0].device
        backend = self.select(device, args)
        if backend == "reference":
            return self.reference(*args)
        if backend == "triton":
            return self.triton()(*args)
        return self.native()(*args)

