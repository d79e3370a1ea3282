"""Calibrated post-training quantisation of a model's linear layers: the whole-model flow behind
quantize_(model, Int4WeightOnlyConfig(algorithm=...) or Int8WeightOnlyConfig(algorithm=...),
calibrate=...) for HQQ, AWQ, GPTQ and AWQ then GPTQ. Every layer ends in the ordinary packed
format (Int4WeightOnlyLinear / Int8WeightOnlyLinear), so kernels, save/load and the rest take
the result unchanged.

  1. Statistics: one run of calibrate(model) with hooks gathers X^T X of every selected layer's
     inputs (leanops.calibration.collect_grams; layers that read the same tensor, such as q, k
     and v, share one), and the order in which those sets of layers ("stages") run.
  2. AWQ (if asked): per stage, scales s searched on the float model (leanops.quant.awq). Where
     the model has an op that produces exactly this input and feeds nothing else (AWQ_FOLDS:
     the norm before q/k/v or gate/up, v_proj before o_proj, up_proj before down_proj, the
     final norm before lm_head), 1/s is folded into it and s into the layers' weights, in
     place, which leaves the float model's function unchanged; otherwise each layer carries
     its own s (searched for it alone) as input_scale. The Grams follow: diag(s)^-1 H diag(s)^-1.
  3. Weights: per layer, RTN on a clip-searched grid (awq) or GPTQ (gptq, awq+gptq) from the
     Grams of step 1; with sequential=True, GPTQ instead re-runs calibrate(model) once per
     stage, after the stages before it were swapped for their quantised layers, and holds the
     statistics of that stage only.

Memory: step 1 holds one fp32 K x K Gram per stage (all-MiniLM-L6-v2: 24 stages, 59 MB;
a Llama-7B: 128 stages, ~30 GB; use sequential=True without AWQ, or quantise a few blocks at a
time with filter_fn, there). GPTQ's solver then needs about 2 K x K + 2 N x K fp32 per layer
(leanops.quant.obs).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from leanops import calibration
from leanops.nn.packed import PackedLinear
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from leanops.nn.swap import replace_module
from leanops.quant import awq, gptq, hqq
from leanops.quant import int4 as int4_format
from leanops.quant import int8 as int8_format
from leanops.quant.config import Int4WeightOnlyConfig, Int8WeightOnlyConfig

logger = logging.getLogger("leanops")

# Where AWQ's 1/s can be folded, by the class of the module that contains both ends:
# (producer, consumers), paths relative to it. Each producer's output feeds only these
# consumers, through ops that are linear per channel (a norm's affine weight and bias; v_proj's
# rows through attention, which mixes tokens but not channels; up_proj's rows through
# act(gate) * up). Anything else carries its scale.
_LLAMA_HF = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("mlp.up_proj", ("mlp.down_proj",)),
)
AWQ_FOLDS = {
    "leanops.models.llama.Block": (
        ("attn_norm", ("attn.q_proj", "attn.k_proj", "attn.v_proj")),
        ("mlp_norm", ("mlp.gate_proj", "mlp.up_proj")),
        ("attn.v_proj", ("attn.o_proj",)),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    "leanops.models.llama.TinyLlama": (("norm", ("lm_head",)),),
    "leanops.models.encoder.EncoderLayer": (("attn.value", ("attn.out",)),),
    "transformers.models.bert.modeling_bert.BertLayer": (
        ("attention.self.value", ("attention.output.dense",)),
    ),
    "transformers.models.llama.modeling_llama.LlamaDecoderLayer": _LLAMA_HF,
    "transformers.models.mistral.modeling_mistral.MistralDecoderLayer": _LLAMA_HF,
    "transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer": _LLAMA_HF,
    "transformers.models.llama.modeling_llama.LlamaForCausalLM": (("model.norm", ("lm_head",)),),
}


@dataclass
class LayerResult:
    """What the flow did to one layer (quantize_ discards it; tests and tools read it).

    weight: the quantised weight [out, in] on its grid, in the layer's own input space
        (after AWQ's scaling). scale: AWQ's s [in] (fp32) or None; folded_into: the module
        that took 1/s (its name) or None (carried as input_scale = 1 / s). out_scale: [out]
        divisor folded into this layer's rows by a consumer's AWQ (or None).
    """

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    folded_into: str | None = None
    out_scale: torch.Tensor | None = None

    def effective_weight(self) -> torch.Tensor:
        """The weight in the original model's input and output spaces (fp32): what the layer
        computes if its neighbours' folds are undone, to compare with the original weight."""
        w = self.weight.float()
        if self.scale is not None:
            w = w / self.scale[None, :]
        if self.out_scale is not None:
            w = w * self.out_scale[:, None]
        return w


def auto_damp(in_features: int, tokens: int) -> float:
    """GPTQ's default relative dampening: 0.01 + 0.2 K / T (measured on all-MiniLM-L6-v2:
    0.01-0.03 is best with ~14k tokens for K <= 1536, 0.1-0.3 with ~850)."""
    return 0.01 + 0.2 * in_features / max(tokens, 1)


def quantize_model_(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    config: Int4WeightOnlyConfig | Int8WeightOnlyConfig,
    calibrate: Callable[[nn.Module], object] | None,
    swap: bool = True,
) -> dict[str, LayerResult]:
    """Quantise `targets` (name -> nn.Linear of `model`, from leanops.nn.swap.select_linears)
    with config.algorithm ("hqq", "awq", "gptq" or "awq+gptq"; RTN is quantize_'s own loop)
    and, if swap, replace each by its packed layer; return name -> LayerResult.

    calibrate(model) runs sample inputs through the model (not needed by "hqq"). AWQ folds
    modify the float weights of norms and linear layers of the model in place (the function
    is unchanged). swap=False leaves the targets' modules in place (the folds still happen)
    and only returns the results (not with sequential=True, which needs the swapped layers).
    Raises ValueError if the algorithm needs calibrate and has none, or a layer never runs.
    """
    algorithm = config.algorithm
    if algorithm == "rtn":
        raise ValueError("quantize_model_ runs the calibrated algorithms; RTN is quantize_'s")
    results: dict[str, LayerResult] = {}
    if algorithm == "hqq":
        for name, linear in targets.items():
            w_hat, scales, zeros = hqq.hqq_int4(
                linear.weight, config.group_size_for(linear.in_features), config.symmetric
            )
            results[name] = LayerResult(w_hat)
            if swap:
                _swap(model, name, linear, config, w_hat, (scales, zeros), None)
        return results
    if calibrate is None:
        raise ValueError(
            f"algorithm={algorithm!r} needs calibrate=, a callable that runs sample inputs "
            "through the model, e.g. calibrate=lambda m: m(sample_batch)"
        )
    sequential = config.sequential and "gptq" in algorithm
    if sequential and not swap:
        raise ValueError("sequential=True quantises layer by layer: it needs swap=True")
    use_awq = algorithm.startswith("awq")
    purpose = {"awq": "AWQ", "gptq": "GPTQ", "awq+gptq": "AWQ+GPTQ"}[algorithm]
    grams, stages = calibration.collect_grams(
        model, targets, calibrate, purpose, first_stage_only=sequential and not use_awq
    )
    scales: dict[str, tuple[torch.Tensor, str | None]] = {}
    out_scales: dict[str, torch.Tensor] = {}
    if use_awq:
        scales, out_scales = _awq(model, targets, grams, stages, config)
    _warn_few_tokens(targets, grams, algorithm)
    for index, stage in enumerate(stages):
        if sequential and index > 0:
            grams = {}  # frees the previous set's statistics before the next are gathered
            live = {name: model.get_submodule(name) for name in stage}
            grams, _ = calibration.collect_grams(model, live, calibrate, purpose)
        for name in stage:
            linear = targets[name]
            s, folded = scales.get(name, (None, None))
            h, count = grams[name]
            # Statistics gathered before a fold saw x, not x / s; after it (the sequential
            # re-runs), folded layers already see x / s and only carried ones need the change.
            if s is not None and (folded is None or not (sequential and index > 0)):
                h = awq.scaled_hessian(h, s)
            w = linear.weight.detach().float()
            if s is not None and folded is None:
                w = w * s[None, :]
            w_hat, grid_ = _quantize_weight(w, h, count, config, algorithm, linear.weight.dtype)
            results[name] = LayerResult(w_hat, s, folded, out_scales.get(name))
            if swap:
                carried = None if s is None or folded is not None else 1.0 / s
                _swap(model, name, linear, config, w_hat, grid_, carried)
        if sequential:
            for name in stage:
                grams.pop(name, None)
    return results


@torch.no_grad()
def quantize_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    count: int,
    config: Int4WeightOnlyConfig | Int8WeightOnlyConfig,
) -> tuple[LayerResult, tuple | torch.Tensor | None]:
    """One layer through config.algorithm on its own (an AWQ scale is carried, never folded):
    what quantize_ does per layer, for timing and for using the algorithms without a model.

    weight: [N, K] float16 / bfloat16 / float32. hessian: X^T X fp32 [K, K] of the layer's
    calibration inputs over `count` tokens (None for "rtn" and "hqq"). config: an
    Int4WeightOnlyConfig or Int8WeightOnlyConfig (its group size, symmetric, algorithm, damp,
    act_order). Returns (LayerResult, grid): int4 grid = (scales, zeros or None), int8 = the fp32
    row scales; Int4WeightOnlyLinear / Int8WeightOnlyLinear.from_weight(result.weight, bias,
    ..., grid, input_scale=1 / result.scale) builds the layer.
    """
    algorithm = config.algorithm
    w = weight.detach().float()
    if algorithm in ("rtn", "hqq"):
        if isinstance(config, Int8WeightOnlyConfig):
            q, scale = int8_format.quantize_int8_per_channel(weight)
            return LayerResult(int8_format.dequantize_int8_per_channel(q, scale)), scale
        g = config.group_size_for(w.shape[1])
        if algorithm == "rtn":
            packed, scales, zeros = int4_format.quantize_int4(weight, g, config.symmetric)
            w_hat = int4_format.dequantize_int4(packed, scales, zeros, g)
        else:
            w_hat, scales, zeros = hqq.hqq_int4(weight, g, config.symmetric)
        return LayerResult(w_hat), (scales, zeros)
    if hessian is None:
        raise ValueError(f"algorithm={algorithm!r} needs the layer's hessian (X^T X)")
    s = None
    h = hessian.float()
    if algorithm.startswith("awq"):
        s = _search(config, [weight], h, count)
        w, h = w * s[None, :], awq.scaled_hessian(h, s)
    w_hat, grid_ = _quantize_weight(w, h, count, config, algorithm, weight.dtype)
    return LayerResult(w_hat, s), grid_


def _quantize_weight(w, h, count, config, algorithm, dtype):
    """(w_hat on the grid, the grid) of w [N, K] fp32 with Gram h over `count` tokens."""
    damp = config.damp if config.damp is not None else auto_damp(w.shape[1], count)
    if isinstance(config, Int8WeightOnlyConfig):
        if "gptq" in algorithm:
            return gptq.gptq_int8(w, h, damp=damp, act_order=config.act_order)
        scale = int8_format.int8_channel_scale(w)  # AWQ: RTN of the scaled weight
        return int8_format.int8_codes(w, scale) * scale[:, None], scale
    g = config.group_size_for(w.shape[1])
    if "gptq" in algorithm:
        w_hat, scales, zeros = gptq.gptq_int4(
            w, h, g, config.symmetric, damp=damp, act_order=config.act_order, scale_dtype=dtype
        )
    else:
        w_hat, scales, zeros = awq.clip_int4(w, h, g, config.symmetric, dtype)
    return w_hat, (scales, zeros)


def _swap(model, name, linear, config, w_hat, grid_, input_scale) -> PackedLinear:
    bias = linear.bias
    if isinstance(config, Int8WeightOnlyConfig):
        new = Int8WeightOnlyLinear.from_weight(w_hat, bias, grid_, input_scale)
    else:
        scales, zeros = grid_
        new = Int4WeightOnlyLinear.from_weight(
            w_hat, bias, config.group_size_for(linear.in_features), config.symmetric,
            scales=scales, zeros=zeros, input_scale=input_scale,
        )
    new.train(linear.training)
    replace_module(model, name, new)
    return new


def _warn_few_tokens(targets, grams, algorithm):
    if "gptq" not in algorithm:
        return
    few = [
        f"{name} ({grams[name][1]} tokens, K={linear.in_features})"
        for name, linear in targets.items()
        if name in grams and grams[name][1] < linear.in_features
    ]
    if few:
        logger.warning(
            "quantize_: GPTQ saw fewer calibration tokens than inputs for %d layer(s), e.g. %s; "
            "its Hessian is rank-deficient and the result leans on dampening: calibrate with "
            ">= 4 x in_features tokens",
            len(few), few[0],
        )


def _search(config, weights, h, count):
    """AWQ's scales for `weights` sharing the input of Gram h, with config's quantiser."""
    k = h.shape[0]
    if isinstance(config, Int8WeightOnlyConfig):
        fake, group = awq.int8_rtn_fake, None
    else:
        group = config.group_size_for(k)
        fake = awq.int4_rtn_fake(group, config.symmetric, weights[0].dtype)
    return awq.search_scales(weights, h, count, fake, awq.block_width_for(k, group))[0]


def fold_groups(model: nn.Module, targets: dict[str, nn.Linear]) -> list[tuple[str, list[str]]]:
    """(producer name, consumer names) pairs of AWQ_FOLDS that apply to `model`: every consumer
    is a target, the producer is an nn.Linear whose output width is the consumers' input, or a
    norm with a 1-D affine weight (and bias) of that width, and none of these weights is shared
    with another module."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    out = []
    for path, module in model.named_modules():
        cls = type(module)
        for producer, consumers in AWQ_FOLDS.get(f"{cls.__module__}.{cls.__qualname__}", ()):
            names = [f"{path}.{c}" if path else c for c in consumers]
            pname = f"{path}.{producer}" if path else producer
            try:
                prod = model.get_submodule(pname)
            except AttributeError:
                continue
            if not all(n in targets for n in names):
                continue
            width = targets[names[0]].in_features
            if any(targets[n].in_features != width for n in names):
                continue
            params = [targets[n].weight for n in names]
            if isinstance(prod, nn.Linear):
                ok = prod.out_features == width
                params.append(prod.weight)
            else:
                w = getattr(prod, "weight", None)
                ok = isinstance(w, nn.Parameter) and w.dim() == 1 and w.shape[0] == width
                params.append(w)
            b = getattr(prod, "bias", None)
            if b is not None:
                ok = ok and isinstance(b, nn.Parameter) and b.shape == (width,)
                params.append(b)
            if ok and all(p.is_floating_point() and uses[id(p)] == 1 for p in params):
                out.append((pname, names))
    return out


@torch.no_grad()
def _awq(model, targets, grams, stages, config):
    """Search AWQ scales stage by stage, fold them where AWQ_FOLDS allows; return
    (name -> (s, producer name or None), name -> out_scale [out] of producers' rows)."""
    folds = {names[0]: (pname, names) for pname, names in fold_groups(model, targets)}
    folded = {n for _, names in folds.values() for n in names}
    scales, out_scales = {}, {}
    for stage in stages:
        for name in stage:
            if name in folds:
                pname, names = folds[name]
                h, count = grams[name]
                s = _search(config, [targets[n].weight for n in names], h, count)
                prod = model.get_submodule(pname)
                _fold(prod, s, out_scales, pname)
                for n in names:
                    targets[n].weight.mul_(s.to(targets[n].weight.dtype)[None, :])
                    scales[n] = (s, pname)
            elif name not in folded:
                linear = targets[name]
                h, count = grams[name]
                s = _search(config, [linear.weight], h, count)
                scales[name] = (s, None)
    return scales, out_scales


def _fold(prod, s, out_scales, pname):
    """Divide the producer's output channels by s: a norm's weight and bias, or a linear
    layer's rows and bias."""
    inv = 1.0 / s
    if isinstance(prod, nn.Linear):
        prod.weight.mul_(inv.to(prod.weight.dtype)[:, None])
        prev = out_scales.get(pname)
        out_scales[pname] = s if prev is None else prev * s
    else:
        prod.weight.mul_(inv.to(prod.weight.dtype))
    if getattr(prod, "bias", None) is not None:
        prod.bias.mul_(inv.to(prod.bias.dtype))
