"""Training parity of int8 attention (issue 13) at a CI size: examples/int8_attention_training.py's
TinyLlama (2 blocks, head dim 64) trained from scratch on the Python standard library's source
bytes with leanops.attention and with leanops.attention_int8, same initial weights and batches,
30 steps of 8 x 64 bytes (~4-5 s of CPU; the example's full run is 300 steps of 16 x 128).

Two checks, with tolerances measured over 8 seeds of this exact configuration (bench/NOTES.md,
"int8 attention", training parity):
- held-out loss: int8 / 16-bit - 1 was at most SPREAD = 6.0e-5 in magnitude; the test allows
  10 x SPREAD (the 300-step run: +2.9e-4 = 0.029% (seed 0), the issue's bound is 2%);
- what attention learnt: the update of every q_proj / k_proj weight (trained - initial) of the
  int8 run differs from the 16-bit run's by 0.85-1.12% (relative norm); the test allows 3%.
  A broken int8 backward that drops the gradients of q and k (what training through an
  inference-only int8 attention does, SageAttention issue 90) is trained alongside as the
  control: 100% there. (Its held-out loss alone does not tell at 30 steps: -0.04% to +0.76%.)
"""

import importlib.util
import pathlib

import leanops
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "int8_attention_training.py"
SPREAD = 6.0e-5
UPDATE_BOUND = 0.03


def _example():
    spec = importlib.util.spec_from_file_location("int8_attention_training_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_qk_gradient(q, k, v, causal):
    dtype = q.dtype
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    return leanops.attention_int8(q.detach(), k.detach(), v, causal=causal).to(dtype)


def _qk_update_distance(result, name):
    """max over the q_proj / k_proj weights of |update(name) - update(16-bit)| / |update(16-bit)|."""
    init = dict(result["initial"].named_parameters())
    ref = dict(result["models"]["16-bit"].named_parameters())
    got = dict(result["models"][name].named_parameters())
    names = [n for n in init if "q_proj" in n or "k_proj" in n]
    assert len(names) == 4  # 2 blocks
    return max(((got[n] - ref[n]).norm() / (ref[n] - init[n]).norm()).item() for n in names)


def test_int8_attention_trains_like_16_bit_attention():
    example = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = example.train_models(
            {"16-bit": example.attention_fn(False), "int8": example.attention_fn(True),
             "control": _no_qk_gradient},
            steps=30, batch=8, seq=64, seed=0, every=10, eval_chunks=32, progress=lambda s: None,
            keep_models=True)
    finally:
        torch.set_num_threads(threads)
    final = result["final"]
    assert final["16-bit"] < 3.3, final  # it learnt something (the uniform guess is ln 256 = 5.5)
    gap = final["int8"] / final["16-bit"] - 1
    assert abs(gap) <= 10 * SPREAD, (gap, final)
    assert _qk_update_distance(result, "int8") <= UPDATE_BOUND
    assert _qk_update_distance(result, "control") > 10 * UPDATE_BOUND
