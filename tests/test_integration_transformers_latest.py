"""The transformers integration tests and the eval's architecture tests again, on the newest
transformers 5.x release.

``scripts/setup_tf_latest.sh`` (called by ``scripts/setup.sh --tests``) installs that release into
``.venv-tf-latest`` (a ``pip install --target`` directory, version in
``constraints-tf-latest.txt``); these tests run ``test_integration_transformers.py`` and
``test_eval_architectures.py`` in a subprocess with it first on ``PYTHONPATH``, in front of the project venv that supplies
torch and the compiled kernels. In CI (``CI=true``) a missing environment is a failure,
not a skip: both transformers lines are part of the contract.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / ".venv-tf-latest"


def _wanted_version() -> str:
    text = (REPO / "constraints-tf-latest.txt").read_text()
    m = re.search(r"^transformers==(\S+)", text, flags=re.M)
    assert m, "constraints-tf-latest.txt must pin transformers==X.Y.Z"
    return m.group(1)


def _env() -> dict[str, str]:
    if not (TARGET / "transformers").is_dir():
        msg = f"{TARGET} is missing: run `bash scripts/setup_tf_latest.sh`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TARGET), str(REPO)])
    env["MLLMCAL_EXPECT_TRANSFORMERS"] = _wanted_version()
    return env


def _pytest(env: dict[str, str], test_file: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run one test file of this repository in a subprocess with ``env``; the process and
    the tail of its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(REPO / "tests" / test_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    return proc, (proc.stdout + proc.stderr)[-6000:]


def test_eval_architecture_tests_pass_on_the_newest_transformers():
    """Real checkpoints' processors and chat-template handling change between releases
    (5.2x turns template variables into plain data, for one): the eval must follow."""
    env, want = _env(), _wanted_version()
    probe = subprocess.run([sys.executable, "-c", "import transformers; print(transformers.__version__)"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == want, probe.stdout + probe.stderr
    proc, tail = _pytest(env, "test_eval_architectures.py")
    assert proc.returncode == 0, f"eval architecture tests failed on transformers {want}:\n{tail}"
    assert " passed" in proc.stdout.splitlines()[-1] and "skipped" not in proc.stdout.splitlines()[-1], tail


def test_integration_tests_pass_on_the_newest_transformers():
    want = _wanted_version()
    env = _env()
    proc, tail = _pytest(env, "test_integration_transformers.py")
    assert proc.returncode == 0, f"integration tests failed on transformers {want}:\n{tail}"
    # The version check inside ran (it skips only when no version is asked for).
    assert " skipped" not in proc.stdout.splitlines()[-1], tail
