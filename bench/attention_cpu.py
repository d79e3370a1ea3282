"""Attention on CPU tensors: leanops' CPU path (what CPU tensors get, PyTorch's CPU flash-attention
kernels) against the reference it replaced (use_backend("reference"): the definition, which
materialises [B, H, Sq, Sk] in fp32) and against F.scaled_dot_product_attention, in one process.

Time: each round runs every contender once, in turn (interleaved, so a noisy shared machine
slows all alike); the median over rounds is reported, with the min and max. Threads: 1, then all
(torch.get_num_threads() at start). Peak memory: for each (contender, case) a fresh subprocess
makes the inputs and runs the call once (thread pools, libraries), then resets the kernel's
peak-RSS mark (/proc/self/clear_refs), runs it again and reports how far its peak RSS (VmHWM)
rose above the RSS before that call (Linux only).

    python bench/attention_cpu.py                  # the table in bench/NOTES.md
    python bench/attention_cpu.py --rounds 3 --seqlen 2048 --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import leanops
import torch
import torch.nn.functional as F

# "fwd" / "fwd+bwd": causal self-attention of q, k, v [B, H, S, D]; "decode": one new token
# against a dense KV cache of length S (32 query heads, 8 kv heads, D = 128)
B, H, D = 1, 4, 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cases(seqlens, dtypes):
    """(name, kind, S, dtype name): fp32 at every length, the other dtypes at the middle one,
    one forward+backward at the shortest, decode at two cache lengths."""
    mid, s0 = sorted(seqlens)[len(seqlens) // 2], min(seqlens)
    out = [(f"fwd causal S={s} fp32", "fwd", s, "fp32") for s in seqlens]
    out += [(f"fwd causal S={mid} {d}", "fwd", mid, d) for d in dtypes if d != "fp32"]
    out.append((f"fwd+bwd causal S={s0} fp32", "fwd+bwd", s0, "fp32"))
    out += [(f"decode GQA 32:8 D=128 L={s} fp32", "decode", s, "fp32") for s in (8192, 32768)]
    return out


def make_inputs(kind, s, dtype_name):
    dtype = DTYPES[dtype_name]
    if kind == "decode":
        q = torch.randn(1, 32, 1, 128, dtype=dtype)
        k, v = (torch.randn(1, 8, s, 128, dtype=dtype) for _ in range(2))
        return q, k, v
    grad = kind == "fwd+bwd"
    return tuple(torch.randn(B, H, s, D, dtype=dtype, requires_grad=grad) for _ in range(3))


def contenders(kind):
    """name -> fn(q, k, v): the call timed (with its backward for "fwd+bwd")."""
    if kind == "decode":
        def ours(q, k, v):
            return leanops.attention_decode(q, k, v)

        def sdpa(q, k, v):  # one query sees every key: no mask; SDPA's own GQA
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    else:
        def ours(q, k, v):
            return leanops.attention(q, k, v, causal=True)

        def sdpa(q, k, v):  # Sq = Sk: is_causal is leanops' causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def run(fn, backend=None):
        def call(q, k, v):
            with leanops.use_backend(backend), torch.set_grad_enabled(kind == "fwd+bwd"):
                out = fn(q, k, v)
                if kind == "fwd+bwd":  # the backward inside the forced backend too
                    out.backward(torch.ones_like(out))
            return out
        return call

    return {"leanops cpu path": run(ours), "reference (before)": run(ours, "reference"),
            "torch sdpa": run(sdpa)}


def time_case(kind, s, dtype_name, rounds, threads):
    torch.set_num_threads(threads)
    inputs = make_inputs(kind, s, dtype_name)
    fns = contenders(kind)
    for fn in fns.values():  # warm-up
        fn(*inputs)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(*inputs)
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)}
            for name, t in times.items()}


def peak_memory(kind, s, dtype_name, contender):
    """Peak RSS growth (bytes) of one call over the resident inputs, in a fresh process after a
    first call: the kernel's high-water mark (VmHWM) is reset to the current RSS just before."""
    code = (
        f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
        "import attention_cpu as A\n"
        f"x = A.make_inputs({kind!r}, {s}, {dtype_name!r})\n"
        f"fn = A.contenders({kind!r})[{contender!r}]\n"
        "fn(*x)\n"  # once first: thread pools, libraries and one-time buffers are not the call's
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = A.status_kib('VmRSS')\n"
        "fn(*x)\n"
        "print(A.status_kib('VmHWM') - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def status_kib(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqlen", default="2048,4096,8192")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    all_threads = torch.get_num_threads()
    seqlens = [int(x) for x in args.seqlen.split(",")]
    dtypes = args.dtypes.split(",")
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads_all": all_threads, "rounds": args.rounds, "isa": torch.backends.cpu.get_cpu_capability()}
    with open("/proc/cpuinfo") as f:
        meta["cpu"] = next((line.split(":", 1)[1].strip() for line in f if "model name" in line),
                           meta["cpu"])
    rows = []
    for name, kind, s, dt in cases(seqlens, dtypes):
        row = {"case": name}
        for threads in sorted({1, all_threads}):
            t = time_case(kind, s, dt, args.rounds, threads)
            row[f"threads={threads}"] = t
            ref, ours = t["reference (before)"]["median_s"], t["leanops cpu path"]["median_s"]
            print(f"{name:38s} threads={threads}: " + "  ".join(
                f"{k} {v['median_s'] * 1e3:9.2f} ms [{v['min_s'] * 1e3:.2f}-{v['max_s'] * 1e3:.2f}]"
                for k, v in t.items()) + f"  speed-up {ref / ours:.1f}x", flush=True)
        if not args.no_memory:
            row["peak_bytes"] = {c: peak_memory(kind, s, dt, c) for c in contenders(kind)}
            print(f"{name:38s} peak RSS growth: " + "  ".join(
                f"{k} {v / 2**20:.1f} MiB" for k, v in row["peak_bytes"].items()), flush=True)
        rows.append(row)
    torch.set_num_threads(all_threads)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
