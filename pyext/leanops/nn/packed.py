"""The base of every drop-in nn.Linear replacement in leanops (quantised, sparse, ...): shape
handling, bias, repr, and the serialisation spec that save_quantized / load_quantized use to
rebuild an empty layer of the right kind before loading its tensors.

A subclass stores its packed weight tensors as buffers (so state_dict, .to(device) and
safetensors see them) and the bias as a Parameter of the original layer's dtype. These buffers
are the only copy of the weight on every device: the CPU kernels (kernels/cpu/) read the stored
layouts as they are, so no derived layout is built, cached or saved, and nothing is repacked per
call (tests/test_cpu_backend.py checks it). A subclass implements
`_matmul(x2d)` and `dequantized_weight()`, returns its constructor arguments from
`format_args()`, checks its format's stored values in `_check_format` (with the validators of
leanops.quant / leanops.sparsity.sparse24), and is registered with @register_packed_linear.

The kernels never check values per call (that would cost a pass over the weight, or a GPU
synchronisation, on every forward), so every tensor that enters a layer from outside is checked
once where it enters: load_state_dict checks the whole state a layer would hold before copying
any of it (a layer is never left half loaded), and so does leanops.load_quantized for a whole
model. To build a layer from packed tensors of your own, construct it empty and load_state_dict
them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from leanops.quant.common import FLOAT_DTYPES, ValueChecks, require_positive_finite, value_checks


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class PackedLinear(nn.Module):
    """Shared shape handling, bias, repr and (de)serialisation spec of leanops' linear layers."""

    format_description = "packed"

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            dtype = dtype or torch.get_default_dtype()
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        # Optional fp32 [in_features] multiplier of the input (AWQ's 1/s where no earlier op of
        # the model could absorb it); layers that support it assign a tensor (use_input_scale).
        self.register_buffer("input_scale", None)

    def use_input_scale(self, device=None) -> None:
        """Give the layer an input_scale buffer (fp32 [in_features], ones until loaded or set):
        forward then multiplies its input by it, in fp32, before the matmul."""
        self.input_scale = torch.ones(self.in_features, dtype=torch.float32, device=device)

    def _scaled_weight(self, w: torch.Tensor) -> torch.Tensor:
        """w [out, in] (fp32) as the layer applies it: times input_scale along the inputs."""
        return w if self.input_scale is None else w * self.input_scale[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension must be in_features="
                f"{self.in_features}, got input of shape {tuple(x.shape)}"
            )
        x2d = x.reshape(-1, self.in_features)
        if self.input_scale is not None:
            x2d = (x2d.float() * self.input_scale).to(x2d.dtype)
        out = self._matmul(x2d)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the layer was built for (bias, and int4 scales); follows .to(dtype)."""
        return self.bias.dtype if self.bias is not None else torch.float32

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The dense [out_features, in_features] weight this layer multiplies by, in fp32."""
        raise NotImplementedError

    # -- serialisation spec: enough to rebuild an empty module that load_state_dict can fill --
    def format_args(self) -> dict:
        return {}

    def _spec_args(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "type")

    def spec(self) -> dict:
        return {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": _dtype_name(self.dtype),
            **self.format_args(),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format_description}, "
            f"dtype={_dtype_name(self.dtype)}"
        )

    # -- validation of stored tensors (load_state_dict, load_quantized) --
    def _check_format(
        self, state: Mapping[str, torch.Tensor], prefix: str, checks: ValueChecks
    ) -> None:
        """Subclasses: check the format's invariants on `state` (this layer's state_dict keys,
        shapes and dtypes already match), naming tensors prefix + key, adding value checks to
        `checks`."""
        raise NotImplementedError

    def _check_stored_values(
        self, state: Mapping[str, torch.Tensor], prefix: str, checks: ValueChecks
    ) -> None:
        """The format's invariants (_check_format), and what every packed layer may carry: an
        input_scale (AWQ's 1/s), positive and finite."""
        self._check_format(state, prefix, checks)
        if state.get("input_scale") is not None:
            require_positive_finite(checks, state["input_scale"], prefix + "input_scale")

    def _structure_errors(self, state: Mapping[str, object], prefix: str) -> list[str]:
        """What is wrong with the keys, types, shapes and dtypes of `state` (this layer's own
        state_dict keys -> tensors) for this layer; [] if nothing."""
        own = self.state_dict(keep_vars=True)
        errors = [
            f"{prefix}{key} is missing" for key in own if key not in state
        ] + [
            f"{prefix}{key} is not a tensor of this layer (it holds {', '.join(sorted(own))})"
            for key in state if key not in own
        ]
        for key, ref in own.items():
            t = state.get(key)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                errors.append(f"{prefix}{key} must be a torch.Tensor, got {type(t).__name__}")
            elif tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
                errors.append(
                    f"{prefix}{key} must be {_dtype_name(ref.dtype)} of shape {tuple(ref.shape)} "
                    f"for {type(self).__name__}({self._spec_args()}), got "
                    f"{_dtype_name(t.dtype)} of shape {tuple(t.shape)}"
                )
        return errors

    def validate_state(
        self,
        state: Mapping[str, torch.Tensor] | None = None,
        prefix: str = "",
        checks: ValueChecks | None = None,
    ) -> None:
        """Check that `state` is a valid state for this layer, without changing anything.

        state: this layer's state_dict keys -> tensors, each with exactly the shape and dtype of
            the layer's own (a float tensor in another dtype is not cast here) and values that
            keep the format's invariants (scales positive and finite, zero points in [0, 15],
            2:4 metadata codes valid, ...); None: the layer's current tensors.
        prefix: prepended to the keys in error messages (e.g. "layers.0.q_proj.").
        checks: a leanops.quant.common.ValueChecks to add the value checks to, so that many
            layers are checked with one GPU synchronisation (the caller runs it); None: they run
            here.
        Raises ValueError naming the tensor and what is allowed.
        """
        if state is None:
            state = self.state_dict(keep_vars=True)
        errors = self._structure_errors(state, prefix)
        if errors:
            raise ValueError("; ".join(errors))
        with value_checks(checks) as checks:
            self._check_stored_values(state, prefix, checks)

    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ):
        """nn.Module.load_state_dict, all or nothing: every tensor is checked (keys with
        `strict`, shapes, dtypes, the format's stored values; see validate_state) before any is
        copied, so on an error the layer is exactly as it was. Float tensors of another float
        dtype are cast as torch does (and checked after the cast); integer tensors must have
        the layer's dtype. Raises RuntimeError for missing, unexpected or misshapen tensors (as
        torch does), ValueError for invalid values. Returns torch's (missing_keys,
        unexpected_keys)."""
        if strict:
            own = self.state_dict(keep_vars=True)
            missing = [key for key in own if key not in state_dict]
            unexpected = [key for key in state_dict if key not in own]
            if missing or unexpected:
                problems = [
                    f"{what} key(s) in state_dict: {', '.join(map(repr, keys))}. "
                    for what, keys in (("Missing", missing), ("Unexpected", unexpected)) if keys
                ]
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__} (nothing was "
                    f"loaded): {''.join(problems)}A {type(self).__name__}({self._spec_args()}) "
                    f"holds {', '.join(own)}"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Check everything this layer would hold after the load (the given tensors, and the
        # current ones for keys not given) before copying any of it: shape or dtype problems go
        # to error_msgs (load_state_dict raises RuntimeError, as torch does) with nothing of
        # this layer copied; invalid values raise ValueError. Missing and unexpected keys are
        # torch's business here (it only knows `strict` at the end; load_state_dict above
        # checks them first when this layer is loaded on its own). Tensors on a GPU cost one
        # synchronisation per layer, at load time only.
        own = self.state_dict(keep_vars=True)
        if any(prefix + key in state_dict for key in own):
            assign = local_metadata.get("assign_to_params_buffers", False)
            candidate = {}
            for key, ref in own.items():
                t = state_dict.get(prefix + key, ref)
                if (
                    not assign and isinstance(t, torch.Tensor) and t.dtype != ref.dtype
                    and t.dtype in FLOAT_DTYPES and ref.dtype in FLOAT_DTYPES
                ):
                    t = t.to(ref.dtype)  # what copy_ will store: check the values as stored
                candidate[key] = t
            errors = self._structure_errors(candidate, prefix)
            if errors:
                error_msgs.extend(errors)
                return
            with value_checks(None) as checks:
                self._check_stored_values(candidate, prefix, checks)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    @staticmethod
    def _set_bias_and_input_scale(module: PackedLinear, bias, input_scale) -> None:
        """Copy bias [out] (keeping its requires_grad) and input_scale [in] (positive, finite)
        into a new module built with room for them."""
        if bias is not None:
            if tuple(bias.shape) != (module.out_features,):
                raise ValueError(f"bias must have shape ({module.out_features},), got {tuple(bias.shape)}")
            module.bias.data.copy_(bias.detach())
            module.bias.requires_grad_(bias.requires_grad)
        if input_scale is not None:
            if tuple(input_scale.shape) != (module.in_features,):
                raise ValueError(
                    f"input_scale must have shape ({module.in_features},), got {tuple(input_scale.shape)}"
                )
            with value_checks(None) as checks:
                require_positive_finite(checks, input_scale, "input_scale")
            module.input_scale.copy_(input_scale.detach().float())


_LAYER_TYPES: dict[str, type[PackedLinear]] = {}


def register_packed_linear(cls: type[PackedLinear]) -> type[PackedLinear]:
    """Class decorator: make `cls` known to packed_linear_from_spec (and so to load_quantized)."""
    _LAYER_TYPES[cls.__name__] = cls
    return cls


def packed_linear_from_spec(spec: Mapping, device=None) -> PackedLinear:
    """An empty layer (to be filled by load_state_dict) from PackedLinear.spec().

    spec: what spec() returns: "type" (a registered layer class name), "in_features",
        "out_features", "bias", "dtype" ("float16", "bfloat16" or "float32") and the type's
        format_args(); e.g. read from a checkpoint's metadata.
    device: where the layer's tensors are allocated (None: torch's default; "meta": nowhere).
    Returns the layer, holding a valid all-zero weight, whose spec() equals `spec`.
    Raises ValueError saying what in `spec` is wrong (unknown type or dtype, missing, unknown or
    ill-typed arguments, values the layer refuses).
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"a layer spec must be a dict (PackedLinear.spec()), got {type(spec).__name__}"
        )
    args = dict(spec)
    name = args.pop("type", None)
    if name not in _LAYER_TYPES:
        raise ValueError(f"unknown leanops layer type {name!r}; known: {sorted(_LAYER_TYPES)}")
    dtypes = {_dtype_name(d): d for d in FLOAT_DTYPES}
    dtype_name = args.pop("dtype", None)
    if dtype_name not in dtypes:
        raise ValueError(f"spec dtype must be one of {sorted(dtypes)}, got {dtype_name!r}")
    try:
        layer = _LAYER_TYPES[name](**args, device=device, dtype=dtypes[dtype_name])
    except (TypeError, ValueError) as exc:  # missing, unknown, ill-typed or refused arguments
        raise ValueError(f"invalid {name} spec {dict(spec)}: {exc}") from None
    if layer.spec() != dict(spec):
        raise ValueError(
            f"invalid {name} spec {dict(spec)}: the layer it builds has spec {layer.spec()}"
        )
    return layer
