"""Benchmark of the calibration layer on the CPU.

1. Cost of ``CalibrationState.update_logits`` (fused statistics + histogram + NLL/Brier sums)
   relative to ``token_stats`` alone (no histogram): the histogram should be almost free.
   Target: ratio <= 1.2.
2. Memory: the state's tensor bytes, Python allocations (tracemalloc) and process RSS after
   10 and after 10**7 predictions; the state must not grow.

Run: ``python bench/bench_calibration.py [--quick]``. Prints one table; ratios are from
interleaved medians of the same run, so machine load affects both sides alike.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import tracemalloc

import torch
from tqdm.auto import tqdm

import mllmcal
from mllmcal.reference import make_labels, make_logits


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_ratio(n: int, v: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    x = make_logits(n, v, dtype, "normal", seed=n + v)
    y = make_labels(n, v, seed=n)
    state = mllmcal.CalibrationState(15)
    backend = mllmcal.token_stats(x[:1], y[:1]).backend
    for _ in range(2):  # warm-up
        mllmcal.token_stats(x, y)
        state.update_logits(x, y)
    t_base, t_state = [], []
    for _ in range(reps):  # interleaved, so drifting load hits both alike
        t0 = time.perf_counter()
        mllmcal.token_stats(x, y)
        t1 = time.perf_counter()
        state.update_logits(x, y)
        t2 = time.perf_counter()
        t_base.append(t1 - t0)
        t_state.append(t2 - t1)
    base, fused = statistics.median(t_base), statistics.median(t_state)
    return {"n": n, "v": v, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
            "token_stats_ms": base * 1e3, "update_logits_ms": fused * 1e3, "ratio": fused / base}


def memory_after(n_updates: int, chunk: int = 100_000) -> dict[str, int]:
    """Add ``n_updates`` predictions in chunks; report state bytes, tracemalloc, RSS."""
    gc.collect()
    state = mllmcal.CalibrationState(15)
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(min(chunk, n_updates), generator=g)
    correct = torch.rand(conf.numel(), generator=g) < conf
    tracemalloc.start()
    done = 0
    with tqdm(total=n_updates, desc=f"{n_updates:.0e} updates", unit="pred", leave=False) as bar:
        while done < n_updates:
            k = min(chunk, n_updates - done)
            state.update(conf[:k], correct[:k])
            done += k
            bar.update(k)
    gc.collect()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert state.count == n_updates
    return {"updates": n_updates, "state_bytes": state.nbytes(), "py_alloc_bytes": current,
            "rss_bytes": _rss_bytes()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and shapes")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (also the OpenMP pool the C++ kernel uses)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reps = 5 if args.quick else 15
    shapes = [(8, 32000, torch.float32), (256, 32000, torch.float32),
              (256, 32000, torch.bfloat16), (4096, 1000, torch.float32)]
    if args.quick:
        shapes = shapes[:2]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CPU backends available: {mllmcal.available_backends('cpu')}")
    print("\nupdate_logits vs token_stats alone (median of interleaved runs)")
    print(f"{'N':>6} {'V':>7} {'dtype':>9} {'backend':>8} {'token_stats ms':>15} "
          f"{'update_logits ms':>17} {'ratio':>6}")
    for n, v, dt in tqdm(shapes, desc="timing", leave=False):
        r = time_ratio(n, v, dt, reps)
        print(f"{r['n']:>6} {r['v']:>7} {r['dtype']:>9} {r['backend']:>8} "
              f"{r['token_stats_ms']:>15.3f} {r['update_logits_ms']:>17.3f} {r['ratio']:>6.3f}")
    print("\nmemory after N predictions added with state.update (chunks of 1e5); RSS includes"
          " the allocator's high-water mark from the 1e5-row temporaries")
    rows = [memory_after(n) for n in (10, 10**6, 10**7)]
    print(f"{'updates':>10} {'state bytes':>12} {'tracemalloc B':>14} {'RSS MiB':>9}")
    for r in rows:
        print(f"{r['updates']:>10,} {r['state_bytes']:>12,} {r['py_alloc_bytes']:>14,} "
              f"{r['rss_bytes'] / 2**20:>9.1f}")
    print(f"state bytes ratio 1e7 / 10 = {rows[2]['state_bytes'] / rows[0]['state_bytes']:.3f}")


if __name__ == "__main__":
    main()
