#!/usr/bin/env bash
# A second environment for the integration tests: the newest transformers 5.x next to the
# project's own torch. It is a `pip install --target` directory, not a venv: transformers
# alone goes into .venv-tf-latest (no dependencies, so pip can never bring another torch),
# and the tests put it first on PYTHONPATH in front of .venv's site-packages, which
# supplies torch 2.13.0 (CPU), tokenizers, huggingface_hub and the compiled mllmcal/_C*.so.
# tests/test_integration_transformers_latest.py runs the integration tests under it.
# Idempotent; the version is pinned in constraints-tf-latest.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=.venv-tf-latest
PY=${MLLMCAL_VENV_PYTHON:-.venv/bin/python}
SPEC=$(grep -E '^transformers==' constraints-tf-latest.txt)
if ! PYTHONPATH=$TARGET "$PY" -c "import sys, transformers; sys.exit(transformers.__version__ != '${SPEC#transformers==}')" 2>/dev/null; then
  rm -rf "$TARGET"
  "$PY" -m pip install -q --disable-pip-version-check --no-deps --target "$TARGET" "$SPEC"
fi
# Fail here, not in the tests, if the dependencies that .venv supplies do not fit.
PYTHONPATH=$TARGET "$PY" -c "import torch, transformers; from transformers import LlamaForCausalLM; print('transformers', transformers.__version__, 'with torch', torch.__version__, 'in $TARGET')"
