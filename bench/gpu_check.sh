#!/usr/bin/env bash
# Everything that needs a GPU, in tiers that each fit one device command (at most 8 minutes):
#
#   bash bench/gpu_check.sh --plan              every tier's steps, budgets and estimates
#   bash bench/gpu_check.sh [--tier NAME]       run one tier (default: "default") into $OUT
#   bash bench/gpu_check.sh --tier NAME --out DIR
#
# Tiers (bench/gpu_plan.py holds the plan, its budgets and why; tests/test_gpu_plan.py checks
# them in CI): default (load, CUDA C++ kernel tests, Triton tests, first speed ratios, a few
# energy rows, compute-sanitizer), configs (every-config and >2^31-element tests, the autotuner),
# suite (the CPU suite with a GPU visible), sweep / sweep13b (full matmul and attention sweeps),
# tune (bench/tune_gemm.py), energy (energy on every row), int8_attention (issue 13: int8 vs
# 16-bit attention and SDPA, forward / backward / both, with energy; an attention block's
# training step), models (demo and examples).
#
# Every step runs under a timeout and is skipped with a note when the tier's time left is
# short; output goes to $OUT/console.log as it is printed, $OUT/status.json is rewritten after
# every step, and each step's JUnit XML / JSON lands in $OUT when it ends (at most 8 files).
#
# On the device (one H200, 15 min of device time): carry a prebuilt leanops._C made here with
# `./dev.sh compat --prebuild` (it goes to .gpu_carry/, ~3 MB), e.g.
#   run(command="bash bench/gpu_check.sh", carry=[".gpu_carry"], timeout_s=560)
# Without it the load step builds for the GPU's arch first and the tier's last steps are
# skipped for time. bench/NOTES.md ("The GPU window") says what fits the 64 MiB carry limit.
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_plan.py "$@"
