"""The attention suite: F.scaled_dot_product_attention with each SDPA backend that can run the
shape (flash, memory-efficient, cuDNN, math, forced one at a time through
torch.nn.attention.sdpa_kernel) against SDPA's own automatic choice, the baseline a user gets,
and leanops' fused attention: `leanops.attention` (16-bit) and `leanops.attention_int8` (int8
Q.K^T; int8 dV/dQ/dK in the backward), one provider per leanops backend. See PROVIDERS.

Shapes are q, k, v of [B, H, S, D] (self-attention, Sq = Sk = S). Passes (PASSES), each its own
comparison group against SDPA's choice for the same pass:
  fwd    out = attention(q, k, v)
  bwd    dq, dk, dv of a forward done outside the timing (torch.autograd.grad with
         retain_graph): the backward kernels alone
  train  forward + backward: the attention part of a training step
FLOPs: QK^T and PV, 2 each per multiply-add, 4·B·H·Sq·Sk·D for the forward, halved when causal;
the backward counts 2.5x that (FlashAttention's convention: 5 matmuls of the 2 forward ones'
size, whatever a kernel recomputes), the training step 3.5x. Minimum bytes: fwd q, k, v read and
out written; bwd q, k, v, out, dout read and dq, dk, dv written; train both (the fp32 lse adds
4·B·H·S, left out). The int8 rows are held to the int8 rate (rate "int8"): a floor below the
true one (P·V and dP stay 16-bit; bench/NOTES.md has the mixed floor), so their "% roofline"
reads low rather than high.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import leanops
from leanops.bench.runner import Case

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
PROVIDERS = ("sdpa", *(f"sdpa-{name}" for name in SDPA_BACKENDS), "leanops", "leanops-int8")
PASSES = ("fwd", "bwd", "train")
_OP = {"fwd": "attention", "bwd": "attention backward", "train": "attention fwd+bwd"}
_FLOPS = {"fwd": 1.0, "bwd": 2.5, "train": 3.5}  # x the forward's
_BYTES = {"fwd": 4, "bwd": 8, "train": 10}  # [B, H, S, D] tensors read or written, at least

# The math backend materialises the [B, H, Sq, Sk] scores (fp32 softmax): past this, skip it.
MATH_SCORES_LIMIT_BYTES = 8 << 30


def _sdpa(causal: bool) -> Callable:
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def _sdpa_forced(backend: SDPBackend, causal: bool) -> Callable:
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return fn


def _leanops_attention(causal: bool, int8: bool = False) -> Callable:
    op = leanops.attention_int8 if int8 else leanops.attention

    def fn(q, k, v):
        return op(q, k, v, causal=causal)
    return fn


def providers_for(causal: bool, backends: list[str], auto: bool = False
                  ) -> list[tuple[str, str, str | None, Callable, bool]]:
    """(provider key, provider name, leanops backend, forward fn(q, k, v), is_baseline),
    baseline first; auto adds leanops with no backend forced ("leanops:auto": on CPU tensors the
    CPU path, which no backend name forces)."""
    table = [("sdpa", "torch:sdpa", None, _sdpa(causal), True)]
    table += [(f"sdpa-{name}", f"torch:sdpa[{name}]", None, _sdpa_forced(b, causal), False)
              for name, b in SDPA_BACKENDS.items()]
    if auto:
        table.append(("leanops", "leanops:auto", None, _leanops_attention(causal), False))
    table += [("leanops", f"leanops:{b}", b, _leanops_attention(causal), False) for b in backends]
    table += [("leanops-int8", f"leanops:{b} int8", b, _leanops_attention(causal, True), False)
              for b in backends]
    return table


def _pass_inputs(pass_: str, forward: Callable, make_qkv: Callable) -> Callable:
    """make_inputs for a pass: fwd (q, k, v); bwd (out, q, k, v, dout) with out's graph built
    here, outside the timing; train (q, k, v, dout)."""
    def make():
        q, k, v = make_qkv()
        if pass_ == "fwd":
            return q, k, v
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        dout = torch.randn_like(q)
        if pass_ == "train":
            return q, k, v, dout
        return forward(q, k, v), q, k, v, dout
    return make


def _pass_fn(pass_: str, forward: Callable) -> Callable:
    if pass_ == "fwd":
        return forward
    if pass_ == "bwd":
        def bwd(out, q, k, v, dout):
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        return bwd

    def train(q, k, v, dout):
        return torch.autograd.grad(forward(q, k, v), (q, k, v), dout)
    return train


def attention_cases(seqlens=(1024, 4096, 16384), batch: int = 1, heads: int = 32, head_dim: int = 128,
                    causal: bool = True, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                    providers=PROVIDERS, backends=None, passes=("fwd",)) -> list[Case]:
    """The suite's cases: every provider (in `providers`, the SDPA baseline always) at every
    sequence length, for every pass in `passes` (PASSES: "fwd", "bwd", "train")."""
    from leanops.bench.matmul import default_backends

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    bad = set(passes) - set(PASSES)
    if bad:
        raise ValueError(f"unknown passes {sorted(bad)}; choose from {PASSES}")
    if backends is None:
        # On a CPU the attention ops have no "cpu" kernels of their own: their CPU path is what
        # "leanops:auto" measures (use_backend("cpu") takes the same path), so the reference is
        # the one other leanops row worth a line.
        backends = ["reference"] if device.type == "cpu" else default_backends(device)
    act_bytes = torch.finfo(dtype).bits // 8
    rate = "fp16" if dtype == torch.float16 else "bf16" if dtype == torch.bfloat16 else None
    cases = []
    for pass_, s in itertools.product(passes, seqlens):
        dims = {"B": batch, "H": heads, "Sq": s, "Sk": s, "D": head_dim, "causal": bool(causal)}
        flops = _FLOPS[pass_] * 4.0 * batch * heads * s * s * head_dim * (0.5 if causal else 1.0)
        min_bytes = act_bytes * batch * heads * head_dim * s * _BYTES[pass_]

        def make_qkv(s=s):
            shape = (batch, heads, s, head_dim)
            return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3))

        scores = 4 * batch * heads * s * s
        for key, name, backend, forward, baseline in providers_for(causal, backends,
                                                                   auto=device.type == "cpu"):
            if key not in providers and not baseline:
                continue
            skip = None
            if key == "sdpa-math" and scores > MATH_SCORES_LIMIT_BYTES:
                skip = f"math backend would materialise {scores / 2**30:.0f} GiB of fp32 scores"
            int8_rate = "int8" if key == "leanops-int8" and rate is not None else rate
            cases.append(Case(
                "attention", _OP[pass_], name, backend, dtype, dict(dims), flops, min_bytes,
                int8_rate, _pass_inputs(pass_, forward, make_qkv), _pass_fn(pass_, forward),
                baseline=baseline, family=f"attention-{pass_}", skip=skip,
                # A forced SDPA backend without a kernel for this shape/dtype/GPU raises
                # RuntimeError ("No available kernel"): that is "cannot run here".
                skip_on=(RuntimeError,) if key.startswith("sdpa-") else (),
            ))
    return cases
