"""The attention suite: F.scaled_dot_product_attention with each SDPA backend that can run the
shape (flash, memory-efficient, cuDNN, math, forced one at a time through
torch.nn.attention.sdpa_kernel) against SDPA's own automatic choice, the baseline a user gets.
leanops' fused attention (`leanops.attention(q, k, v, causal=...)`) joins as one provider per
backend as soon as it exists: see PROVIDERS.

Shapes are q, k, v of [B, H, S, D] (self-attention, Sq = Sk = S). FLOPs: QK^T and PV, 2 each per
multiply-add, 4·B·H·Sq·Sk·D, halved when causal; minimum bytes: q, k, v read once, the output
written once.
"""

from __future__ import annotations

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
PROVIDERS = ("sdpa", *(f"sdpa-{name}" for name in SDPA_BACKENDS), "leanops")

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


def _leanops_attention(causal: bool) -> Callable:
    def fn(q, k, v):
        return leanops.attention(q, k, v, causal=causal)
    return fn


def providers_for(causal: bool, backends: list[str], auto: bool = False
                  ) -> list[tuple[str, str, str | None, Callable, bool]]:
    """(provider key, provider name, leanops backend, fn, is_baseline), baseline first; auto adds
    leanops with no backend forced ("leanops:auto": on CPU tensors the CPU path, which no
    backend name forces)."""
    table = [("sdpa", "torch:sdpa", None, _sdpa(causal), True)]
    table += [(f"sdpa-{name}", f"torch:sdpa[{name}]", None, _sdpa_forced(b, causal), False)
              for name, b in SDPA_BACKENDS.items()]
    if hasattr(leanops, "attention"):  # issue 5: the one line that plugs leanops' kernel in
        if auto:
            table.append(("leanops", "leanops:auto", None, _leanops_attention(causal), False))
        table += [("leanops", f"leanops:{b}", b, _leanops_attention(causal), False) for b in backends]
    return table


def attention_cases(seqlens=(1024, 4096, 16384), batch: int = 1, heads: int = 32, head_dim: int = 128,
                    causal: bool = True, dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
                    providers=PROVIDERS, backends=None) -> list[Case]:
    from leanops.bench.matmul import default_backends

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    backends = default_backends(device) if backends is None else backends
    act_bytes = torch.finfo(dtype).bits // 8
    rate = "fp16" if dtype == torch.float16 else "bf16" if dtype == torch.bfloat16 else None
    cases = []
    for s in seqlens:
        dims = {"B": batch, "H": heads, "Sq": s, "Sk": s, "D": head_dim, "causal": bool(causal)}
        flops = 4.0 * batch * heads * s * s * head_dim * (0.5 if causal else 1.0)
        min_bytes = act_bytes * batch * heads * head_dim * (s + s + s + s)  # q, k, v in; out

        def make_inputs(s=s):
            shape = (batch, heads, s, head_dim)
            return tuple(torch.randn(shape, device=device, dtype=dtype) for _ in range(3))

        scores = 4 * batch * heads * s * s
        for key, name, backend, fn, baseline in providers_for(causal, backends,
                                                              auto=device.type == "cpu"):
            if key not in providers and not baseline:
                continue
            skip = None
            if key == "sdpa-math" and scores > MATH_SCORES_LIMIT_BYTES:
                skip = f"math backend would materialise {scores / 2**30:.0f} GiB of fp32 scores"
            cases.append(Case(
                "attention", "attention", name, backend, dtype, dict(dims), flops, min_bytes, rate,
                make_inputs, fn, baseline=baseline, skip=skip,
                # A forced SDPA backend without a kernel for this shape/dtype/GPU raises
                # RuntimeError ("No available kernel"): that is "cannot run here".
                skip_on=(RuntimeError,) if key.startswith("sdpa-") else (),
            ))
    return cases
