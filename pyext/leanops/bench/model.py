"""The model-level suite: the built-in models (random weights, no download) dense vs quantised vs
2:4 sparse vs fused attention, through the same runner as the kernel suites.

Models: "tiny-llama" (Llama-style decoder; rows for prefill of B x S tokens and for one decode
step of B tokens at context S with a KV cache) and "mini-encoder" (MiniLM-sized BERT encoder;
rows for one forward of B x S tokens). Per row: tokens/s, J/token, peak memory, state size, and
the output error against the dense model (SQNR dB and cosine of the logits, or of the last
hidden state for the encoder). `leanops demo` is the friendly front of the TinyLlama comparison
(`run_model_comparison`).

FLOPs per call: 2 x tokens x (sum of in x out over the linear layers) + attention
(4·B·H·Sq·Sk·D per layer, halved for a causal prefill). Minimum bytes: the variant's weights
(embedding tables excluded: a lookup reads B·S rows) read once, the KV cache read once (decode)
and the output written once.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import leanops
from leanops.api import log_level
from leanops.bench.runner import Case, Settings, run_cases
from leanops.models import mini_encoder, set_attention_fn, tiny_llama
from leanops.quant import sqnr_db


@dataclass(frozen=True)
class ModelSpec:
    build: Callable  # build(preset, dtype=..., device=...) -> model
    default_preset: str
    test_preset: str  # seconds on a CPU (--quick, tests)
    decoder: bool


MODELS = {
    "tiny-llama": ModelSpec(tiny_llama, "demo", "test", decoder=True),
    "mini-encoder": ModelSpec(mini_encoder, "minilm", "test", decoder=False),
}

VARIANTS = {
    "dense": None,
    "int8 dynamic + SmoothQuant": leanops.Int8DynamicConfig(smoothquant_alpha=0.5),
    "int8 weight-only": leanops.Int8WeightOnlyConfig(),
    "int4 weight-only g128": leanops.Int4WeightOnlyConfig(group_size=128),
    "int4 g128 AWQ+GPTQ": leanops.Int4WeightOnlyConfig(group_size=128, algorithm="awq+gptq"),
}
# Calibration batch of the variants whose algorithm needs data (GPTQ wants several tokens per
# input channel): 32 sequences of random tokens, as the prompt is, from its own seed.
CALIBRATION_SEQUENCES = 32
# Variants that need parts of leanops still being built: present when those exist.
SPARSE = "2:4 sparse (magnitude)"
FUSED_ATTENTION = "leanops fused attention"


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor in the state_dict (shared tensors counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _embedding_bytes(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size()
               for m in model.modules() if isinstance(m, torch.nn.Embedding))


def _linear_macs(model: torch.nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def all_variants() -> dict[str, tuple[Callable | None, str | None]]:
    """name -> (apply(model, calib) or None for dense, why the variant is unavailable)."""
    out = {}
    for name, config in VARIANTS.items():
        if config is None:
            out[name] = (None, None)
        elif getattr(config, "needs_calibration", False):
            out[name] = ((lambda model, calib, config=config:
                          leanops.quantize_(model, config, calibrate=lambda m: m(_more(calib, model)))), None)
        else:
            out[name] = ((lambda model, calib, config=config:
                          leanops.quantize_(model, config, calibrate=lambda m: m(calib))), None)
    if hasattr(leanops, "sparsify_"):
        # LLM pruning leaves the output head dense (leanops.sparsify_'s own advice).
        out[SPARSE] = ((lambda model, calib:
                        leanops.sparsify_(model, filter_fn=lambda m, name: name != "lm_head")), None)
    else:
        out[SPARSE] = (None, "leanops.sparsify_ does not exist yet")
    if hasattr(leanops, "attention"):
        def fused(model, calib):
            set_attention_fn(model, lambda q, k, v, causal: leanops.attention(q, k, v, causal=causal))
        out[FUSED_ATTENTION] = (fused, None)
    else:
        out[FUSED_ATTENTION] = (None, "leanops.attention (fused attention, issue 5) does not exist yet")
    return out


def _more(calib: torch.Tensor, model) -> torch.Tensor:
    """CALIBRATION_SEQUENCES sequences of random tokens shaped like calib's (seed 1)."""
    gen = torch.Generator().manual_seed(1)
    shape = (CALIBRATION_SEQUENCES, calib.shape[1])
    return torch.randint(0, model.config.vocab_size, shape, generator=gen).to(calib.device)


def _errors(reference: torch.Tensor, out: torch.Tensor) -> dict:
    ref, out = reference.double().flatten(), out.double().flatten()
    return {"output_sqnr_db": sqnr_db(ref, out),
            "output_cosine": F.cosine_similarity(ref, out, dim=0).item()}


def _copies(model):
    """make_inputs helper: the model itself first, deep copies after (input rotation)."""
    state = {"first": True}

    def get():
        if state["first"]:
            state["first"] = False
            return model
        return copy.deepcopy(model)
    return get


@torch.no_grad()
def _forward(model, tokens):
    return model(tokens)


@torch.no_grad()
def _decode_step(model, cache, step, pos):
    return model(step, kv_cache=cache, start_pos=pos)


def model_cases(model: str = "tiny-llama", preset: str | None = None, batch: int = 1, tokens: int | None = None,
                dtype: torch.dtype | None = None, device: torch.device | None = None,
                variants: list[str] | None = None, progress: Callable[[str], None] = print) -> list[Case]:
    """Cases for one built-in model: every variant's prefill (forward) and, for the decoder, one
    decode step; the dense variant is each group's baseline. Variants are built (quantised,
    pruned) here, and their output error against dense measured, before anything is timed."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    spec = MODELS[model]
    preset = preset or spec.default_preset
    available = all_variants()
    names = list(available) if variants is None else list(variants)
    unknown = set(names) - set(available)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(available)}")
    if "dense" not in names:
        names.insert(0, "dense")  # the baseline of every ratio
    names.sort(key=lambda n: n != "dense")

    dense = spec.build(preset, dtype=dtype, device=device)
    cfg = dense.config
    s = tokens or (256 if device.type == "cuda" else 64)
    limit = cfg.max_seq_len - (1 if spec.decoder else 0)
    if s > limit:
        raise ValueError(f"--tokens {s} is more than {model} '{preset}' takes ({limit}: max_seq_len "
                         f"{cfg.max_seq_len}{', one position kept for the decode step' if spec.decoder else ''})")
    b = batch
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, vocab, (b, s), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (b, s), generator=gen).to(device)
    step = torch.randint(0, vocab, (b, 1), generator=gen).to(device)
    head_dim = cfg.dim // cfg.n_heads
    act = torch.finfo(dtype).bits // 8
    macs = _linear_macs(dense)
    out_width = vocab if spec.decoder else cfg.dim
    prefill_flops = 2.0 * b * s * macs + cfg.n_layers * 4.0 * b * cfg.n_heads * s * s * head_dim * (0.5 if spec.decoder else 1.0)
    decode_flops = 2.0 * b * macs + cfg.n_layers * 4.0 * b * cfg.n_heads * (s + 1) * head_dim
    kv_bytes = 2 * cfg.n_layers * b * (s + 1) * cfg.dim * act

    def prefilled(m):
        cache = m.new_kv_cache(b, s + 1)
        _decode_step(m, cache, prompt, 0)
        return cache

    with torch.no_grad():
        ref_prefill = dense(prompt).float()
        ref_decode = _decode_step(dense, prefilled(dense), step, s).float() if spec.decoder else None
    dense_bytes = state_bytes(dense)
    rate16 = "fp16" if dtype == torch.float16 else "bf16" if dtype == torch.bfloat16 else None
    phase = "prefill" if spec.decoder else "forward"
    cases = []
    for name in names:
        apply, why = available[name]
        common = dict(suite="model", provider=name, backend=None, dtype=dtype, baseline=name == "dense",
                      fn=_forward)
        prefill_dims, decode_dims = {"B": b, "S": s}, {"B": b, "S": s}
        if why is not None:
            cases.append(Case(op=f"{model} {phase}", dims=prefill_dims, flops=prefill_flops, min_bytes=0,
                              rate=None, make_inputs=tuple, skip=why, **common))
            continue
        variant = copy.deepcopy(dense)
        if apply is not None:
            try:
                with log_level(logging.ERROR):  # no per-layer chatter in a benchmark table
                    apply(variant, calib)
            except Exception as exc:
                cases.append(Case(op=f"{model} {phase}", dims=prefill_dims, flops=prefill_flops, min_bytes=0,
                                  rate=None, make_inputs=tuple, skip=f"variant could not be built: "
                                  f"{type(exc).__name__}: {exc}", **common))
                continue
        weights = state_bytes(variant) - _embedding_bytes(variant)
        info = {"model": model, "preset": preset, "variant": name, "state_mb": state_bytes(variant) / 1e6,
                "size_x": dense_bytes / state_bytes(variant),
                "output": "logits" if spec.decoder else "last hidden state"}
        rate = "int8" if name.startswith("int8 dynamic") else rate16
        with torch.no_grad():
            pre_err = _errors(ref_prefill, variant(prompt).float()) if name != "dense" else {
                "output_sqnr_db": None, "output_cosine": None}
        get = _copies(variant)
        cases.append(Case(op=f"{model} {phase}", dims=prefill_dims, flops=prefill_flops,
                          min_bytes=weights + b * s * out_width * act, rate=rate,
                          make_inputs=lambda get=get: (get(), prompt), tokens=b * s,
                          family=f"{model} {phase}", extra={**info, **pre_err}, **common))
        if spec.decoder:
            with torch.no_grad():
                dec_err = _errors(ref_decode, _decode_step(variant, prefilled(variant), step, s).float()) \
                    if name != "dense" else {"output_sqnr_db": None, "output_cosine": None}
            get_dec = _copies(variant)

            def make_decode(get=get_dec):
                m = get()
                return (m, prefilled(m), step, s)
            cases.append(Case(op=f"{model} decode", dims=decode_dims, flops=decode_flops,
                              min_bytes=weights + kv_bytes + b * out_width * act, rate=rate,
                              make_inputs=make_decode, tokens=b, small=True, family=f"{model} decode",
                              extra={**info, **dec_err}, **{**common, "fn": _decode_step}))
        progress(f"  built {model} '{preset}' {name}")
    return cases


def run_model_comparison(
    preset: str = "demo",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    variants: list[str] | None = None,
    prefill_shape: tuple[int, int] | None = None,
    energy: bool = True,
    progress: Callable[[str], None] = print,
    settings: Settings | None = None,
    rounds: int = 1,
) -> list[dict]:
    """TinyLlama dense vs each variant, one row per variant (prefill and decode side by side):
    what `leanops demo` prints. Built on model_cases + the runner; `rounds` > 1 (CPU) times the
    variants of each phase interleaved over that many rounds."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # A GPU needs a real prompt to be busy; the CPU reference path only needs to show the numbers.
    b, s = prefill_shape or ((4, 256) if device.type == "cuda" else (1, 64))
    names = variants if variants is not None else list(VARIANTS)
    cases = model_cases("tiny-llama", preset, b, s, dtype, device, names, progress=lambda _: None)
    settings = settings or Settings(energy=energy, rounds=rounds)
    results = run_cases(cases, device, settings, None, progress=lambda _: None, title="demo")
    for failure in results.failed:
        raise RuntimeError(f"demo: {failure['provider']} {failure['op']} failed: {failure['error']}")
    by_variant: dict[str, dict] = {}
    for r in results.rows:
        row = by_variant.setdefault(r["variant"], {
            "variant": r["variant"], "state_mb": r["state_mb"], "size_x": r["size_x"],
            "energy_source": r["energy_source"], "energy_reason": r["energy_reason"],
        })
        key = "decode" if r["op"].endswith("decode") else "prefill"
        if key == "prefill":
            row["logits_sqnr_db"], row["logits_cosine"] = r["output_sqnr_db"], r["output_cosine"]
        row[f"{key}_ms"] = r["median_ms"]
        row[f"{key}_tok_s"] = r["tokens_per_s"]
        row[f"{key}_x"] = r["speedup_vs_dense"]
        row[f"{key}_j_per_tok"] = r.get("energy_joules_per_token")
        row[f"{key}_energy_x"] = r["energy_gain_vs_dense"]
        row[f"{key}_timing"] = r["timing_method"]
    for skipped in results.skipped:
        progress(f"  {skipped['provider']}: skipped ({skipped['reason']})")
    return list(by_variant.values())
