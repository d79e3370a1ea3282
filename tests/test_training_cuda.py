"""Training paths on a GPU (skipped without one): the int8 training op and converted QAT models
through the compiled Triton kernels, in bf16, against the reference backend on the same GPU."""

import leanops
import pytest
import torch
from leanops import ops
from leanops.qat import convert_
from test_qat import _layer_io, _trained_qat

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_triton")]


@pytest.mark.parametrize("m", [3, 100])
def test_int8_training_linear_triton_matches_reference_in_bfloat16(m):
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(1024, 4096, device="cuda") / 64).to(torch.bfloat16).requires_grad_()
        b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with leanops.use_backend(backend):
            y = ops.int8_training_linear(x, w, b)
            y.backward(torch.randn_like(y))
        results[backend] = (y, x.grad, w.grad, b.grad)
    # Same int8 codes and int32 products on both backends; only the fp32 epilogues and the bf16
    # grad-weight matmul round differently.
    for got, expected in zip(results["triton"], results["reference"], strict=True):
        assert leanops.quant.sqnr_db(expected.float(), got.float()) > 40


@pytest.mark.parametrize("name", ["int8_smoothquant", "int8_weight_only", "int4_g64_asym"])
def test_converted_qat_model_on_the_gpu_matches_its_qat_forward(name):
    model, x = _trained_qat(name, learnable=True, dtype=torch.bfloat16)
    model, x = model.to("cuda"), x.to("cuda")
    expected, qat_io = _layer_io(model, x)
    convert_(model)
    with torch.no_grad(), leanops.use_backend("triton"):
        for layer_name, (layer_in, layer_out) in qat_io.items():
            got = model.get_submodule(layer_name)(layer_in)
            # same codes and scales; bf16 QAT products vs fp32 kernel accumulation
            assert leanops.quant.sqnr_db(layer_out.float(), got.float()) > 40, layer_name
