"""Int8 training (SwitchBack): leanops::int8_training_linear (opcheck, forward and backward
numerics against float64, the Triton kernels), Int8TrainingLinear through quantize_, a loss curve
against dense training, torch.compile."""

import copy

import leanops
import pytest
import torch
from leanops import ops
from leanops.nn import Int8TrainingLinear
from leanops.quant import dequantize_int8_per_channel, quantize_per_token_int8, sqnr_db
from torch import nn


def _args(m=6, n=10, k=40, dtype=torch.float32, bias=True, grad=True):
    x = torch.randn(m, k, dtype=dtype)
    w = torch.randn(n, k, dtype=dtype) / k**0.5
    b = torch.randn(n, dtype=dtype) if bias else None
    if grad:
        x.requires_grad_()
        w.requires_grad_()
        if b is not None:
            b.requires_grad_()
    return x, w, b


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["grad", "nobias", "nograd"])
def test_opcheck(case, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    args = _args(bias=case != "nobias", grad=case != "nograd")
    with leanops.use_backend(backend):
        torch.library.opcheck(torch.ops.leanops.int8_training_linear.default, args)


def _dq_rows(t):
    """t quantised per row exactly as the op does it, dequantised in float64."""
    q, s = quantize_per_token_int8(t)
    return q.double() * s.double()[:, None]


def test_forward_and_backward_match_the_float64_switchback_computation():
    # Finite differences of an int8-quantised function are meaningless (zero or jumps), so
    # torch.autograd.gradcheck cannot judge it. The op's analytic gradients are instead checked
    # against float64 autograd of the computation SwitchBack defines on dequantised operands:
    #   y  = Qrow(x) @ Qrow(W).T + b
    #   dx = autograd of x -> x @ Qcol(W).T at grad Qrow(dy)   (W per input channel)
    #   dW = autograd of W -> x @ W.T at grad dy (16-bit, no quantisation), db = sum(dy)
    x, w, b = _args(m=17, n=24, k=72)
    y = ops.int8_training_linear(x, w, b)
    dy = torch.randn_like(y)
    y.backward(dy)

    x64, w64, b64 = (t.detach().double() for t in (x, w, b))
    expected_y = _dq_rows(x64.float()) @ _dq_rows(w64.float()).t() + b64
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-6, atol=1e-6)

    xl = x64.clone().requires_grad_()
    w_col = _dq_rows(w.detach().t()).t()  # [N, K], per-input-channel scales
    torch.autograd.backward(xl @ w_col.t(), _dq_rows(dy))
    wl = w64.clone().requires_grad_()
    bl = b64.clone().requires_grad_()
    torch.autograd.backward(x64 @ wl.t() + bl, dy.double())
    torch.testing.assert_close(x.grad.double(), xl.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wl.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), bl.grad, rtol=1e-6, atol=1e-6)
    # and the int8 results are good estimates of the exact dense ones
    assert sqnr_db(x64 @ w64.t() + b64, y) > 35
    assert sqnr_db(dy.double() @ w64, x.grad) > 35


def test_weight_quantisation_is_the_rtn_per_channel_format():
    x, w, _ = _args(m=5, n=8, k=64, grad=False)
    w[2] = 0  # an all-zero output channel: scale differs (tiny vs 1), values do not
    qw, sw = leanops.quant.quantize_int8_per_channel(w)
    qx, sx = quantize_per_token_int8(x)
    expected = ops.int8_mm(qx, qw, sx, sw, None, torch.float32)
    assert torch.equal(ops.int8_training_linear(x, w), expected)
    assert torch.equal(dequantize_int8_per_channel(*quantize_per_token_int8(w)),
                       dequantize_int8_per_channel(qw, sw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernels_give_the_reference_results(dtype, interpreter):
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(1)
        x, w, b = _args(m=9, n=24, k=40, dtype=dtype)
        with leanops.use_backend(backend):
            y = ops.int8_training_linear(x, w, b)
            y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(dtype))
        results[backend] = (y, x.grad, w.grad, b.grad)
    for got, expected in zip(results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=1e-3)


def test_bfloat16_gradients_keep_their_dtypes():
    x, w, b = _args(dtype=torch.bfloat16)
    ops.int8_training_linear(x, w, b).sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.bfloat16


def test_argument_errors_name_the_argument():
    x, w, b = _args(grad=False)
    with pytest.raises(ValueError, match="w must have dtype float32"):
        ops.int8_training_linear(x, w.half())
    with pytest.raises(ValueError, match="w must be .N, K. with the K of x"):
        ops.int8_training_linear(x, w[:, :20])
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.int8_training_linear(x, w, b[:3])


def test_quantize_swaps_in_int8_training_layers_sharing_the_parameters():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    keys = list(model.state_dict())
    params = list(model.parameters())
    leanops.quantize_(model, leanops.Int8TrainingConfig())
    assert all(isinstance(model[i], Int8TrainingLinear) for i in (0, 2))
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    out = model(torch.randn(2, 3, 32))
    assert out.shape == (2, 3, 8)
    out.sum().backward()
    assert all(p.grad is not None for p in params)


def _task(seed=0, n=512, k=32, classes=8):
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.randn(k, classes, generator=gen)
    x = torch.randn(n, k, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(n, classes, generator=gen)).argmax(1)
    return x, y


def _loss_curve(model, x, y, steps=120, batch=64):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    curve = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve)


def test_loss_curve_follows_dense_training():
    torch.manual_seed(0)
    x, y = _task()
    dense = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 8))
    int8 = leanops.quantize_(copy.deepcopy(dense), leanops.Int8TrainingConfig())
    curves = {"dense": _loss_curve(dense, x, y), "int8": _loss_curve(int8, x, y)}
    # smoothed over 20 steps: int8 tracks dense from start to end, with no divergence
    smooth = {k: c.reshape(-1, 20).mean(1) for k, c in curves.items()}
    assert bool(torch.isfinite(curves["int8"]).all())
    assert smooth["int8"][-1] < 0.5 * smooth["int8"][0]
    assert bool(((smooth["int8"] - smooth["dense"]).abs() < 0.02 + 0.05 * smooth["dense"]).all()), smooth


@pytest.mark.slow
def test_int8_training_model_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(48, 96), nn.SiLU(), nn.Linear(96, 32, bias=False))
    leanops.quantize_(model, leanops.Int8TrainingConfig())
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 7, 48)
    eager = model(x)
    eager.square().sum().backward()
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for p, p2 in zip(model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-4, atol=1e-4)
