"""examples/train_qat.py at a tiny size: dense, PTQ, QAT (int8, int4, LSQ), 2:4 sparse, 2:4 + QAT
int4 and int8 training on scikit-learn's bundled digits, evaluated on the converted layers."""

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip(
    "sklearn",
    reason="the training example's data (the UCI digits) ships with scikit-learn: "
    "pip install scikit-learn (or 'leanops[examples]')",
)

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_qat.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_qat_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_example_at_a_tiny_size():
    example = _example()
    variants = [v for v in example.VARIANTS
                if "2:4" not in v or hasattr(__import__("leanops"), "sparsify_")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = {r["variant"]: r for r in example.run(
            seeds=1, epochs=6, finetune_epochs=2, hidden=128, variants=variants, progress=lambda s: None)}
    finally:
        torch.set_num_threads(threads)
    dense = rows["dense"]["accuracy"]
    assert dense > 93, rows
    for name, row in rows.items():
        # the converted models (real int8 / int4 / 2:4 layers) still classify real digits; one
        # seed of a 6-epoch run is noisy (one test image is 0.28 points), so the bounds are loose
        assert row["accuracy"] > dense - (4 if "PTQ" in name or "2:4" in name else 2), (name, rows)
    # sizes of the linear layers against dense fp32: int8 ~3.8x, int4 g32 ~6x, 2:4 ~1.9x
    assert 3.5 < rows["QAT int8 dynamic"]["size_x"] < 4
    assert 5.5 < rows["QAT int4 g32"]["size_x"] < 6.5
    if "2:4 + QAT int4 g64" in rows:
        assert 1.7 < rows["2:4 sparse"]["size_x"] < 2
        assert rows["2:4 + QAT int4 g64"]["size_x"] > 7.5
    table = example.format_table(list(rows.values()), 1)
    assert table.count("\n") == len(rows) + 1 and "QAT int4 g32 + LSQ" in table
