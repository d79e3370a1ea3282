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

CASES = {**GEMM_CASES, **ATTENTION_CASES, **SPARSE_CASES}
assert len(CASES) == len(GEMM_CASES) + len(ATTENTION_CASES) + len(SPARSE_CASES), "a case name twice"
TRAINING_CASES = ("grad", "nobias", "nograd")


def _on_cuda(args):
    def move(a):
        if isinstance(a, torch.Tensor):
            return a.detach().to("cuda").requires_grad_(a.requires_grad)
        return a

    return tuple(move(a) for a in args)


def _op_for(case):
    """The public op a case exercises: the longest op name its name starts with (from the
    schema registry: torch.ops.leanops lists an op only once it has been looked up)."""
    ops = {s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
           if s.name.startswith("leanops::")}
    names = [n for n in ops if case == n or case.startswith(n + "_")]
    return getattr(torch.ops.leanops, max(names, key=len)).default


@pytest.mark.parametrize("case", sorted(CASES))
def test_opcheck_on_cuda(case):
    torch.library.opcheck(_op_for(case), _on_cuda(CASES[case]()))


@pytest.mark.parametrize("case", TRAINING_CASES)
def test_opcheck_int8_training_linear_on_cuda(case):
    x = torch.randn(6, 40, device="cuda", requires_grad=case != "nograd")
    w = (torch.randn(10, 40, device="cuda") / 40**0.5).requires_grad_(case != "nograd")
    b = None if case == "nobias" else torch.randn(10, device="cuda").requires_grad_(case == "grad")
    torch.library.opcheck(torch.ops.leanops.int8_training_linear.default, (x, w, b))
