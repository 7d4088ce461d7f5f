"""The CPU kernel's thread-pool wake policies side by side, in the conditions a call meets.

``csrc/cpu/split_pool.h`` wakes its helper thread for a call under one of three policies:
``auto`` (the default: only when the wake is expected to gain time, from the wake-ups it
timed), ``always`` (every call, as before the policy existed) and ``never``. Which is
fastest depends on what ran before the call, so each is timed after each of:

* ``tight``: nothing (calls back to back, with the other policies' calls between);
* ``amax``: a torch op on the same logits (torch's OpenMP workers then spin for a while);
* ``sleep2ms``: 2 ms of sleep (a decode step's forward pass, with the CPUs idle);
* ``lmhead``: the LM head ``[N, 896] @ [896, V]`` writing the logits, as in a decode step.

``mllmcal.token_stats`` (public call, default threads) and the read floor
``x.view(torch.int32).amax(-1)`` are timed round-robin in a fresh random order each round;
the table gives best and median µs and best/floor. Not a test: it asserts nothing.

    python bench/bench_pool_policy.py                    # [1, 151936], [8, 151936], [16, 32000]
    python bench/bench_pool_policy.py --rounds 50 --shapes 1x151936
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

import mllmcal
from mllmcal._backends.compiled import cpu
from mllmcal.reference import make_labels, make_logits

POLICIES = ("auto", "always", "never")
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_pool_policy.json"


def scenarios(x: torch.Tensor, hidden: int = 896) -> dict[str, object]:
    n, v = x.shape
    g = torch.Generator().manual_seed(v)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(v, hidden, generator=g) * hidden ** -0.5
    return {"tight": None, "amax": lambda: x.view(torch.int32).amax(-1),
            "sleep2ms": lambda: time.sleep(0.002), "lmhead": lambda: torch.matmul(h, w.T, out=x)}


def run_shape(n: int, v: int, rounds: int) -> dict[str, object]:
    x = make_logits(n, v, torch.float32, "normal", seed=1)
    y = make_labels(n, v, seed=1, ignore_frac=0.0)
    out: dict[str, object] = {}
    for name, before in scenarios(x).items():
        times: dict[str, list[float]] = {p: [] for p in (*POLICIES, "floor")}
        order = list(times)
        rng = random.Random(0)
        cpu.pool_stats(reset=True)
        for _ in range(rounds):
            rng.shuffle(order)
            for who in order:
                if who != "floor":
                    cpu.pool_policy(who)
                if before is not None:
                    before()
                t0 = time.perf_counter()
                if who == "floor":
                    x.view(torch.int32).amax(-1)
                else:
                    mllmcal.token_stats(x, y)
                times[who].append(time.perf_counter() - t0)
        cpu.pool_policy("auto")
        floor = min(times["floor"])
        out[name] = {
            "best_us": {k: round(min(t) * 1e6, 2) for k, t in times.items()},
            "median_us": {k: round(statistics.median(t) * 1e6, 2) for k, t in times.items()},
            "best_over_floor": {k: round(min(t) / floor, 3) for k, t in times.items()},
            "pool": cpu.pool_stats(reset=True),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--shapes", default="1x151936,8x151936,16x32000")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if "cpu" not in mllmcal.available_backends("cpu"):
        from mllmcal._backends import unavailable_reason

        raise SystemExit(f"the CPU kernel is unavailable: {unavailable_reason('cpu')}")
    load0 = os.getloadavg()
    results = {}
    for shape in args.shapes.split(","):
        n, v = map(int, shape.split("x"))
        results[shape] = res = run_shape(n, v, args.rounds)
        print(f"[{n}, {v}] fp32, µs best / median (best/floor)")
        for name, r in res.items():
            cells = " | ".join(f"{k} {r['best_us'][k]:.1f} / {r['median_us'][k]:.1f} "
                               f"({r['best_over_floor'][k]:.2f}x)" for k in (*POLICIES, "floor"))
            print(f"  {name:9s} {cells} | wake cost {r['pool']['wake_cost_us']:.0f} µs")
    cpuinfo = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                    if ln.startswith("model name")), "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": "mllmcal.token_stats per call under each thread-pool wake policy",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": cpuinfo, "logical_cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "kernel_isa": cpu.kernel_isa()},
        "load_average": {"start": load0, "end": os.getloadavg()},
        "rounds": args.rounds, "results": results,
    }, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
