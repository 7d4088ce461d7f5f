"""Benchmark of ``token_stats`` on the CPU: the C++ kernel and the torch composite
against what users write today. Not a test: it asserts nothing about speed.

Contenders, on the same tensor in the same run (the baselines are imported from
``mllmcal.reference`` so the thing measured is the thing tested):

* ``cpu``      -- ``mllmcal.token_stats(..., backend="cpu")`` (the C++ kernel)
* ``cpu_read`` -- the same, then reading the four fields a decode loop keeps (confidence,
  entropy, logsumexp, prediction): the fields of a result are views made when first read
* ``cpu_kernel`` -- the same kernel called directly (``mllmcal._backends.compiled.cpu``),
  without the Python layer; ``cpu_1thread`` the same with one thread (few-row shapes)
* ``torch``    -- ``mllmcal.token_stats(..., backend="torch")`` (chunked fp32 composite)
* ``eager``    -- ``eager_composite``: log_softmax, max, entropy, gather, Brier in eager torch
* ``compiled`` -- ``torch.compile(eager_composite)``
* ``exp``      -- ``torch.exp(x)``: the floor of any one-exp-per-element pass
* ``exp_out``  -- ``torch.exp(x, out=buf)``: the same without allocating the output
* ``floor``    -- ``x.view(torch.int32).amax(-1)``: one read of the same bytes with the
  same threads, the memory floor; ``cpu/floor`` (best of the rounds, as medians swing
  with load) is the kernel's distance to it

Methods are timed round-robin (one call of each per round, in a fresh random order each round)
so that load from other processes and the cost of coming first hit all of them alike; the table gives medians and ratios from one run.

    python bench/bench_token_stats.py            # prints the table, writes the JSON
    python bench/bench_token_stats.py --quick    # fewer rounds, no torch.compile
    python bench/bench_token_stats.py --no-compile --after-lm-head 896   # decode-loop conditions

With ``--after-lm-head H`` every timed call (the floor's too) follows an untimed LM head
``[N, H] @ [H, V]`` that writes the logits, as in a decode step; only N <= 8 shapes run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

import mllmcal
from mllmcal.reference import eager_composite, make_labels, make_logits

SHAPES: list[tuple[tuple[int, int], torch.dtype]] = [
    ((64, 131072), torch.float32),
    ((64, 131072), torch.bfloat16),
    ((1, 131072), torch.float32),
    ((1, 131072), torch.bfloat16),
    ((256, 32000), torch.float32),
    ((8, 151936), torch.float32),
    ((1, 151936), torch.float32),
]
RESULTS = Path(__file__).resolve().parent / "results" / "cpu_token_stats.json"


def make_case(shape: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    n, v = shape
    return make_logits(n, v, dtype, "normal", seed=n + v), make_labels(n, v, seed=n, ignore_frac=0.0)


def contenders(
    x: torch.Tensor, y: torch.Tensor, compile_baseline: bool, threads: int
) -> dict[str, Callable[[], object]]:
    """Zero-argument callables, one per method, all on the same ``x``/``y``."""
    out = torch.empty_like(x)
    fns: dict[str, Callable[[], object]] = {}
    if "cpu" in mllmcal.available_backends("cpu"):
        from mllmcal._backends.compiled import cpu

        fns["cpu"] = lambda: mllmcal.token_stats(x, y, backend="cpu")

        def read() -> object:
            s = mllmcal.token_stats(x, y, backend="cpu")
            return s.confidence, s.entropy, s.logsumexp, s.prediction

        fns["cpu_read"] = read
        n = x.shape[0]
        fstats = torch.empty(7, n)
        pred = torch.empty(n, dtype=torch.int64)
        flags = torch.empty(n, dtype=torch.uint8)

        def direct(threads: int | None) -> Callable[[], object]:
            # The kernel alone, without token_stats' Python layer (a few µs warm here),
            # and without toggling torch.set_num_threads (which stalls the next torch op).
            return lambda: cpu.token_stats_into(x, y, 1.0, None, fstats, pred, flags, None, None,
                                                -100, num_threads=threads)

        fns["cpu_kernel"] = direct(None)
        if threads > 1 and x.shape[0] < threads:
            fns["cpu_1thread"] = direct(1)
    fns["torch"] = lambda: mllmcal.token_stats(x, y, backend="torch")
    fns["eager"] = lambda: eager_composite(x, y)
    if compile_baseline:
        compiled = torch.compile(eager_composite, dynamic=False)
        fns["compiled"] = lambda: compiled(x, y)
    fns["exp"] = lambda: torch.exp(x)
    fns["exp_out"] = lambda: torch.exp(x, out=out)
    fns["floor"] = lambda: x.view(torch.int32).amax(-1)
    return fns


def time_round_robin(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                     before: Callable[[], object] | None = None) -> dict[str, list[float]]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    order = random.Random(0)
    for _ in range(rounds):
        # A fresh order each round: a call is slower or faster by what ran just before it
        # (torch's OpenMP workers still spinning after a torch op, other code in the
        # caches), and a fixed order would give each contender the same predecessor in
        # every round (a rotation would too).
        order.shuffle(names)
        for name in names:
            if before is not None:
                before()  # untimed: what the decode loop runs before the call
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def machine_info() -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, object] = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "mllmcal": mllmcal.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = os.getloadavg()
    if "cpu" in mllmcal.available_backends("cpu"):
        from mllmcal._backends.compiled import cpu

        info["cpu_kernel_isa"] = cpu.kernel_isa()
    return info


def pool_stats(reset: bool) -> dict[str, object] | None:
    """The CPU kernel's thread pool: its wake policy, how many calls woke the helper and
    the estimates it decided by (csrc/cpu/split_pool.h); None without the kernel."""
    if "cpu" not in mllmcal.available_backends("cpu"):
        return None
    from mllmcal._backends.compiled import cpu

    return {"policy": cpu.pool_policy(), **cpu.pool_stats(reset=reset)}


def lm_head(x: torch.Tensor, hidden: int) -> Callable[[], object]:
    """The decode step's last op before the statistics: ``x = h @ W.T`` for ``h`` ``[N, H]``
    and ``W`` ``[V, H]``, written into ``x`` (the logits every contender then reads)."""
    n, v = x.shape
    g = torch.Generator().manual_seed(v)
    h = torch.randn(n, hidden, generator=g).to(x.dtype)
    w = (torch.randn(v, hidden, generator=g) * hidden ** -0.5).to(x.dtype)
    return lambda: torch.matmul(h, w.T, out=x)


def run(rounds: int = 15, warmup: int = 3, compile_baseline: bool = True,
        shapes: list[tuple[tuple[int, int], torch.dtype]] | None = None,
        after_lm_head: int = 0) -> dict[str, object]:
    """Time every contender on every shape; returns the JSON-able result. With
    ``after_lm_head=H`` each timed call follows an (untimed) ``[N, H] @ [H, V]`` head into
    the logits, as in a decode loop, and only the decode shapes (N <= 8) run."""
    threads = torch.get_num_threads()
    rows = []
    cases = shapes or SHAPES
    if after_lm_head:
        cases = [(shape, dtype) for shape, dtype in cases if shape[0] <= 8]
    for shape, dtype in tqdm(cases, desc="shapes", unit="shape"):
        x, y = make_case(shape, dtype)
        fns = contenders(x, y, compile_baseline, threads)
        before = lm_head(x, after_lm_head) if after_lm_head else None
        pool = pool_stats(reset=True)
        times = time_round_robin(fns, rounds, warmup, before)
        med = {k: statistics.median(v) for k, v in times.items()}
        pool = pool_stats(reset=False)
        rows.append({
            "pool": pool,
            "shape": list(shape),
            "dtype": str(dtype).replace("torch.", ""),
            "median_ms": {k: round(v * 1e3, 4) for k, v in med.items()},
            "min_ms": {k: round(min(v) * 1e3, 4) for k, v in times.items()},
        })
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "rounds": rounds,
        "after_lm_head": after_lm_head,
        "results": rows,
    }


def row_label(r: dict) -> str:
    """A result row's shape and dtype, aligned, as every table here opens its lines."""
    return f"{'x'.join(map(str, r['shape'])):>14} {r['dtype']:>9} |"


def ratio(med: dict[str, float], slow: str, fast: str) -> str:
    if slow not in med or fast not in med:
        return "-"
    return f"{med[slow] / med[fast]:.2f}x"


def format_table(result: dict[str, object]) -> str:
    """Median times, then the ratios (baseline time / fast time: > 1 means faster)."""
    rows = result["results"]
    methods = ["cpu", "cpu_read", "cpu_kernel", "cpu_1thread", "torch", "eager", "compiled", "exp",
               "exp_out", "floor"]
    lines = []
    head = f"{'shape':>14} {'dtype':>9} | " + " ".join(f"{m:>11}" for m in methods)
    lines.append("median ms (" + ", ".join(f"{k}={v}" for k, v in result["machine"].items()
                                            if k in ("cpu", "torch_threads", "cpu_kernel_isa", "loadavg_1_5_15")) + ")")
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        med = r["median_ms"]
        cells = " ".join(f"{med[m]:>11.3f}" if m in med else f"{'-':>11}" for m in methods)
        lines.append(f"{row_label(r)} {cells}")
    lines.append("")
    pairs = [("eager", "cpu"), ("compiled", "cpu"), ("torch", "cpu"), ("cpu", "exp"),
             ("cpu", "exp_out"), ("cpu_1thread", "cpu_kernel"), ("cpu", "cpu_kernel"), ("eager", "torch")]
    head = f"{'shape':>14} {'dtype':>9} | " + " ".join(f"{a + '/' + b:>16}" for a, b in pairs)
    lines.append("ratios of medians (a/b; for x/cpu > 1 means cpu is faster; cpu/exp is the distance to the exp floor)")
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        med = r["median_ms"]
        cells = " ".join(f"{ratio(med, a, b):>16}" for a, b in pairs)
        lines.append(f"{row_label(r)} {cells}")

    def floor_cells(r: dict) -> str:
        best = r["min_ms"]
        return (f"cpu {best.get('cpu', float('nan')):.4f} ms  kernel "
                f"{best.get('cpu_kernel', float('nan')):.4f} ms  floor {best['floor']:.4f} ms"
                f"  cpu/floor {ratio(best, 'cpu', 'floor')}  cpu_read/floor "
                f"{ratio(best, 'cpu_read', 'floor')}  kernel/floor "
                f"{ratio(best, 'cpu_kernel', 'floor')}")

    def pool_cells(r: dict) -> str:
        p = r["pool"]
        return (f"{p['policy']}: woke {p['woken']}/{p['calls']} calls, helper ran "
                f"{p['helper_items']} items, wake cost {p['wake_cost_us']:.1f} us")

    sections = [("distance to the read floor, best of the rounds (goal: <= 2x at [64, 131072], "
                 "<= 4x at [1|8, 151936])", rows, floor_cells),
                ("CPU kernel's thread pool (csrc/cpu/split_pool.h): calls that woke the helper, "
                 "items it ran, wake cost it decided by", [r for r in rows if r.get("pool")],
                 pool_cells)]
    for title, some, cells_of in sections:
        if some:
            lines += ["", title, *(f"{row_label(r)} {cells_of(r)}" for r in some)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="5 rounds, no torch.compile")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--out", type=Path, default=None, help="JSON output path")
    ap.add_argument("--after-lm-head", type=int, default=0, metavar="H",
                    help="decode-loop conditions: before each timed call, an untimed LM head "
                         "[N, H] @ [H, V] writes the logits (N <= 8 shapes only; e.g. 896)")
    args = ap.parse_args(argv)
    rounds = 5 if args.quick else args.rounds
    result = run(rounds=rounds, compile_baseline=not (args.quick or args.no_compile),
                 after_lm_head=args.after_lm_head)
    if args.out is None:
        args.out = (RESULTS.with_name(f"cpu_token_stats_after_lm_head_{args.after_lm_head}.json")
                    if args.after_lm_head else RESULTS)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
