"""Train a small classifier on real data that ships offline, dense and cheaper, side by side.

The data: scikit-learn's bundled copy of the UCI "Optical Recognition of Handwritten Digits" test
set (1,797 8x8 images, 10 classes; load_digits reads it from the installed package, nothing is
downloaded; the data is CC BY 4.0, scikit-learn BSD-3). The model: an MLP 64 -> 256 -> 256 -> 10.

Variants, each from the same dense pre-training (except int8 training, which trains from scratch):
  dense                 fine-tuned as long as the others, the baseline
  PTQ int8 / int4       leanops.quantize_ on the dense model, no training (for reference)
  QAT int8 dynamic      leanops.qat.prepare_(Int8DynamicConfig) -> fine-tune -> convert_
  QAT int8 weight-only  Int8WeightOnlyConfig
  QAT int4 g32          Int4WeightOnlyConfig(group_size=32)
  QAT int4 g32 + LSQ    the same with learnable_scales=True
  2:4 sparse            leanops.prune_ (magnitude) -> enable_sparse_training -> fine-tune ->
                        finalize -> sparsify_ (SparseLinear, 16-bit kept values)
  2:4 + QAT int4 g64    prune_, prepare_(Int4 g64) and enable_sparse_training together ->
                        fine-tune -> finalize -> convert_(sparse_24=True) (2:4 + int4 SparseLinear)
  int8 training         leanops.quantize_(Int8TrainingConfig): int8 forward and grad-input
                        matmuls from the first step (SwitchBack)
Accuracy is measured on the converted model (the real int8 / int4 / 2:4 layers), over several
seeds (each its own split and initialisation); size is the bytes of the linear layers' weights
(and scales, zero points, metadata) in the state_dict.

    pip install scikit-learn        # or: pip install 'leanops[examples]'
    python examples/train_qat.py [--seeds 5] [--epochs 40] [--finetune-epochs 20]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import leanops
import leanops.qat
import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = (
    "dense", "PTQ int8 dynamic", "PTQ int4 g32", "QAT int8 dynamic", "QAT int8 weight-only",
    "QAT int4 g32", "QAT int4 g32 + LSQ", "2:4 sparse", "2:4 + QAT int4 g64", "int8 training",
)


def load_digits_split(seed: int, test_fraction: float = 0.2):
    """Stratified train/test split of scikit-learn's bundled digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = round(len(idx) * test_fraction)
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = torch.cat(train_idx), torch.cat(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def mlp(hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    )


def train(model, x, y, epochs, lr, seed, batch=64):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * -(-len(x) // batch)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def linear_bytes(model) -> int:
    """Bytes of the linear layers' state (weights, scales, zero points, sparsity metadata, bias)."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, leanops.nn.PackedLinear)):
            total += sum(t.numel() * t.element_size() for t in m.state_dict().values())
    return total


def run_seed(seed, epochs, finetune_epochs, hidden=256, variants=VARIANTS, lr=2e-3):
    xtr, ytr, xte, yte = load_digits_split(seed)
    torch.manual_seed(seed)
    pretrained = train(mlp(hidden), xtr, ytr, epochs, lr, seed)
    ft_lr = lr / 4

    def finetune(model):
        return train(model, xtr, ytr, finetune_epochs, ft_lr, seed + 1)

    results = {}
    for name in variants:
        model = copy.deepcopy(pretrained)
        if name == "dense":
            finetune(model)
        elif name == "PTQ int8 dynamic":
            leanops.quantize_(model, leanops.Int8DynamicConfig())
        elif name == "PTQ int4 g32":
            leanops.quantize_(model, leanops.Int4WeightOnlyConfig(group_size=32))
        elif name.startswith("QAT"):
            config = {
                "QAT int8 dynamic": leanops.Int8DynamicConfig(),
                "QAT int8 weight-only": leanops.Int8WeightOnlyConfig(),
                "QAT int4 g32": leanops.Int4WeightOnlyConfig(group_size=32),
                "QAT int4 g32 + LSQ": leanops.Int4WeightOnlyConfig(group_size=32),
            }[name]
            leanops.qat.prepare_(model, config, learnable_scales=name.endswith("LSQ"))
            finetune(model)
            leanops.qat.convert_(model)
        elif name == "2:4 sparse":
            from leanops.sparsity import enable_sparse_training, finalize_sparse_training

            masks = leanops.prune_(model, "magnitude")
            enable_sparse_training(model, masks=masks)
            finetune(model)
            finalize_sparse_training(model)
            leanops.sparsify_(model, leanops.SemiSparseConfig())
        elif name == "2:4 + QAT int4 g64":
            from leanops.sparsity import enable_sparse_training, finalize_sparse_training

            masks = leanops.prune_(model, "magnitude")
            leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(group_size=64))
            enable_sparse_training(model, masks=masks)
            finetune(model)
            finalize_sparse_training(model)
            leanops.qat.convert_(model, sparse_24=True)
        elif name == "int8 training":
            torch.manual_seed(seed)
            model = leanops.quantize_(mlp(hidden), leanops.Int8TrainingConfig())
            train(model, xtr, ytr, epochs + finetune_epochs, lr, seed)
        else:
            raise ValueError(f"unknown variant {name!r}")
        results[name] = {"accuracy": accuracy(model, xte, yte), "bytes": linear_bytes(model)}
    return results


def run(seeds=5, epochs=40, finetune_epochs=20, hidden=256, variants=VARIANTS, progress=print):
    """Per-variant mean / stdev accuracy over `seeds` and size of the linear layers."""
    per_seed = []
    for seed in range(seeds):
        start = time.time()
        per_seed.append(run_seed(seed, epochs, finetune_epochs, hidden, variants))
        progress(f"seed {seed}: " + ", ".join(
            f"{k} {v['accuracy']:.2f}" for k, v in per_seed[-1].items()) + f" ({time.time() - start:.0f} s)")
    dense_bytes = per_seed[0]["dense"]["bytes"] if "dense" in variants else None
    rows = []
    for name in variants:
        accs = [r[name]["accuracy"] for r in per_seed]
        deltas = [r[name]["accuracy"] - r["dense"]["accuracy"] for r in per_seed] if dense_bytes else None
        rows.append({
            "variant": name,
            "accuracy": statistics.fmean(accs),
            "stdev": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "delta_vs_dense": statistics.fmean(deltas) if deltas else None,
            "bytes": per_seed[0][name]["bytes"],
            "size_x": dense_bytes / per_seed[0][name]["bytes"] if dense_bytes else None,
        })
    return rows


def format_table(rows, seeds) -> str:
    lines = [
        f"| variant | test accuracy % (mean ± sd, {seeds} seeds) | Δ vs dense (points) | linear layers KB | size × |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "–" if r["variant"] == "dense" or r["delta_vs_dense"] is None else f"{r['delta_vs_dense']:+.2f}"
        size_x = f"{r['size_x']:.2f}" if r["size_x"] else "–"
        lines.append(
            f"| {r['variant']} | {r['accuracy']:.2f} ± {r['stdev']:.2f} | {delta} | "
            f"{r['bytes'] / 1024:.1f} | {size_x} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40, help="dense pre-training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=20, help="dense / QAT / sparse fine-tuning epochs")
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)
    logging.getLogger("leanops").setLevel(logging.ERROR)  # the 10-wide head is left dense by 2:4
    # a 64x256 MLP gains nothing from several threads, and loses a lot on a busy machine
    torch.set_num_threads(1)
    rows = run(args.seeds, args.epochs, args.finetune_epochs, args.hidden)
    print()
    print(format_table(rows, args.seeds))
    return rows


if __name__ == "__main__":
    main()
