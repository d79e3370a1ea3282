"""Writes format1_no_checksum.safetensors (+ _io.safetensors): a checkpoint in leanops format
version 1 as save_quantized wrote it before checksums existed (commit 27cd39a), kept so that
tests/test_checkpoint.py can check that such files still load. Every packed layer kind is in it.

Run from the repository root with the leanops of that commit installed:
    python tests/data/make_format1_fixture.py
(run with a later leanops, it would write a checksummed file: the fixture is not regenerated.)
The _io file holds an input x and the output y the saved model computed for it on the CPU.
"""

import os

import leanops
import torch
from leanops.nn import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear, SparseLinear
from safetensors.torch import save_file
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def fixture_model() -> nn.Sequential:
    """The dense architecture of the fixture (tests build it to load the file into)."""
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
        nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8),
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    model = fixture_model()
    model[0] = Int8Linear.from_linear(model[0], smoothing=torch.rand(64) + 0.5)
    model[2] = Int4WeightOnlyLinear.from_linear(model[2], group_size=32, symmetric=False)
    model[4] = SparseLinear.from_linear(model[4], group_size=64, symmetric=False)
    model[6] = SparseLinear.from_linear(model[6])
    model[8] = Int8WeightOnlyLinear.from_linear(model[8])  # model[10] stays dense
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = model(x)
    leanops.save_quantized(model, os.path.join(HERE, "format1_no_checksum.safetensors"))
    save_file({"x": x, "y": y}, os.path.join(HERE, "format1_no_checksum_io.safetensors"))
