#!/usr/bin/env bash
# Set up a development environment in ./.venv: pinned dependencies, then mllmcal built in
# place with its C++ (and, where nvcc is found, CUDA) kernels. Idempotent.
#   bash scripts/setup.sh           what `mllmcal` needs (about a minute)
#   bash scripts/setup.sh --tests   also the three extra environments the test suite drives:
#                                   .venv-tf-latest (newest transformers 5.x), .venv-vllm
#                                   (the vLLM CPU engine; ~3.3 GB) and .venv-sglang (SGLang's
#                                   CPU engine; ~2.9 GB); a few minutes each
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# torch is pinned by constraints.txt: an unpinned torch would pull a multi-GB CUDA build.
python -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
# No build isolation: the build must see the torch above, never fetch another one.
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python -c "import mllmcal; print('mllmcal', mllmcal.__version__, 'backends on cpu:', mllmcal.available_backends('cpu'))"
if [ "${1:-}" = "--tests" ]; then
  # The newest transformers next to the same torch, for the integration tests.
  bash scripts/setup_tf_latest.sh
  bash scripts/setup_vllm.sh  # .venv-vllm: the vLLM CPU engine for tests/test_integration_vllm.py
  bash scripts/setup_sglang.sh  # .venv-sglang: SGLang's CPU engine for tests/test_integration_sglang.py
elif [ -n "${1:-}" ]; then
  echo "setup.sh: unknown option $1 (the only option is --tests)" >&2
  exit 2
fi
