"""Test-wide setup.

On a machine without a CUDA GPU the Triton kernels run in Triton's CPU interpreter, which must be
switched on before Triton is first imported (Triton reads TRITON_INTERPRET when a kernel is
defined). On a GPU machine the interpreter stays off so Triton compiles for the GPU; the
interpreter tests then skip (bench/gpu_check.sh runs them in a separate GPU-less process).
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import leanops  # noqa: E402,F401
import pytest  # noqa: E402
from leanops._env import triton_interpreter_active  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETER = triton_interpreter_active()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _cuda_kernels(request):
    """Tests marked cuda_kernels("op", ...) run leanops' CUDA C++ kernels: skipped without a GPU,
    failed on a GPU machine whose CUDA backend cannot run them (a broken build must not turn into
    skips), except where that is deliberate (helpers.require_cuda_kernels)."""
    marker = request.node.get_closest_marker("cuda_kernels")
    if marker is not None:
        from helpers import require_cuda_kernels

        require_cuda_kernels(*marker.args)


@pytest.fixture
def interpreter():
    """Tests that run Triton kernels on CPU tensors through the interpreter."""
    if not INTERPRETER:
        pytest.skip("Triton interpreter is off (a GPU is present); see bench/gpu_check.sh")


# Fresh random inputs every run (a kernel must be right on any valid input), reproducible by
# rerunning with LEANOPS_TEST_SEED set to the seed printed in the header.
SEED = int(os.environ.get("LEANOPS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return f"leanops test seed: LEANOPS_TEST_SEED={SEED}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(SEED)


@pytest.fixture(autouse=True)
def _library_leaves_logging_alone():
    # A library call must not change the "leanops" logger's level for the rest of the process
    # (it once did: a benchmark silenced quantize_'s skip messages for every later test).
    import logging

    logger = logging.getLogger("leanops")
    before = logger.level
    yield
    assert logger.level == before, "the 'leanops' logger level was changed and not restored"


@pytest.fixture
def poisoned():
    """The test's allocations are poisoned (see helpers.poisoned_memory)."""
    from helpers import poisoned_memory

    with poisoned_memory():
        yield


@pytest.fixture
def compiled_triton():
    """Tests of Triton kernels compiled for the GPU (not the interpreter)."""
    if INTERPRETER:
        pytest.skip("TRITON_INTERPRET is set: Triton does not compile for the GPU in this process")
    reason = leanops.backends()["triton"]["reason"]
    if reason is not None:
        pytest.skip(f"Triton backend unavailable: {reason}")


@pytest.fixture
def no_autotune(monkeypatch):
    """One default config per shape instead of an autotuning search (broad sweeps)."""
    monkeypatch.setenv("LEANOPS_TRITON_AUTOTUNE", "0")
