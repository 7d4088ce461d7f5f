"""pytest-benchmark wiring of ``bench_token_stats.py`` (same shapes, same contenders).

Not part of the default test run (``testpaths = ["tests"]``); run it explicitly:

    python -m pytest bench/test_bench_token_stats.py --benchmark-columns=median,min,rounds

Each benchmark is grouped by shape and dtype, so pytest-benchmark's table shows the
contenders of one shape side by side. Set ``MLLMCAL_BENCH_COMPILE=0`` to skip the
``torch.compile`` baseline (its first call compiles, which takes a while on 2 cores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_token_stats import SHAPES, contenders, make_case  # noqa: E402

COMPILE = os.environ.get("MLLMCAL_BENCH_COMPILE", "1") != "0"
METHODS = [
    "cpu", "cpu_read", "cpu_kernel", "cpu_1thread", "torch", "eager", "compiled", "exp", "exp_out", "floor",
]
_cases: dict = {}


def _fns(shape, dtype):
    key = (shape, dtype)
    if key not in _cases:
        x, y = make_case(shape, dtype)
        _cases[key] = contenders(x, y, COMPILE, torch.get_num_threads())
    return _cases[key]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "shape,dtype", SHAPES, ids=[f"{s[0]}x{s[1]}-{str(d).replace('torch.', '')}" for s, d in SHAPES]
)
def test_token_stats_speed(benchmark, shape, dtype, method):
    fns = _fns(shape, dtype)
    if method not in fns:
        pytest.skip(f"{method} does not apply here (backend missing, or no thread split)")
    benchmark.group = f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')}"
    f = fns[method]
    f()  # warm-up (and torch.compile's compilation) outside the timed rounds
    benchmark.pedantic(f, rounds=10, warmup_rounds=1)
