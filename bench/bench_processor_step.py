"""What keeping each step exact costs the logits processor, measured in one run.

The processor must keep the step's ``z = scores / T`` private until the chosen token is
known (the next call, or ``out.sequences``), because processors placed after it may edit
``scores`` in place (see ``mllmcal/integrations/transformers/processor.py``). The design
writes that copy from the fused kernel itself (``scaled_out=`` its own buffer). This
script times, per decode step on ``[B, V]`` fp32 scores, interleaved, median of repeats:

* ``stats``: ``token_stats`` alone (no private copy: not exact with hostile neighbours);
* ``fused_copy``: ``token_stats(..., scaled_out=buf)`` -- the design (one pass);
* ``separate_copy``: ``token_stats`` then ``buf.copy_(scores)`` (two passes);
* ``processor``: a full ``CalibratedLogitsProcessor`` call (fused copy + the gather), plus
  the ``torch.cat`` that grows ``input_ids`` as ``generate`` would (host overhead shows at B=1).

    python bench/bench_processor_step.py                       # B = 1, 16; V = 128256
    python bench/bench_processor_step.py --batches 4 --repeats 5   # quick look
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import mllmcal
from mllmcal.integrations.transformers import CalibratedLogitsProcessor


def _time(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def measure(b: int, vocab: int, t: float, repeats: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each mode on ``[b, vocab]`` fp32 scores."""
    scores = torch.randn(b, vocab) * 4
    buf = torch.empty_like(scores)
    proc = CalibratedLogitsProcessor(temperature=t)
    ids0 = torch.randint(0, vocab, (b, 8))
    state = {"ids": ids0}

    def processor_step():
        proc(state["ids"], scores)
        # Grow input_ids as generate does, so every call continues the run and gathers.
        state["ids"] = torch.cat([state["ids"], state["ids"][:, -1:]], 1)

    modes = {
        "stats": lambda: mllmcal.token_stats(scores, temperature=t, validate=False),
        "fused_copy": lambda: mllmcal.token_stats(scores, temperature=t, scaled_out=buf,
                                                  validate=False),
        "separate_copy": lambda: (mllmcal.token_stats(scores, temperature=t, validate=False),
                                  buf.copy_(scores)),
        "processor": processor_step,
    }
    times = {m: [] for m in modes}
    for rep in range(repeats + 1):
        for m, fn in modes.items():
            dt = _time(fn, inner)
            if rep:  # repeat 0 warms up
                times[m].append(dt)
        if rep % 8 == 0:  # keep the run's records short
            proc.reset()
            state["ids"] = ids0
    return {m: statistics.median(v) for m, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=1.3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "processor_step_cpu.json"))
    args = ap.parse_args()
    t = args.temperature
    results = {}
    for b in args.batches:
        med = measure(b, args.vocab, t, args.repeats, args.inner)
        results[str(b)] = {
            "median_seconds": med,
            "fused_copy_over_stats": med["fused_copy"] / med["stats"],
            "separate_copy_over_stats": med["separate_copy"] / med["stats"],
            "processor_over_stats": med["processor"] / med["stats"],
        }
        print(f"B={b:3d} V={args.vocab}: " + ", ".join(
            f"{m} {1e3 * s:.3f} ms" for m, s in med.items())
            + f" | fused_copy/stats {med['fused_copy'] / med['stats']:.2f}x, "
              f"separate_copy/stats {med['separate_copy'] / med['stats']:.2f}x, "
              f"processor/stats {med['processor'] / med['stats']:.2f}x")
    doc = {"meta": {"vocab": args.vocab, "temperature": t, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "machine": platform.machine(),
                    "repeats": args.repeats, "inner": args.inner},
           "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
