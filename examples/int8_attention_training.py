"""Training with int8 attention: a small Llama-style model trained from scratch twice, once with
leanops.attention (16-bit) and once with leanops.attention_int8 (int8 Q.K^T forward, int8 dV /
dQ / dK backward), same initial weights, same seed, same batches; the held-out loss of both and
their curves.

    python examples/int8_attention_training.py [--steps 300] [--plot PNG] [--json FILE]
    python examples/int8_attention_training.py --steps 40 --seeds 0,1,2,3,4   # the spread
    python examples/int8_attention_training.py --bench [--embed 2048 --heads 16 --seq 4096]  # GPU

--bench times one training step (forward + backward, no optimizer) of an attention block,
leanops.nn.MultiheadAttention (bf16, self-attention, causal) with int8=True against int8=False
(16-bit Triton attention) and torch.nn.MultiheadAttention (SDPA), and reads the energy per step
from NVML where it can. GPU only; the goal (bench/NOTES.md) is >= 1.2x the 16-bit block.

Data: the Python standard library's own top-level source files (every machine with Python has
them; their content depends on the Python version, printed with the results), byte-level
(vocabulary 256); the last 5% of the bytes (the last files in name order) are held out.
Model: leanops.models.TinyLlama, 2 blocks 128 wide, 2 heads of head dim 64, causal, RoPE,
PyTorch's default initialisation. The attention inputs are cast to bf16 for both runs (what a
bf16 model hands the kernels). On a CPU, leanops.attention runs its CPU path (PyTorch's CPU
flash kernels: the definition's math, P rounded to bf16 as in the Triton kernels) and
attention_int8 its PyTorch reference, which computes exactly the int8 numerics of the Triton
kernels (same codes and scales; leanops.ops.int8_attention), so a CPU run is a valid parity
check of what a GPU trains with.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import pathlib
import sys
import sysconfig
import time

import leanops
import torch
import torch.nn.functional as F
from leanops.models import TinyLlama, TinyLlamaConfig, set_attention_fn

CONFIG = TinyLlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=2, hidden_dim=384,
                         max_seq_len=256)


def stdlib_bytes() -> tuple[torch.Tensor, str]:
    """(bytes of the standard library's top-level *.py files in name order, a description)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    data = b"\n".join(f.read_bytes() for f in files)
    about = (f"Python {sys.version.split()[0]} standard library: {len(files)} files, "
             f"{len(data) / 1e6:.2f} MB")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), about


def _lr(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def attention_fn(int8: bool):
    """The attention fn(q, k, v, causal) of the runs: inputs cast to bf16, leanops.attention or
    leanops.attention_int8, output cast back."""
    op = leanops.attention_int8 if int8 else leanops.attention

    def fn(q, k, v, causal):
        dtype = q.dtype
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        return op(q, k, v, causal=causal).to(dtype)

    return fn


def train_models(attention_fns, steps=300, batch=16, seq=128, lr=2e-3, seed=0, every=25,
                 eval_chunks=64, data=None, progress=print, keep_models=False):
    """Train one TinyLlama per entry of `attention_fns` ({name: fn(q, k, v, causal)}), all from
    the same initial weights on the same batches. Returns {"steps": [...], "train":
    {name: [...]}, "held_out": {name: [...]}} (mean training loss over each `every` steps, and
    the held-out loss at those steps) and "final" {name: last held-out loss}; with keep_models
    also "models" {name: trained model} and "initial" (the common initial model)."""
    if data is None:
        data, _ = stdlib_bytes()
    split = int(len(data) * 0.95)
    train, held = data[:split], data[split:]
    n = min(eval_chunks, (len(held) - 1) // (seq + 1))
    held_batch = torch.stack([held[i * (seq + 1) : (i + 1) * (seq + 1)] for i in range(n)])
    torch.manual_seed(seed)
    base = TinyLlama(CONFIG)
    models = {name: copy.deepcopy(base) for name in attention_fns}
    for name, model in models.items():
        set_attention_fn(model, attention_fns[name])
        model.train()
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
            for k, m in models.items()}
    gen = torch.Generator().manual_seed(seed)
    out = {"steps": [], "train": {k: [] for k in models}, "held_out": {k: [] for k in models}}
    running = {k: 0.0 for k in models}

    def loss_of(model, tokens):
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    start = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        tokens = torch.stack([train[s : s + seq + 1] for s in starts])
        for k, model in models.items():
            for group in opts[k].param_groups:
                group["lr"] = _lr(step, steps, lr, max(1, steps // 10))
            loss = loss_of(model, tokens)
            opts[k].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[k].step()
            running[k] += loss.item()
        if (step + 1) % every == 0 or step + 1 == steps:
            count = (step % every) + 1
            out["steps"].append(step + 1)
            with torch.no_grad():
                for k, model in models.items():
                    out["train"][k].append(running[k] / count)
                    out["held_out"][k].append(loss_of(model.eval(), held_batch).item())
                    model.train()
                    running[k] = 0.0
            progress(f"step {step + 1}/{steps} ({time.time() - start:.0f} s): " + ", ".join(
                f"{k} train {out['train'][k][-1]:.4f} held-out {out['held_out'][k][-1]:.4f}"
                for k in models))
    out["final"] = {k: out["held_out"][k][-1] for k in models}
    if keep_models:
        out["models"], out["initial"] = models, base
    return out


def train_pair(steps=300, batch=16, seq=128, seed=0, every=25, data=None, progress=print):
    """train_models with leanops.attention ("16-bit") and leanops.attention_int8 ("int8"); adds
    "relative_gap": int8's final held-out loss / 16-bit's - 1."""
    out = train_models({"16-bit": attention_fn(False), "int8": attention_fn(True)}, steps, batch,
                       seq, seed=seed, every=every, data=data, progress=progress)
    out["relative_gap"] = out["final"]["int8"] / out["final"]["16-bit"] - 1
    return out


def plot(result, path):
    """Both runs' training and held-out loss curves, and their relative difference, to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for name, color in (("16-bit", "tab:blue"), ("int8", "tab:orange")):
        ax.plot(result["steps"], result["train"][name], color=color, alpha=0.55,
                label=f"{name} attention, training")
        ax.plot(result["steps"], result["held_out"][name], color=color, linestyle="--",
                label=f"{name} attention, held-out ({result['final'][name]:.4f})")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / byte)")
    ax.set_title("TinyLlama from scratch on the Python stdlib", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for kind, style in (("train", "-"), ("held_out", "--")):
        rel = [(i / b - 1) * 100 for i, b in zip(result[kind]["int8"], result[kind]["16-bit"],
                                                  strict=True)]
        dx.plot(result["steps"], rel, color="tab:orange", linestyle=style,
                label="training" if kind == "train" else "held-out")
    dx.axhline(0, color="gray", linewidth=0.8)
    dx.set_xlabel("step")
    dx.set_ylabel("int8 / 16-bit - 1 (%)")
    dx.set_title(f"int8 attention vs 16-bit: held-out {result['relative_gap'] * 100:+.3f}% at the end",
                 fontsize=9)
    dx.legend(fontsize=7)
    dx.grid(alpha=0.3)
    fig.text(0.01, 0.01, result["about"], fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_block(embed=2048, heads=16, seq=4096, batch=2, energy=True):
    """Median ms (and J) of forward + backward of a causal self-attention block in bf16:
    torch.nn.MultiheadAttention (SDPA) vs leanops.nn.MultiheadAttention, 16-bit and int8."""
    from leanops.bench.energy import energy_fields
    from leanops.bench.timing import time_fn
    from torch import nn

    device = torch.device("cuda")
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed, heads, batch_first=True, device=device, dtype=torch.bfloat16)
    blocks = {"torch MHA (SDPA)": ref,
              "leanops MHA 16-bit": leanops.nn.MultiheadAttention.from_torch(ref),
              "leanops MHA int8": leanops.nn.MultiheadAttention.from_torch(ref, int8=True)}
    x = torch.randn(batch, seq, embed, device=device, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    mask = nn.Transformer.generate_square_subsequent_mask(seq, device=device, dtype=torch.bfloat16)
    rows = {}
    for name, block in blocks.items():
        def step(block=block):
            x.grad = None
            for p in block.parameters():
                p.grad = None
            out, _ = block(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)
            out.backward(dy)
        row = {"ms": time_fn(step, device, warmup_ms=200, rep_ms=1000).median_ms}
        if energy:
            row.update(energy_fields(step, device))
        rows[name] = row
    for name in blocks:
        rows[name]["speedup_vs_16bit"] = rows["leanops MHA 16-bit"]["ms"] / rows[name]["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=None, help="default 16 (training), 2 (--bench)")
    parser.add_argument("--seq", type=int, default=None, help="default 128 (training), 4096 (--bench)")
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--seeds", default="0", help="comma list: one run pair per seed")
    parser.add_argument("--plot", default=None, help="PNG of the first seed's curves")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--bench", action="store_true", help="time an attention block (GPU)")
    parser.add_argument("--embed", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--no-energy", action="store_true")
    args = parser.parse_args(argv)
    if args.bench:
        if not torch.cuda.is_available():
            parser.error("--bench needs a CUDA GPU")
        out = bench_block(args.embed, args.heads, args.seq or 4096, args.batch or 2,
                          energy=not args.no_energy)
        print(json.dumps(out, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)
        return out
    torch.set_num_threads(args.threads)
    data, about = stdlib_bytes()
    print(about)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = train_pair(args.steps, args.batch or 16, args.seq or 128, seed=seed, every=args.every,
                       data=data)
        r["about"], r["seed"] = about, seed
        results.append(r)
        print(f"seed {seed}: held-out 16-bit {r['final']['16-bit']:.4f}, int8 "
              f"{r['final']['int8']:.4f}, int8 / 16-bit - 1 = {r['relative_gap'] * 100:+.3f}%")
    if args.plot:
        plot(results[0], args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
