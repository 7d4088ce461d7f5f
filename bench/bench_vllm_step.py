"""The vLLM V1 processor's cost per engine step on the engine thread, against the
``token_stats`` call it makes, measured in one run (no engine: the processor is driven
as vLLM's V1 runner drives it, ``update_state`` then ``apply``).

Each round times one processor step on ``[B, V]`` fp32 logits and one bare
``mllmcal.token_stats`` call on the same logits, interleaved; the table gives min and
median µs and the ratio step / token_stats (1.0 would be a processor that costs nothing
beyond its statistics). The drain thread's work (turning the steps into records) is not
in the step: it runs beside the engine, not on its thread. Needs vLLM (``.venv-vllm``):

    PYTHONPATH=. .venv-vllm/bin/python bench/bench_vllm_step.py              # B = 1, 16
    PYTHONPATH=. .venv-vllm/bin/python bench/bench_vllm_step.py --batches 4 --rounds 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from types import SimpleNamespace

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

import mllmcal
from mllmcal.integrations.vllm import CalibratedLogitsProcessor


def measure(b: int, vocab: int, rounds: int, work: str) -> dict[str, list[float]]:
    """Seconds per processor step and per bare token_stats call, ``rounds`` each."""
    cfg = SimpleNamespace(additional_config={"mllmcal": {
        "records": os.path.join(work, f"records_{b}.jsonl"), "metrics": False,
        "flush_interval": 3600.0}})
    proc = CalibratedLogitsProcessor(cfg, torch.device("cpu"), False)
    outs: list[list[int]] = [[] for _ in range(b)]
    proc.update_state(BatchUpdate(b, [], [(i, SamplingParams(max_tokens=1 << 30), [1, 2], outs[i])
                                          for i in range(b)], []))
    logits = torch.randn(b, vocab, generator=torch.Generator().manual_seed(b)) * 3

    def step() -> None:
        proc.update_state(None)
        proc.apply(logits)
        for out in outs:  # the engine appends each row's sampled token
            out.append(1)

    times: dict[str, list[float]] = {"step": [], "token_stats": []}
    for i in range(rounds + 50):
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        mllmcal.token_stats(logits, temperature=1.0)
        t2 = time.perf_counter()
        if i >= 50:  # warm-up
            times["step"].append(t1 - t0)
            times["token_stats"].append(t2 - t1)
        if i % 250 == 249:
            proc.tracker.drain()  # what the drain thread would have done meanwhile
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--vocab", type=int, default=32000, help="bench_vllm.py's toy model: 32000")
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args(argv)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"torch threads {torch.get_num_threads()}, load {load}")
    print(f"{'B':>4} {'V':>7} | {'step min':>9} {'step med':>9} | {'stats min':>9} "
          f"{'stats med':>9} | step/stats min  med")
    with tempfile.TemporaryDirectory() as work:
        for b in args.batches:
            t = measure(b, args.vocab, args.rounds, work)
            s_min, s_med = min(t["step"]) * 1e6, statistics.median(t["step"]) * 1e6
            k_min, k_med = min(t["token_stats"]) * 1e6, statistics.median(t["token_stats"]) * 1e6
            print(f"{b:>4} {args.vocab:>7} | {s_min:>9.1f} {s_med:>9.1f} | {k_min:>9.1f} "
                  f"{k_med:>9.1f} | {s_min / k_min:>8.2f}x {s_med / k_med:>5.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
