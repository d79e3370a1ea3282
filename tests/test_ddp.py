"""Distributed training with leanops layers, two CPU processes on the gloo backend.

DDP: QAT, int8-training, 2:4 sparse-training and frozen quantised / sparse layers under LoRA-style
adapters train a few steps on different data per rank; the replicas must agree bit for bit (every
gradient was all-reduced, the custom ops' backward included) and match one process training on
both ranks' data to rounding.

FSDP2 (torch.distributed.fsdp.fully_shard): a full state_dict of each kind of leanops model loads
into its sharded copy (set_model_state_dict) and gives the unsharded model's output; the
trainable kinds then train a step sharded.

One mp.spawn runs every scenario (starting the processes is most of the cost); each scenario
reports "ok" or its error, and the tests below read those reports.
"""

import datetime
import json
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3


class LoRA(nn.Module):
    """A frozen base layer plus a trainable low-rank update: base(x) + (x A^T) B^T."""

    def __init__(self, base, rank=4):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.randn(rank, base.in_features) / base.in_features**0.5)
        self.b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def _mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))


def _build(kind):
    """A deterministic model of `kind` (same on every rank)."""
    import leanops
    import leanops.qat

    torch.manual_seed(0)
    model = _mlp()
    if kind == "qat_int8_dynamic":
        leanops.qat.prepare_(model, leanops.Int8DynamicConfig())
    elif kind == "qat_int4_learnable_scales":
        leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(32, symmetric=False), learnable_scales=True)
    elif kind == "int8_training":
        leanops.quantize_(model, leanops.Int8TrainingConfig())
    elif kind in ("int8_weight_only_lora", "int4_lora", "sparse24_lora"):
        config = {
            "int8_weight_only_lora": leanops.Int8WeightOnlyConfig(),
            "int4_lora": leanops.Int4WeightOnlyConfig(32),
        }.get(kind)
        if config is not None:
            leanops.quantize_(model, config)
        else:
            leanops.sparsify_(model, leanops.SemiSparseConfig())
        model[0], model[2] = LoRA(model[0]), LoRA(model[2])
    elif kind == "sparse24_qat_int4":
        from leanops.sparsity import enable_sparse_training

        leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(64))
        enable_sparse_training(model)
    elif kind == "converted_quantised":
        leanops.qat.prepare_(model, leanops.Int8DynamicConfig(), filter_fn=lambda m, n: n == "0")
        leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(32), filter_fn=lambda m, n: n == "2",
                             learnable_scales=True)
        leanops.qat.convert_(model)
    else:
        raise ValueError(kind)
    return model


DDP_KINDS = ["qat_int8_dynamic", "qat_int4_learnable_scales", "int8_training",
             "int8_weight_only_lora", "int4_lora", "sparse24_qat_int4", "sparse24_lora"]
FSDP_KINDS = ["qat_int4_learnable_scales", "int8_training", "converted_quantised",
              "int4_lora", "sparse24_lora"]
SPARSE_KINDS = {"sparse24_qat_int4", "sparse24_lora"}


def _batch(seed, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=gen), torch.randn(n, 64, generator=gen)


def _train(model, batches):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    losses = []
    for x, y in batches:
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _flat_state(state):
    # float64 holds every fp32 / bf16 / int8 / uint8 value exactly: equal vectors = equal bits
    return torch.cat([t.detach().double().reshape(-1) for t in state.values()])


def _ddp_scenario(kind, rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(_build(kind))
    steps = [_batch(100 * step + rank) for step in range(STEPS)]
    losses = _train(ddp, steps)
    mine = _flat_state(ddp.module.state_dict())
    gathered = [torch.empty_like(mine) for _ in range(WORLD)]
    dist.all_gather(gathered, mine)
    if not all(torch.equal(g, gathered[0]) for g in gathered):
        diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
        raise AssertionError(f"replicas differ after {STEPS} DDP steps (max |diff| {diff:g})")
    if not all(abs(v) < 1e6 for v in losses):  # NaN fails too
        raise AssertionError(f"losses not finite: {losses}")
    # one process on both ranks' data: the all-reduced mean gradient is the full batch's
    single = _build(kind)
    full = []
    for s in range(STEPS):
        xs, ys = zip(*(_batch(100 * s + r) for r in range(WORLD)), strict=True)
        full.append((torch.cat(xs), torch.cat(ys)))
    _train(single, full)
    ref = _flat_state(single.state_dict())
    err = float((ref - mine).abs().max())
    if err > 1e-5:
        raise AssertionError(f"DDP result differs from single-process training by {err:g}")
    return {"losses": losses}


def _fsdp_scenario(kind, rank):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    trained = _build(kind)
    _train(trained, [_batch(7)])  # a state that differs from a fresh build
    full = {k: v.clone() for k, v in trained.state_dict().items()}
    x, y = _batch(8)
    with torch.no_grad():
        expected = trained(x)

    model = _build(kind)
    mesh = init_device_mesh("cpu", (WORLD,))
    for module in model:
        if any(p.requires_grad for p in module.parameters()):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        got = model(x)
    if not torch.equal(got, expected):
        raise AssertionError(f"sharded output differs by {float((got - expected).abs().max()):g}")
    _train(model, [(x, y)])  # a sharded training step (all-gather, reduce-scatter)
    after = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    if set(after) != set(full):
        raise AssertionError(f"state_dict keys changed: {sorted(set(after) ^ set(full))}")
    return {}


def _sparsity_available():
    try:
        import leanops.sparsity  # noqa: F401

        return hasattr(__import__("leanops"), "sparsify_")
    except ImportError:
        return False


def _worker(rank, port, out_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    reports = {}
    try:
        sparse = _sparsity_available()
        for mode, kinds, run in (("ddp", DDP_KINDS, _ddp_scenario), ("fsdp2", FSDP_KINDS, _fsdp_scenario)):
            for kind in kinds:
                name = f"{mode}-{kind}"
                if kind in SPARSE_KINDS and not sparse:
                    reports[name] = {"status": "skipped", "reason": "leanops.sparsity is not available"}
                    continue
                try:
                    reports[name] = {"status": "ok", **run(kind, rank)}
                except Exception:
                    reports[name] = {"status": "failed", "error": traceback.format_exc()}
                dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(reports, f)
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


@pytest.mark.parametrize("name", [f"ddp-{k}" for k in DDP_KINDS] + [f"fsdp2-{k}" for k in FSDP_KINDS])
def test_distributed(reports, name):
    for rank, report in enumerate(reports):
        entry = report[name]
        if entry["status"] == "skipped":
            pytest.skip(entry["reason"])
        assert entry["status"] == "ok", f"rank {rank}:\n{entry.get('error')}"
