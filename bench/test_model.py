"""pytest-benchmark view of the model-level suite: the built-in TinyLlama (prefill and one
decode step with a KV cache) and MiniLM-sized encoder, each variant (dense, int8 dynamic, int8
weight-only, int4 g128, 2:4 sparse and fused attention where they exist) as in `leanops bench
model`. Models are built on first use, so collecting the suite is cheap."""

import functools

import pytest
import torch
from benchcase import DEVICE, DTYPE, GPU
from leanops.bench.model import MODELS, all_variants, model_cases

PHASES = {"tiny-llama": ("prefill", "decode"), "mini-encoder": ("forward",)}
PARAMS = [(model, variant, phase) for model in MODELS for variant in all_variants() for phase in PHASES[model]]


@functools.cache
def _cases(model):
    spec = MODELS[model]
    preset = spec.default_preset if GPU else spec.test_preset
    return model_cases(model, preset, 1, 256 if GPU else 32, DTYPE, DEVICE, progress=lambda _: None)


@pytest.mark.parametrize("model,variant,phase", PARAMS, ids=["-".join(p).replace(" ", "_") for p in PARAMS])
def test_model(run_case, model, variant, phase):
    matches = [c for c in _cases(model) if c.provider == variant and (c.op.endswith(phase) or c.skip)]
    if not matches:
        pytest.skip(f"{variant} has no {phase} case")
    out = run_case(matches[0])
    assert bool(torch.isfinite(out.float()).all())
