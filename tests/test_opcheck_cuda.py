"""torch.library.opcheck of every public op on CUDA tensors, with the dispatch a user gets there
(the CUDA C++ kernel where it takes the call, else Triton): the CPU suite runs the same cases on
the reference and the interpreter (tests/test_ops.py, test_attention.py, test_sparse_ops.py,
test_training.py); schemas, fake kernels and autograd registrations must hold on the device too.
"""

import pytest
import torch
from test_attention import OPCHECK_CASES as ATTENTION_CASES
from test_ops import OPCHECK_CASES as GEMM_CASES
from test_sparse_ops import OPCHECK_CASES as SPARSE_CASES

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_triton")]

MATMUL_CASES = {**GEMM_CASES, **SPARSE_CASES}
assert len(MATMUL_CASES) == len(GEMM_CASES) + len(SPARSE_CASES), "a case name twice"
TRAINING_CASES = ("grad", "nobias", "nograd")


def _on_cuda(args):
    def move(a):
        if isinstance(a, torch.Tensor):
            return a.detach().to("cuda").requires_grad_(a.requires_grad)
        return a

    return tuple(move(a) for a in args)


def _check(cases, case):
    name, args = cases[case]
    torch.library.opcheck(getattr(torch.ops.leanops, name).default, _on_cuda(args()))


# Two functions so that bench/gpu_plan.py can bound each one's Triton compiles: a matmul case
# launches at most two kernels (int8_dynamic_linear: quantise, then int8_mm), an attention case
# with gradients up to seven (int8: quantisers, forward, preprocess, dK/dV, dQ).
@pytest.mark.parametrize("case", sorted(MATMUL_CASES))
def test_opcheck_on_cuda(case):
    _check(MATMUL_CASES, case)


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_opcheck_attention_on_cuda(case):
    _check(ATTENTION_CASES, case)


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_opcheck_int8_training_linear_on_cuda(case):
    x = torch.randn(6, 40, device="cuda", requires_grad=case != "nograd")
    w = (torch.randn(10, 40, device="cuda") / 40**0.5).requires_grad_(case != "nograd")
    b = None if case == "nobias" else torch.randn(10, device="cuda").requires_grad_(case == "grad")
    torch.library.opcheck(torch.ops.leanops.int8_training_linear.default, (x, w, b))
