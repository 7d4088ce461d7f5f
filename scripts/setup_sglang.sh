#!/usr/bin/env bash
# Set up ./.venv-sglang: SGLang's CPU engine for tests/test_integration_sglang.py. Idempotent.
#   bash scripts/setup_sglang.sh             install the pinned set (constraints-sglang.txt)
#   bash scripts/setup_sglang.sh --resolve   re-resolve SGLang's dependencies (slow: pip
#                                            resolves ~150 packages) and rewrite the pins
#
# A TEST environment, not a recipe for serving. What it needs beyond `pip install sglang`:
# * torch==2.13.0, the CPU wheel (pinned: sglang's own torch pin is a multi-GB CUDA build);
#   sglang itself --no-deps, and of its dependencies neither the CUDA-only ones nor the
#   torch family (flash-attn, flashinfer, nvidia-*, sgl-kernel, torchaudio, ...).
# * torchvision 0.28.0 (transformers imports it) is PyPI's CUDA build: its compiled ops do
#   not load next to the CPU torch, and its __init__ then fails registering fake kernels
#   for them ("operator torchvision::nms does not exist"). This script patches the
#   installed torchvision/__init__.py IN THIS VENV ONLY so that _meta_registrations and
#   _autograd_registrations are imported only when torchvision.extension._has_ops() holds.
# * sgl_kernel has no CPU wheel. The tests put a stand-in that registers no ops
#   (tests/sglang/stubs/sgl_kernel) on the engine subprocess's PYTHONPATH; it is not
#   installed here.
# mllmcal is made importable through a .pth pointing at the repository root (SGLang's
# scheduler unpickles CalibratedLogitProcessor by name); tests set PYTHONPATH anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
SGLANG_VERSION=0.5.23
VENV=${SGLANG_VENV:-.venv-sglang}
PINS=$ROOT/constraints-sglang.txt
MARK="mllmcal test venv"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
# --no-compile: byte-compiling ~150 packages costs more CPU than the imports that follow.
PIP="$VPY -m pip install -q --disable-pip-version-check --no-compile"
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

installed() {
  "$VPY" -c "import importlib.metadata as m, sys; sys.exit(m.version('sglang') != '$SGLANG_VERSION')" \
    2>/dev/null && grep -q "$MARK" "$SITE/torchvision/__init__.py" 2>/dev/null
}

if [ "${1:-}" = "--resolve" ]; then
  $PIP "torch==2.13.0"
  $PIP --no-deps "sglang==$SGLANG_VERSION"
  CONS=$(mktemp); echo "torch==2.13.0" > "$CONS"
  REQ=$(mktemp)
  "$VPY" - "$REQ" <<'PY'
import importlib.metadata as m, re, sys
skip = re.compile(r"^(torch|torchaudio|torchvision|torchcodec|torch[-_]memory[-_]saver|cuda-python|flash-attn.*|flashinfer.*|humming-kernels|nvidia-.*|nvshmem.*|quack-kernels|sgl-.*|sglang-kernel|tilelang|timm|apache-tvm-ffi|av|decord2|deepseek-recipe|tml-renderers|kernels)$", re.I)
out = []
for r in m.requires("sglang") or []:
    if "extra ==" in r:
        continue
    if skip.match(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]):
        continue
    out.append(r)
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
  $PIP -c "$CONS" -r "$REQ" prometheus_client
  $PIP --no-deps "timm==1.0.25" "torchvision==0.28.0"
  rm -f "$CONS" "$REQ"
  { echo "# The resolved set of .venv-sglang (scripts/setup_sglang.sh --resolve wrote it)."
    "$VPY" -m pip freeze --disable-pip-version-check | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
  } > "$PINS"
  echo "wrote $PINS"
elif ! installed; then
  # Every package pinned and installed without resolution: seconds instead of minutes.
  $PIP --no-deps -r "$PINS"
fi

# The torchvision patch (see the top of this file). Idempotent; fails loudly if the file
# no longer looks as expected.
"$VPY" - "$SITE/torchvision/__init__.py" "$MARK" <<'PY'
import sys
path, mark = sys.argv[1], sys.argv[2]
src = open(path).read()
old = """from torchvision import (
    _autograd_registrations,
    _meta_registrations,
    datasets,"""
new = f"""# {mark} (scripts/setup_sglang.sh): these register fake kernels for the compiled
# ops, which this CUDA build cannot load next to the CPU torch.
if extension._has_ops():
    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401
from torchvision import (
    datasets,"""
if mark not in src:
    if old not in src:
        sys.exit(f"{path} is not the torchvision 0.28.0 this script patches")
    open(path, "w").write(src.replace(old, new))
PY
echo "$ROOT" > "$SITE/mllmcal-repo.pth"
"$VPY" -c "import sglang, mllmcal; print('sglang', sglang.__version__, 'with mllmcal', mllmcal.__version__, 'in $VENV')"
