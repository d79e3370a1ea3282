"""Which products of attention's backward can run in int8, and at which scaling granularity:
the gradient error of dQ, dK, dV for each choice, measured on the CPU in float64 (issue 13; the
table and the decision are in bench/NOTES.md, "int8 attention").

    python bench/int8_attention_numerics.py [--quick] [--markdown]

Every variant is FlashAttention-2's forward and backward with the inputs rounded to bf16 (what a
bf16 model hands the kernel) and each product either "16-bit" (operands rounded to bf16, exact
accumulation: the 16-bit kernels' fp32 accumulators are far finer than bf16) or int8 (operands
quantised as named, integer codes multiplied exactly, i.e. an int32 accumulator). The forward's
output P V is stored in bf16, as a kernel stores it. Errors are relative Frobenius norms against the
exact gradient of exact attention (fp64, unrounded inputs), so the bf16 backward's own error is
the first row and every other row says how much a choice adds.

Granularities (the reduced axis of each product decides what an int8 MMA tile allows: one scale
may vary along the output's rows and columns, not along the reduced axis within a tile, and the
tile is the format's 64):
  Q, K      per 64-row block (the forward's codes; K smoothed by its mean; "balanced": Q / b and
            K * b per channel, b a power of two, leanops.quant.int8.qk_stats)
  dO, V     "block": per 64-row block;  "token": per row (only for dP, reduced over D)
  P, dS     "row": per row per 64 entries of the reduced axis;  "tile": per 64 x 64 tile;
            "static": P on the fixed grid 1/127 (P <= 1)
The row "leanops" is leanops.ops.int8_attention.reference_attention_int8_bwd evaluated in fp64
(the script checks that it equals its simulation here, so the table describes what ships).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch
from leanops.ops import int8_attention as I
from leanops.quant import int8 as F

F64 = torch.float64
BLOCK = F.QK_BLOCK


def bf16(x):
    return x.to(torch.bfloat16).to(F64)


def per_block(x):
    """x [..., S, D] on the int8 grid, one scale per 64 rows (over all of D)."""
    *lead, s, d = x.shape
    nb = (s + BLOCK - 1) // BLOCK
    xb = torch.nn.functional.pad(x, (0, 0, 0, nb * BLOCK - s)).reshape(*lead, nb, BLOCK * d)
    sc = (xb.abs().amax(-1, keepdim=True) / 127).clamp_min(F.FP32_TINY)
    return (torch.round(xb / sc).clamp(-127, 127) * sc).reshape(*lead, nb * BLOCK, d)[..., :s, :]


def per_token(x):
    sc = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(F.FP32_TINY)
    return torch.round(x / sc).clamp(-127, 127) * sc


def row_tiles(x, gran):
    """x [..., R, C] reduced over C, on the int8 grid of granularity `gran`."""
    if gran == "row":
        return F.fake_quantize_row_tiles(x)
    if gran == "static":
        return torch.round(x * 127).clamp(-127, 127) / 127
    *lead, r, c = x.shape  # "tile": one scale per 64 x 64 tile
    rb, cb = (r + BLOCK - 1) // BLOCK, (c + BLOCK - 1) // BLOCK
    xp = torch.nn.functional.pad(x, (0, cb * BLOCK - c, 0, rb * BLOCK - r))
    t = xp.reshape(*lead, rb, BLOCK, cb, BLOCK)
    sc = (t.abs().amax(dim=(-3, -1), keepdim=True) / 127).clamp_min(F.FP32_TINY)
    return (torch.round(t / sc).clamp(-127, 127) * sc).reshape(*lead, rb * BLOCK, cb * BLOCK)[..., :r, :c]


def exact_grads(q, k, v, do, mask, scale):
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    p = torch.softmax(s, -1)
    o = p @ v
    ds = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    return ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ do


def simulate(q, k, v, do, mask, scale, cfg):
    """(dq, dk, dv) of one variant. cfg: fwd "16" | "int8" | "int8-unbalanced"; S, dP, dV, dQ,
    dK: "16" or a granularity (S: "int8" = the forward's codes)."""
    q, k, v, do = (bf16(t) for t in (q, k, v, do))
    bal = torch.ones(q.shape[:-2] + (1, q.shape[-1]), dtype=F64)
    if cfg["fwd"] == "16":
        qd, kd = q, k
    elif cfg["fwd"] == "int8":  # leanops' format, computed as leanops computes it (fp32)
        c = F.quantize_qk(q.to(torch.bfloat16), k.to(torch.bfloat16), True)
        qd, kd = (F.dequantize_qk(x, sc).double() for x, sc in ((c.q_codes, c.q_scale),
                                                                  (c.k_codes, c.k_scale)))
        bal = c.balance.double()[:, :, None]
    else:
        mean, _ = F.qk_stats(q, k, True)
        qd, kd = per_block(q), per_block(k - mean.double()[:, :, None])
    s = (qd @ kd.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse)
    o = bf16(p @ v)  # the forward's output, stored in bf16
    if cfg["S"] == "16" and cfg["fwd"] != "16":  # 16-bit S against the int8 forward's lse
        p = torch.exp((q @ k.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf) - lse)
    delta = (do * o).sum(-1, keepdim=True)
    g = cfg["dP"]
    dp = do @ v.transpose(-1, -2) if g == "16" else (
        {"block": per_block, "token": per_token}[g](do) @ {"block": per_block, "token": per_token}[g](v).transpose(-1, -2))
    g = cfg["dV"]
    pt = p.transpose(-1, -2)
    dv = bf16(pt) @ do if g == "16" else row_tiles(pt, g) @ F.dequantize_qk(
        *F.quantize_blocks(do.to(torch.bfloat16))).double()
    ds = p * (dp - delta)
    g = cfg["dQ"]
    dq = bf16(ds) @ k * scale if g == "16" else row_tiles(ds, g) @ kd * scale / bal
    g = cfg["dK"]
    dst = ds.transpose(-1, -2)
    dk = bf16(dst) @ q * scale if g == "16" else row_tiles(dst, g) @ qd * scale * bal
    return dq, dk, dv


def v(fwd="int8", S="int8", dP="16", dV="16", dQ="16", dK="16"):
    return dict(fwd=fwd, S=S, dP=dP, dV=dV, dQ=dQ, dK=dK)


CHOSEN = v(dV="row", dQ="row", dK="row")
VARIANTS = {
    "bf16 backward (leanops.attention)": v(fwd="16", S="16"),
    "int8 fwd, S recomputed in 16 bits": v(S="16"),
    "int8 fwd, S int8, rest 16-bit": v(),
    "+ dP int8 (dO, V per block)": v(dP="block"),
    "+ dP int8 (dO, V per token)": v(dP="token"),
    "+ dV int8 (P per row tile)": v(dV="row"),
    "+ dV int8 (P per 64x64 tile)": v(dV="tile"),
    "+ dV int8 (P static 1/127)": v(dV="static"),
    "+ dQ int8 (dS per row tile)": v(dQ="row"),
    "+ dQ int8 (dS per 64x64 tile)": v(dQ="tile"),
    "+ dK int8 (dS per row tile)": v(dK="row"),
    "+ dK int8 (dS per 64x64 tile)": v(dK="tile"),
    "leanops: S, dV, dQ, dK int8 (row), dP 16-bit": CHOSEN,
    "  the same without the Q/K balance": dict(CHOSEN, fwd="int8-unbalanced"),
    "all five int8 (dP per token)": v(dP="token", dV="row", dQ="row", dK="row"),
}


def inputs(kind, h, s, d, gen):
    q, k, v, do = (torch.randn(1, h, s, d, generator=gen, dtype=F64) for _ in range(4))
    if kind == "outliers":  # 4 channels of Q and 4 others of K x50
        ch = torch.randperm(d, generator=gen)[:8]
        q[..., ch[:4]] *= 50
        k[..., ch[4:]] *= 50
    elif kind == "k-offset":  # a per-channel offset shared by every key (what smoothing removes)
        k = k + 3 * torch.randn(1, h, 1, d, generator=gen, dtype=F64)
    return q, k, v, do


def check_chosen_is_leanops(q, k, v, do, causal, scale, got):
    """The CHOSEN simulation equals leanops' reference definition evaluated in fp64."""
    q16, k16, v16, do16 = (t.to(torch.bfloat16) for t in (q, k, v, do))
    wr = 0 if causal else -1
    o, lse = I.reference_attention_int8(q16, k16, v16, None, None, None, scale, -1, wr, 0.0, True,
                                        F64)
    want = I.reference_attention_int8_bwd(do16, q16, k16, v16, o.to(torch.bfloat16), lse, None,
                                          None, None, scale, -1, wr, 0.0, True, F64)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def run(kind, s, d, h, causal, markdown):
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = inputs(kind, h, s, d, gen)
    mask = torch.ones(s, s, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    scale = d**-0.5
    ref = exact_grads(q, k, v, do, mask, scale)
    title = f"{kind}, B=1 H={h} S={s} D={d}, {'causal' if causal else 'full'}"
    if markdown:
        print(f"\n{title}\n\n| variant | dQ % | dK % | dV % |\n|---|---|---|---|")
    else:
        print(f"\n## {title}")
    base = None
    for name, cfg in VARIANTS.items():
        g = simulate(q, k, v, do, mask, scale, cfg)
        if cfg is CHOSEN:
            check_chosen_is_leanops(q, k, v, do, causal, scale, g)
        e = [rel(a, b) for a, b in zip(g, ref, strict=True)]
        base = base or e
        cells = [f"{x * 100:.3g} ({x / b:.1f}x)" for x, b in zip(e, base, strict=True)]
        print(f"| {name} | " + " | ".join(cells) + " |" if markdown else f"{name:48s} " + "  ".join(cells))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="S = 256 only (seconds)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        plan = [("gaussian", 256, 64, 2, c) for c in (False, True)]
    else:
        plan = [("gaussian", 1024, 64, 2, c) for c in (False, True)]
        plan += [("gaussian", 4096, 128, 1, c) for c in (False, True)]
        plan += [(kind, 1024, 64, 2, c) for kind, c in itertools.product(("k-offset", "outliers"), (False, True))]
    start = time.time()
    for case in plan:
        run(*case, args.markdown)
    print(f"\n({time.time() - start:.0f} s; relative Frobenius error vs exact fp64 gradients, "
          "in parentheses the ratio to the bf16 backward's)")


if __name__ == "__main__":
    main()
