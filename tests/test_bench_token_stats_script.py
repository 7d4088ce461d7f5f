"""``bench/bench_token_stats.py`` runs end to end on tiny shapes (numbers are not checked:
benchmarks assert nothing about speed), in both of its conditions."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_token_stats as B  # noqa: E402


def test_round_robin_times_every_contender_each_round_after_the_hook():
    calls: list[str] = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = B.time_round_robin(fns, rounds=4, warmup=0, before=lambda: calls.append("head"))
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert calls[0::2] == ["head"] * 12  # the hook runs before every timed call
    orders = {tuple(calls[1 + 6 * r:6 * r + 6:2]) for r in range(4)}
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)


def test_after_lm_head_runs_the_decode_shapes_on_head_written_logits(tmp_path):
    shapes = [((2, 96), torch.float32), ((16, 96), torch.float32)]
    res = B.run(rounds=2, warmup=0, compile_baseline=False, shapes=shapes, after_lm_head=8)
    assert res["after_lm_head"] == 8
    assert [r["shape"] for r in res["results"]] == [[2, 96]]  # N <= 8 only
    assert "floor" in res["results"][0]["min_ms"] and "cpu" in res["results"][0]["min_ms"]
    x = torch.zeros(2, 96)
    B.lm_head(x, 8)()
    assert x.abs().sum() > 0  # the head wrote the logits the contenders read
    assert "distance to the read floor" in B.format_table(res)
    pool = res["results"][0]["pool"]
    if pool is not None:  # the CPU kernel's pool: what decided whether the helper woke
        assert pool["policy"] in ("auto", "always", "never") and pool["calls"] >= 0
        assert "thread pool" in B.format_table(res)
