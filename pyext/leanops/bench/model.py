"""Model-level comparison: the built-in TinyLlama dense vs quantised, on size, output error and
(on a GPU) prefill/decode speed and energy per token. `leanops demo` prints this."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

import leanops
from leanops.bench.energy import EnergyResult, measure_energy, measure_idle_power, meter_for
from leanops.bench.timing import time_fn
from leanops.models import tiny_llama
from leanops.quant import sqnr_db

VARIANTS = {
    "dense": None,
    "int8 dynamic + SmoothQuant": leanops.Int8DynamicConfig(smoothquant_alpha=0.5),
    "int8 weight-only": leanops.Int8WeightOnlyConfig(),
    "int4 weight-only g128": leanops.Int4WeightOnlyConfig(group_size=128),
}


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the state_dict (shared tensors counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def run_model_comparison(
    preset: str = "demo",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    variants: dict | None = None,
    prefill_shape: tuple[int, int] | None = None,
    energy: bool = True,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    variants = VARIANTS if variants is None else variants
    # A GPU needs a real prompt to be busy; the CPU reference path only needs to show the numbers.
    prefill_shape = prefill_shape or ((4, 256) if device.type == "cuda" else (1, 64))
    dense = tiny_llama(preset, dtype=dtype, device=device)
    vocab = dense.config.vocab_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    calib = torch.randint(0, vocab, prefill_shape, generator=gen).to(device)
    prompt = torch.randint(0, vocab, prefill_shape, generator=gen).to(device)
    step = torch.randint(0, vocab, (1, 1), generator=gen).to(device)  # one decode step, batch 1
    prefill_tokens = prompt.numel()

    meter, reason, idle_w = None, None, None
    if energy:
        meter, reason = meter_for(device)
        if meter is not None:
            idle_w = measure_idle_power(device, meter, seconds=2.0)

    def joules(fn):
        if meter is None:
            return EnergyResult.unavailable(reason)
        return measure_energy(fn, device, meter, idle_power_w=idle_w)

    rows = []
    with torch.no_grad():
        reference = dense(prompt).float()
        for name, config in variants.items():
            model = copy.deepcopy(dense)
            if config is not None:
                logging.getLogger("leanops").setLevel(logging.ERROR)  # demo: no per-layer chatter
                leanops.quantize_(model, config, calibrate=lambda m: m(calib))
            logits = model(prompt).float()
            row = {
                "variant": name,
                "state_mb": state_bytes(model) / 1e6,
                "logits_sqnr_db": sqnr_db(reference, logits) if config is not None else None,
                "logits_cosine": (
                    F.cosine_similarity(reference.double().flatten(), logits.double().flatten(), dim=0).item()
                    if config is not None else None
                ),
            }
            prefill = time_fn(lambda: model(prompt), device)
            decode = time_fn(lambda: model(step), device)
            row["prefill_ms"] = prefill.median_ms
            row["prefill_tok_s"] = prefill_tokens / (prefill.median_ms * 1e-3)
            row["decode_ms"] = decode.median_ms
            row["decode_tok_s"] = 1 / (decode.median_ms * 1e-3)
            if energy:
                e_pre = joules(lambda: model(prompt))
                e_dec = joules(lambda: model(step))
                row["prefill_j_per_tok"] = (
                    None if e_pre.joules_per_call is None else e_pre.joules_per_call / prefill_tokens
                )
                row["decode_j_per_tok"] = e_dec.joules_per_call
                row["energy_source"] = e_pre.source
                row["energy_reason"] = e_pre.reason
            rows.append(row)
            progress(f"  {name}: done")

    base = rows[0]
    for row in rows:
        row["size_x"] = base["state_mb"] / row["state_mb"]
        row["prefill_x"] = base["prefill_ms"] / row["prefill_ms"]
        row["decode_x"] = base["decode_ms"] / row["decode_ms"]
        for key in ("prefill_j_per_tok", "decode_j_per_tok"):
            if row.get(key) and base.get(key):
                row[key.replace("_j_per_tok", "_energy_x")] = base[key] / row[key]
    return rows
