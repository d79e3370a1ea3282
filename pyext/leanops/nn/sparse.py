"""SparseLinear: a drop-in nn.Linear holding a 2:4-compressed weight (optionally with int4 kept
values), in the layout of leanops.sparsity.sparse24."""

from __future__ import annotations

import torch
from torch import nn

from leanops.nn.packed import PackedLinear, register_packed_linear
from leanops.ops import sparse24_int4_mm, sparse24_mm
from leanops.sparsity import sparse24 as sparse_format
from leanops.sparsity.masks import nm_mask

KERNELS = ("leanops", "torch")


@register_packed_linear
class SparseLinear(PackedLinear):
    """2:4 sparse linear: W [out, in] keeps 2 of every 4 consecutive inputs. Build it with
    `from_linear` / `from_weight` or leanops.sparsify_; the constructor makes an empty layer.

    Arguments:
        in_features, out_features: K and N of the weight [N, K]; K a multiple of 8.
        bias: whether the layer has a bias Parameter [N] (in `dtype`).
        group_size: None (kept values in `dtype`) or g, a multiple of 64 dividing in_features
            (kept values int4, one scale per g original inputs).
        symmetric: int4 only: a uint8 zero point per group (False, the default, as from_linear)
            or the fixed zero point 8 (True).
        kernel: "leanops" (default) or "torch" (below).
        device, dtype: where the buffers live; the dtype of the kept values (or scales) and bias.

    Buffers (leanops.sparsity.sparse24), group_size None: weight_values [out, in/2] in `dtype`,
    weight_meta uint8 [out, in/8]. group_size g (2:4 + int4): weight_values uint8 [out, in/4],
    weight_meta, weight_scale [out, in/g] in `dtype`, and if not symmetric weight_zero uint8
    [out, in/g].

    kernel="leanops": leanops::sparse24_mm / sparse24_int4_mm (Triton on GPUs, the reference
    elsewhere). kernel="torch": PyTorch's SparseSemiStructuredTensor (cuSPARSELt, or CUTLASS)
    and F.linear, the baseline: CUDA sm_80+ only, float16/bfloat16, no int4. It is built from the
    buffers on first use and rebuilt when they change (a second copy of the compressed weight).
    Gradients reach the input and bias; the compressed weight is frozen (fine-tune sparse weights
    with leanops.sparsity.enable_sparse_training before compressing).
    """

    def __init__(
        self, in_features, out_features, bias=True, group_size=None, symmetric=False,
        kernel="leanops", device=None, dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        sparse_format.check_in_features(in_features)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if group_size is not None:
            sparse_format.check_int4_group_size(group_size, in_features)
            if kernel == "torch":
                raise ValueError("kernel='torch' has no 2:4 + int4 variant; use kernel='leanops'")
        self.group_size = group_size
        self.symmetric = bool(symmetric)
        self.kernel = kernel
        dtype = dtype or torch.get_default_dtype()
        # An all-zero weight with valid codes (0x4: entries 0 and 1 of each group).
        self.register_buffer(
            "weight_meta",
            torch.full((out_features, in_features // 8), 0x44, dtype=torch.uint8, device=device),
        )
        if group_size is None:
            self.register_buffer(
                "weight_values", torch.zeros(out_features, in_features // 2, dtype=dtype, device=device)
            )
            self.weight_scale = None
            self.weight_zero = None
        else:
            groups = in_features // group_size
            self.register_buffer(
                "weight_values",
                torch.full((out_features, in_features // 4), 0x88, dtype=torch.uint8, device=device),
            )
            self.register_buffer(
                "weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device)
            )
            if self.symmetric:
                self.weight_zero = None
            else:
                self.register_buffer(
                    "weight_zero", torch.full((out_features, groups), 8, dtype=torch.uint8, device=device)
                )
        self._torch_weight = None
        self._torch_key = None

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_values.dtype if self.group_size is None else self.weight_scale.dtype

    @property
    def format_description(self):
        if self.group_size is None:
            base = "2:4"
        else:
            base = f"2:4 int4 g{self.group_size} {'sym' if self.symmetric else 'asym'}"
        return base if self.kernel == "leanops" else f"{base} kernel=torch"

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        group_size: int | None = None,
        symmetric: bool = False,
        kernel: str = "leanops",
    ) -> SparseLinear:
        """Compress `linear` into a new layer on its device.

        Arguments:
            linear: the nn.Linear; its weight [out, in] is pruned by `mask`, not modified.
            mask: bool [out, in] of the entries to keep (at most 2 of every 4 consecutive
                inputs), e.g. from Wanda or SparseGPT; None keeps the 2 largest |W| of every 4
                (magnitude pruning; for an already 2:4 weight, exactly its nonzeros).
            group_size: None (kept values in the weight's dtype) or a multiple of 64 (int4 kept
                values, leanops.quant.int4's RTN over each group's kept values).
            symmetric: int4 only: False (default) a zero point per group, True the fixed 8.
            kernel: as the constructor's.

        Raises: ValueError for a mask that keeps more than 2 of 4, in_features not a multiple of
        8, or a group size that does not fit."""
        return cls.from_weight(linear.weight, linear.bias, mask, group_size, symmetric, kernel)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        group_size: int | None = None,
        symmetric: bool = False,
        kernel: str = "leanops",
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
    ) -> SparseLinear:
        """from_linear for a bare weight: `weight` [out, in] float, `bias` [out] or None;
        mask, group_size, symmetric and kernel as in from_linear. scales and zeros
        [out, in/group_size] (int4 only): the grid to encode the kept values on (see
        leanops.sparsity.sparse24.compress_24_int4), default RTN's."""
        from leanops.quant.common import check_float_matrix

        weight = weight.detach()
        check_float_matrix(weight, "weight")
        out_features, in_features = weight.shape
        module = cls(
            in_features, out_features, bias is not None, group_size=group_size,
            symmetric=symmetric, kernel=kernel, device=weight.device, dtype=weight.dtype,
        )
        if mask is None:
            mask = nm_mask(weight.float().abs(), 2, 4)
        if group_size is None:
            values, meta = sparse_format.compress_24(weight, mask)
            module.weight_values.copy_(values)
        else:
            values, scales, zeros, meta = sparse_format.compress_24_int4(
                weight, group_size, symmetric, mask, scales=scales, zeros=zeros
            )
            module.weight_values.copy_(values)
            module.weight_scale.copy_(scales)
            if zeros is not None:
                module.weight_zero.copy_(zeros)
        module.weight_meta.copy_(meta)
        cls._set_bias_and_input_scale(module, bias, None)
        return module

    def format_args(self):
        return {"group_size": self.group_size, "symmetric": self.symmetric, "kernel": self.kernel}

    def _check_format(self, state, prefix, checks):
        keys = ("weight_values", "weight_scale", "weight_zero", "weight_meta")
        names = {key: prefix + key for key in keys}
        if self.group_size is None:
            sparse_format.check_24(
                state["weight_values"], state["weight_meta"],
                names=(names["weight_values"], names["weight_meta"]), checks=checks,
            )
        else:
            sparse_format.check_24_int4(
                state["weight_values"], state["weight_scale"], state.get("weight_zero"),
                state["weight_meta"], self.group_size,
                names=tuple(names.values()), checks=checks,
            )

    def _matmul(self, x2d):
        if self.kernel == "torch":
            return self._torch_matmul(x2d)
        if self.group_size is None:
            return sparse24_mm(x2d, self.weight_values, self.weight_meta, self.bias)
        return sparse24_int4_mm(
            x2d, self.weight_values, self.weight_meta, self.weight_scale, self.weight_zero,
            self.group_size, self.bias,
        )

    def torch_weight(self):
        """The weight as torch's SparseSemiStructuredTensor (cached; rebuilt if the buffers
        changed, moved or were reloaded)."""
        v, m = self.weight_values, self.weight_meta
        key = (v.data_ptr(), m.data_ptr(), v.device, v.dtype, v._version, m._version)
        if self._torch_weight is None or self._torch_key != key:
            self._torch_weight = sparse_format.to_torch_semi_structured(v, m)
            self._torch_key = key
        return self._torch_weight

    def _torch_matmul(self, x2d):
        if not x2d.is_cuda or not self.weight_values.is_cuda:
            raise RuntimeError(
                "SparseLinear(kernel='torch') runs PyTorch's semi-structured sparse matmul "
                "(cuSPARSELt/CUTLASS), which needs CUDA tensors on an sm_80+ GPU; got input on "
                f"{x2d.device} and weight on {self.weight_values.device}. Use kernel='leanops' "
                "for the portable path."
            )
        if x2d.dtype != self.weight_values.dtype:
            raise ValueError(
                f"SparseLinear(kernel='torch'): the input dtype {x2d.dtype} must match the "
                f"weight's {self.weight_values.dtype} (torch's sparse matmul does not convert)"
            )
        bias = None if self.bias is None else self.bias.to(x2d.dtype)
        return torch.nn.functional.linear(x2d, self.torch_weight(), bias)

    def dequantized_weight(self):
        if self.group_size is None:
            return sparse_format.decompress_24(self.weight_values, self.weight_meta).float()
        return sparse_format.decompress_24_int4(
            self.weight_values, self.weight_scale, self.weight_zero, self.weight_meta,
            self.group_size,
        ).float()

    def __getstate__(self):
        # The torch-backend cache is derived data (and a tensor subclass): never copy or pickle it.
        state = self.__dict__.copy()
        state["_torch_weight"] = None
        state["_torch_key"] = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # PackedLinear checks the metadata codes (and everything else) before loading.
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._torch_weight = None
