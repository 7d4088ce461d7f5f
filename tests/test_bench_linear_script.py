"""``bench/bench_linear_token_stats.py`` as a user runs it: every dtype the library takes
(fp16 once crashed its worker with a KeyError), a clear error for another one, and
``--out`` instead of the default results file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_linear_token_stats.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("fit", [False, True], ids=["token_stats", "fit"])
def test_fp16_runs_and_writes_where_asked(tmp_path, fit):
    out = tmp_path / "r.json"
    got = _run("--size", "64", "32", "3000", "--dtypes", "float16", "--repeat", "1",
               "--out", str(out), *(["--fit"] if fit else []))
    assert got.returncode == 0, got.stderr
    assert any(line.startswith("float16 ") for line in got.stdout.splitlines()), got.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float16"]
    assert rows[0]["logits_bytes"] == 64 * 3000 * 2
    assert rows[0]["fused"]["best_s"] > 0 and rows[0]["materialised"]["best_s"] > 0


def test_an_unknown_dtype_is_refused_by_name():
    got = _run("--quick", "--dtypes", "float32,float8")
    assert got.returncode == 2
    assert "'float8'" in got.stderr and "float16" in got.stderr
