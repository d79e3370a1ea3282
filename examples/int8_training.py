"""Int8 training (SwitchBack) with leanops: a loss curve against 16-bit training, and the speed of
a Llama MLP block's training step on a GPU.

    leanops.quantize_(model, leanops.Int8TrainingConfig())   # int8 forward + grad-input matmuls

  curve   trains the built-in TinyLlama ("test" preset: 2 blocks, 128 wide) from its random
          initialisation as a byte-level language model on real text (the prose of the Python
          documentation, pydoc_data.topics, shipped with every Python), dense and int8, same
          data order, and prints both losses every --every steps (held-out loss at the end).
  bench   times one training step (forward, backward, no optimizer) of a Llama SwiGLU MLP block
          (gate/up/down projections, dim x hidden, tokens = batch x sequence), bf16 F.linear
          (cuBLAS) against Int8TrainingLinear (Triton int8 kernels), and reads the energy per step
          from NVML where it can. GPU only. The target is >= 1.2x at Llama-7B/8B sizes on an H100.

    python examples/int8_training.py curve [--steps 300] [--device cpu]     # ~4 min on one CPU core
    python examples/int8_training.py bench [--dim 4096 --hidden 14336 --tokens 8192]
"""

from __future__ import annotations

import argparse
import copy
import json

import leanops
import torch
import torch.nn.functional as F
from torch import nn


def text_bytes() -> torch.Tensor:
    """The Python documentation's prose (pydoc_data.topics) as a byte tensor."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def loss_curve(steps=300, batch=16, seq=128, lr=1e-3, every=25, device="cpu", dtype=torch.float32,
               progress=print):
    """Train dense and int8 TinyLlamas on the same batches; return {"dense": [...], "int8": [...],
    "held_out": {...}} with the mean training loss over each `every` steps."""
    from leanops.models import tiny_llama

    data = text_bytes()
    split = int(len(data) * 0.95)
    train, held_out = data[:split], data[split:]
    dense = tiny_llama("test", seed=0, dtype=dtype, device=device)
    int8 = leanops.quantize_(copy.deepcopy(dense), leanops.Int8TrainingConfig())
    models = {"dense": dense, "int8": int8}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01) for k, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    curves = {k: [] for k in models}
    running = {k: 0.0 for k in models}

    def lm_loss(model, tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        tokens = torch.stack([train[s:s + seq + 1] for s in starts]).to(device)
        for k, model in models.items():
            loss = lm_loss(model, tokens)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            running[k] += loss.item()
        if step % every == 0:
            for k in models:
                curves[k].append(running[k] / every)
                running[k] = 0.0
            progress(f"step {step}: " + ", ".join(f"{k} {curves[k][-1]:.4f}" for k in models))
    with torch.no_grad():
        n = min(64, (len(held_out) - 1) // seq)
        tokens = held_out[: n * seq + 1]
        chunks = torch.stack([tokens[i * seq: i * seq + seq + 1] for i in range(n)]).to(device)
        curves["held_out"] = {k: lm_loss(m, chunks).item() for k, m in models.items()}
    return curves


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, dtype, device):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, **kw), nn.Linear(dim, hidden, **kw)
        self.down_proj = nn.Linear(hidden, dim, **kw)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def bench_mlp(dim=4096, hidden=14336, tokens=8192, dtype=torch.bfloat16, energy=True):
    """Median ms (and J) of one forward + backward of a SwiGLU MLP, bf16 vs int8 training."""
    from leanops.bench.energy import energy_fields
    from leanops.bench.timing import time_fn

    device = torch.device("cuda")
    torch.manual_seed(0)
    dense = SwiGLU(dim, hidden, dtype, device)
    int8 = leanops.quantize_(copy.deepcopy(dense), leanops.Int8TrainingConfig())
    x = torch.randn(tokens, dim, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, dim, dtype=dtype, device=device)
    rows = {}
    for name, model in (("bf16 F.linear", dense), ("int8 training", int8)):
        def step(model=model):
            x.grad = None
            for p in model.parameters():
                p.grad = None
            model(x).backward(dy)
        row = {"ms": time_fn(step, device, warmup_ms=200, rep_ms=1000).median_ms}
        if energy:
            row.update(energy_fields(step, device))
        rows[name] = row
    rows["speedup"] = rows["bf16 F.linear"]["ms"] / rows["int8 training"]["ms"]
    flops = 3 * 2 * 3 * tokens * dim * hidden  # 3 matmuls fwd, x3 for fwd + 2 bwd
    for name in ("bf16 F.linear", "int8 training"):
        rows[name]["tflops"] = flops / rows[name]["ms"] / 1e9
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curve")
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--every", type=int, default=25)
    c.add_argument("--device", default="cpu")
    c.add_argument("--dtype", default="float32")
    b = sub.add_parser("bench")
    b.add_argument("--dim", type=int, default=4096)
    b.add_argument("--hidden", type=int, default=14336)
    b.add_argument("--tokens", type=int, default=8192)
    b.add_argument("--no-energy", action="store_true")
    for p in (c, b):
        p.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "curve":
        out = loss_curve(args.steps, every=args.every, device=args.device, dtype=getattr(torch, args.dtype))
        print("held-out loss:", out["held_out"])
    else:
        if not torch.cuda.is_available():
            parser.error("bench needs a CUDA GPU")
        out = bench_mlp(args.dim, args.hidden, args.tokens, energy=not args.no_energy)
        print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
