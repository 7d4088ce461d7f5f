"""``bench/bench_vllm.py``'s statistics (the engine run itself needs vLLM: see
``tests/test_integration_vllm.py`` and ``bench/NOTES.md``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_vllm as B  # noqa: E402


def test_paired_ratio_cancels_drift_between_rounds():
    base = [100.0, 200.0, 50.0, 400.0]  # the machine's speed drifts 8x between rounds
    got = B.paired_ratio([97.0, 194.0, 48.5, 388.0], base)  # always 3% slower
    assert got["gmean"] == pytest.approx(0.97, rel=1e-12) and got["rounds"] == 4
    assert got["ci95"] == pytest.approx([0.97, 0.97], rel=1e-9)
    noisy = B.paired_ratio([110.0, 180.0, 55.0, 360.0], base)  # 1.1, 0.9, 1.1, 0.9
    assert noisy["gmean"] == pytest.approx(math.sqrt(1.1 * 0.9), rel=1e-12)
    lo, hi = noisy["ci95"]
    assert lo < 0.95 and hi > 1.04
