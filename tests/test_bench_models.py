"""The built-in benchmark models (TinyLlama's KV-cache decoding, the MiniLM-sized encoder) and the
model-level suite built on them."""

import pytest
import torch
import torch.nn.functional as F
from leanops.bench.model import MODELS, model_cases
from leanops.bench.runner import Settings, run_cases
from leanops.models import mini_encoder, set_attention_fn, tiny_llama
from leanops.models.encoder import PRESETS as ENCODER_PRESETS


def test_kv_cache_decoding_matches_the_full_forward():
    model = tiny_llama("test")
    tokens = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_kv_cache(2, 11)
        prefix = model(tokens[:, :7], kv_cache=cache, start_pos=0)
        chunk = model(tokens[:, 7:9], kv_cache=cache, start_pos=7)  # several new tokens: offset causal mask
        steps = [model(tokens[:, i:i + 1], kv_cache=cache, start_pos=i) for i in (9, 10)]
    torch.testing.assert_close(prefix, full[:, :7], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunk, full[:, 7:9], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 9:], rtol=1e-4, atol=1e-5)


def test_kv_cache_limits_are_checked():
    model = tiny_llama("test")
    cache = model.new_kv_cache(1, 8)
    with pytest.raises(ValueError, match="exceed the limit 8"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="needs the kv_cache"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=3)


def test_encoder_has_minilm_shape_and_is_bidirectional():
    cfg = ENCODER_PRESETS["minilm"]
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.hidden_dim) == (6, 384, 12, 1536)
    model = mini_encoder("test")
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        out = model(tokens)
        changed = tokens.clone()
        changed[:, -1] = (changed[:, -1] + 1) % 512
        out2 = model(changed)
    assert out.shape == (2, 10, 128) and bool(torch.isfinite(out).all())
    # bidirectional: changing the last token changes the first position's output (causal would not)
    assert not torch.allclose(out[:, 0], out2[:, 0])
    # post-LN: every position's output is layer-normalised (then scaled by the norm weight)
    w = model.layers[-1].mlp_norm.weight
    torch.testing.assert_close((out / w).mean(-1), torch.zeros(2, 10), atol=1e-4, rtol=0)


def test_encoder_padding_mask_hides_padded_keys():
    model = mini_encoder("test")
    tokens = torch.randint(0, 512, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        padded = model(tokens, attention_mask=mask)
        other = tokens.clone()
        other[:, 5:] = (other[:, 5:] + 7) % 512  # change only the padding
        padded2 = model(other, attention_mask=mask)
        trimmed = model(tokens[:, :5])
    torch.testing.assert_close(padded[:, :5], padded2[:, :5])
    torch.testing.assert_close(padded[:, :5], trimmed, rtol=1e-4, atol=1e-5)


def test_set_attention_fn_reaches_every_layer():
    seen = []

    def spy(q, k, v, causal):
        seen.append(causal)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    llama, enc = tiny_llama("test"), mini_encoder("test")
    set_attention_fn(llama, spy)
    set_attention_fn(enc, spy)
    with torch.no_grad():
        llama(torch.zeros(1, 4, dtype=torch.long))
        enc(torch.zeros(1, 4, dtype=torch.long))
    assert seen == [True] * llama.config.n_layers + [False] * enc.config.n_layers


def test_model_suite_rows_on_cpu():
    cases = model_cases("tiny-llama", "test", batch=1, tokens=16, device=torch.device("cpu"),
                        variants=["int8 weight-only", "int4 weight-only g128"], progress=lambda _: None)
    # dense is added first (the baseline); prefill and decode per variant
    assert [(c.provider, c.op) for c in cases] == [
        ("dense", "tiny-llama prefill"), ("dense", "tiny-llama decode"),
        ("int8 weight-only", "tiny-llama prefill"), ("int8 weight-only", "tiny-llama decode"),
        ("int4 weight-only g128", "tiny-llama prefill"), ("int4 weight-only g128", "tiny-llama decode")]
    assert [c.small for c in cases] == [False, True] * 3  # decode steps: CUDA-graph replay on a GPU
    res = run_cases(cases, torch.device("cpu"), Settings(warmup_ms=1, rep_ms=5), progress=lambda _: None)
    assert not res.failed and not res.skipped
    rows = {(r["provider"], r["op"].split()[-1]): r for r in res.rows}
    for (variant, phase), r in rows.items():
        tokens = 16 if phase == "prefill" else 1
        assert r["tokens"] == tokens and r["tokens_per_s"] == pytest.approx(tokens / (r["median_ms"] * 1e-3))
        assert r["baseline"] == "dense" and r["speedup_vs_dense"] > 0
        assert r["energy_joules_per_token"] is None and r["energy_reason"]
        if variant != "dense":
            assert r["size_x"] > 2.5 and r["output_cosine"] > 0.9 and r["output_sqnr_db"] > 8
    assert rows["int8 weight-only", "prefill"]["output_sqnr_db"] > 20
    assert rows["dense", "prefill"]["output_sqnr_db"] is None  # nothing to compare dense with


def test_model_suite_rejects_too_many_tokens():
    with pytest.raises(ValueError, match="more than tiny-llama 'test' takes"):
        model_cases("tiny-llama", "test", tokens=128, device=torch.device("cpu"), progress=lambda _: None)
    assert set(MODELS) == {"tiny-llama", "mini-encoder"}
