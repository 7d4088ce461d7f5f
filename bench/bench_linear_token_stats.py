"""Benchmark of ``linear_token_stats`` (and, with ``--fit``, of the one-pass temperature
accumulator's ``update_hidden``) on the CPU against materialising the logits.

Contenders, on the same inputs (hidden ``[N, H]``, head ``[V, H]``, labels), fp32 and bf16
by default (``--dtypes float32,bfloat16,float16`` adds fp16):

* ``materialised`` -- ``mllmcal.token_stats(hidden @ W.T, labels)``: the GEMM in the
  inputs' dtype writes the ``[N, V]`` logits, then the C++ kernel reads them.
* ``fused``        -- ``mllmcal.linear_token_stats(hidden, W, labels)``: fp32 vocabulary
  tiles through torch's GEMM into one buffer, statistics per tile, exact merge.

With ``--fit`` (JSON ``temperature_fit_hidden_cpu*.json``), the same pair for
:class:`mllmcal.calibration.TemperatureFitAccumulator` at its default 31 temperatures:
``materialised`` is ``acc.update(hidden @ W.T, labels)``, ``fused`` is
``acc.update_hidden(hidden, W, labels)`` (the fit kernel on each fp32 tile, online merge).

Each (dtype, contender) runs in its own subprocess, so that its peak memory can be read
from the process's peak RSS (``VmHWM``, reset just before the timed calls; ``ru_maxrss``
where that cannot be reset): "extra memory" is the peak RSS during the timed calls minus
the RSS just before them (inputs built, libraries loaded by a small
warm-up call). Time is the best of ``--repeat`` calls. The ratios divide the fused figures
by the materialised ones from the same run, and memory also by the size of the
materialised logits (``N * V * itemsize`` of the inputs' dtype).

Goal (default size, Qwen2.5-0.5B's head): time <= 1.1x, extra memory <= 2% of the logits.

    python bench/bench_linear_token_stats.py            # N=8192, H=896, V=151936 (minutes)
    python bench/bench_linear_token_stats.py --quick    # a smoke test in seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from _memory import peak_rss_bytes, reset_peak_rss, rss_bytes

FULL = (8192, 896, 151936)
QUICK = (512, 128, 8192)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS = Path(__file__).resolve().parent / "results" / "linear_token_stats_cpu.json"
FIT_RESULTS = RESULTS.with_name("temperature_fit_hidden_cpu.json")








def worker(variant: str, dtype_name: str, n: int, hd: int, v: int, repeat: int) -> dict:
    """Build the inputs, warm up on a slice, then time ``repeat`` full calls."""
    import mllmcal

    dtype = DTYPES[dtype_name]
    g = torch.Generator().manual_seed(0)
    # Made in place in their dtype: a temporary copy would raise the peak RSS that the
    # measurement below starts from.
    hidden = torch.randn(n, hd, generator=g, dtype=dtype)
    weight = torch.randn(v, hd, generator=g, dtype=dtype).div_(hd**0.5)
    labels = torch.randint(0, v, (n,), generator=g)

    def run(h, w, y):
        if variant == "materialised":
            return mllmcal.token_stats(h @ w.T, y)
        if variant == "fused":
            return mllmcal.linear_token_stats(h, w, y)
        from mllmcal.calibration import TemperatureFitAccumulator

        if variant == "fit_materialised":
            return TemperatureFitAccumulator().update(h @ w.T, y)
        return TemperatureFitAccumulator().update_hidden(h, w, y)

    run(hidden[:64], weight[:8192], labels[:64] % 8192)  # load kernels and thread pools
    before = rss_bytes()
    reset = reset_peak_rss()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        s = run(hidden, weight, labels)
        times.append(time.perf_counter() - t0)
        del s
    peak = peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "dtype": dtype_name, "best_s": min(times), "times_s": times,
            "extra_bytes": max(0, peak - before)}


def _spawn(variant: str, dtype: str, size: tuple[int, int, int], repeat: int) -> dict:
    n, hd, v = size
    out = subprocess.run(
        [sys.executable, __file__, "--worker", variant, dtype, str(n), str(hd), str(v),
         str(repeat)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"small size {QUICK}, no JSON")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per variant")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--size", nargs=3, type=int, metavar=("N", "H", "V"),
                    help="another size (the JSON goes to linear_token_stats_cpu_N_H_V.json)")
    ap.add_argument("--fit", action="store_true",
                    help="TemperatureFitAccumulator.update_hidden vs update(h @ W.T)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output path (default: bench/results/, named by size)")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        variant, dtype, n, hd, v, repeat = args.worker
        print(json.dumps(worker(variant, dtype, int(n), int(hd), int(v), int(repeat))))
        return
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown or not dtypes:
        ap.error(f"--dtypes: unknown dtype(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                 f"choose from {', '.join(DTYPES)}")
    size = tuple(args.size) if args.size else (QUICK if args.quick else FULL)
    results = FIT_RESULTS if args.fit else RESULTS
    if args.size and size != FULL:
        results = results.with_name(f"{results.stem}_{'_'.join(map(str, size))}.json")
    if args.out is not None:
        results = args.out
    prefix = "fit_" if args.fit else ""
    repeat = args.repeat or (3 if args.quick else 1)
    n, hd, v = size
    load_before = os.getloadavg()
    rows = []
    what = "TemperatureFitAccumulator (K=31)" if args.fit else "token stats"
    print(f"{what}: N={n} H={hd} V={v}, best of {repeat}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load {load_before[0]:.2f}")
    print(f"{'dtype':9} {'materialised':>13} {'fused':>9} {'time':>6} {'extra mem':>12} "
          f"{'vs logits':>9}")
    for dtype in dtypes:
        base = _spawn(prefix + "materialised", dtype, size, repeat)
        fused = _spawn(prefix + "fused", dtype, size, repeat)
        logits_bytes = n * v * DTYPES[dtype].itemsize
        row = {
            "dtype": dtype, "materialised": base, "fused": fused,
            "logits_bytes": logits_bytes,
            "time_ratio": fused["best_s"] / base["best_s"],
            "memory_ratio_vs_logits": fused["extra_bytes"] / logits_bytes,
            "memory_ratio_vs_materialised_peak": fused["extra_bytes"] / max(1, base["extra_bytes"]),
        }
        rows.append(row)
        print(f"{dtype:9} {base['best_s']:12.3f}s {fused['best_s']:8.3f}s "
              f"{row['time_ratio']:5.2f}x {fused['extra_bytes'] / 2**20:9.1f} MiB "
              f"{100 * row['memory_ratio_vs_logits']:8.2f}%", flush=True)
    if args.quick:
        return
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({
        "bench": results.stem.split("_cpu")[0] + "_cpu", "size": {"N": n, "H": hd, "V": v},
        "repeat": repeat, "rows": rows,
        "memory_method": "peak RSS (VmHWM, reset through /proc/self/clear_refs just "
                         "before the timed calls) minus RSS before them, one subprocess "
                         "per variant",
        "load_before": load_before, "load_after": os.getloadavg(),
        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "goal": {"time_ratio": 1.1, "memory_ratio_vs_logits": 0.02},
    }, indent=2) + "\n")
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
