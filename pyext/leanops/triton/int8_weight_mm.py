"""W8A16 matmul in Triton: out = (x @ w.T * w_scale[None, :] + bias) rounded once to x's dtype,
x [M, K] float16/bfloat16/float32 (any strides), w int8 [N, K] contiguous, w_scale [N].

The kernel is int8_mm's with X_INT8 off (leanops.triton.int8_mm, where the numerics are
described); this module holds the family's configs and the launcher.
"""

from __future__ import annotations

import torch

from leanops.triton import _common as common
from leanops.triton import _matmul as matmul
from leanops.triton.int8_mm import KERNEL

# 16-bit activations: BLOCK_K = 64 already moves 128 bytes per x row; 256 only pays off for the
# decode path where the weight tile (1 byte per value) is the bulk of each load.
FAMILY = matmul.matmul_family(
    KERNEL, small_block_ks=(64, 128, 256), large_block_ks=(32, 64),
    x_bytes=matmul.x_element_bytes, w_bytes=1, ws_dtype=torch.float32,
)


def _launch(x, w, w_scale, bias=None, cfg=None):
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return matmul.run_matmul(
        FAMILY,
        # x_scale_ptr is not read with X_INT8 off: w_scale stands in.
        (x, w, w_scale, w_scale, w_scale if bias is None else bias),
        out, M, N, K,
        (x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1)),
        meta={"X_INT8": False, "HAS_BIAS": bias is not None,
              "DOT_PRECISION": common.dot_precision(x.dtype)},
        epilogue={"col_scale": w_scale, "bias": bias},
        cfg=cfg,
    )


def int8_weight_mm(x, w, w_scale, bias=None):
    """Triton kernel of leanops::int8_weight_mm (arguments validated by the op)."""
    return _launch(x, w, w_scale, bias)
