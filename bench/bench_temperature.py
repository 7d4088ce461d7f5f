"""Temperature fitting at corpus scale: one-pass vs Newton vs storing logits + grid search.

Three ways to fit T on a calibration split whose logits arrive batch by batch (as they do
when a model scores the split):

* ``onepass``: :func:`mllmcal.fit_temperature` on a one-shot generator (``method="onepass"``,
  31 temperatures, the default): each batch is read once, O(K) state.
* ``newton``: ``method="newton"`` on a re-iterable source; every pass re-reads every batch
  (with a model, every pass re-runs the model: the ``passes`` column).
* ``store_grid``: what an eval without the one-pass fit does: store each batch's logits rows
  (fp16, O(N·V) memory), then run the paper's 999-temperature grid search over the stored
  rows (``method="grid"``, itself one fused pass at 999 temperatures).

Each (shape, method) runs in a fresh subprocess; after the input batches exist, the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``), so the peak RSS (``VmHWM``) minus the RSS
at that point is the memory the method itself needs. Batches are views
of a pool of distinct rows (the fit's cost does not depend on the values, and a model's
cost is not what is measured). Times are wall clock of the fit on this machine, median of ``--repeats`` interleaved runs (the machine is shared: its load average is
recorded).

``--grid-rows`` caps N for ``store_grid`` (999 exps per logit take minutes at full N on two
cores); its time is then reported at that N, with the N it was measured at, and scaled
linearly to the full N in a separate, labelled field.

Run: ``python bench/bench_temperature.py [--quick]``; writes
``bench/results/temperature_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from _memory import peak_rss_bytes, reset_peak_rss, rss_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)








def child(method: str, n: int, v: int, batch: int, pool_rows: int) -> dict:
    """Run one method in this process; returns its timing and memory."""
    import torch

    import mllmcal

    g = torch.Generator().manual_seed(0)
    pool = torch.randn(pool_rows, v, generator=g) * 3.0
    # Labels drawn from softmax(pool / 1.7): the optimum T is near 1.7, inside the grid.
    labels = torch.multinomial(torch.softmax(pool / 1.7, 1), n // pool_rows + 1,
                               replacement=True, generator=g).T.reshape(-1)[:n]

    def batches():
        for i in range(0, n, batch):
            j = i % pool_rows
            rows = min(batch, n - i, pool_rows - j)
            yield pool[j:j + rows], labels[i:i + rows]

    import gc

    gc.collect()
    exact_peak = reset_peak_rss()
    base = rss_bytes()
    t0 = time.perf_counter()
    if method == "onepass":
        t, info = mllmcal.fit_temperature(batches(), method="onepass", return_info=True)
    elif method == "newton":
        t, info = mllmcal.fit_temperature(batches, method="newton", return_info=True)
    elif method == "store_grid":
        stored = torch.empty(n, v, dtype=torch.float16)
        stored_labels = torch.empty(n, dtype=torch.long)
        i = 0
        for x, y in batches():
            stored[i:i + x.shape[0]] = x
            stored_labels[i:i + x.shape[0]] = y
            i += x.shape[0]
        t, info = mllmcal.fit_temperature(stored, stored_labels, method="grid",
                                          return_info=True)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    return {"method": method, "n": n, "v": v, "seconds": seconds, "temperature": t,
            "nll": info["nll"], "passes": info["passes"],
            "extra_peak_bytes": max(0, peak - base), "peak_is_exact": exact_peak,
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--grid-rows", type=int, default=2000,
                    help="cap on N for store_grid at V=32000 (a tenth of it at 152k)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of onepass and newton")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "temperature_cpu.json"))
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, n, v, batch, pool = args.child
        print(json.dumps(child(method, int(n), int(v), int(batch), int(pool))))
        return

    # (N, V, batch rows, distinct pool rows). The 152k case uses a smaller N on this
    # 2-core machine (stated in the output).
    shapes = [(20000, 32000, 1000, 2000), (2000, 152064, 250, 250)]
    if args.quick:
        shapes = [(400, 3000, 100, 200), (100, 15000, 25, 50)]
    results = []
    for n, v, batch, pool in shapes:
        cap = args.grid_rows if v <= 32000 else max(batch, args.grid_rows // 10)
        # onepass and newton alternate, repeated: a shared machine's load then affects both.
        order = ["onepass", "newton"] * args.repeats + ["store_grid"]
        runs: dict[str, list[dict]] = {}
        for method in order:
            n_run = min(n, cap) if method == "store_grid" else n
            env = {**os.environ, "PYTHONPATH": ROOT}
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, str(n_run), str(v), str(batch),
                 str(pool)], capture_output=True, text=True, env=env, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(method, []).append(r)
            print(f"[{n}x{v}] {method:10s} N={n_run:6d} {r['seconds']:8.2f} s  "
                  f"passes={r['passes']:2d}  T={r['temperature']:.4f}  "
                  f"extra peak={r['extra_peak_bytes'] / 2**20:8.1f} MiB", flush=True)
        for rs in runs.values():
            r = dict(rs[-1])
            r["seconds_all_runs"] = [x["seconds"] for x in rs]
            r["seconds"] = sorted(r["seconds_all_runs"])[len(rs) // 2]  # median
            r["extra_peak_bytes"] = max(x["extra_peak_bytes"] for x in rs)
            r["n_requested"] = n
            if r["n"] != n:
                r["seconds_scaled_to_n_requested"] = r["seconds"] * n / r["n"]
                r["stored_bytes_at_n_requested"] = n * v * 2
            results.append(r)
        med = {m: next(x["seconds"] for x in results[-3:] if x["method"] == m) for m in runs}
        print(f"[{n}x{v}] median onepass / newton time: {med['onepass'] / med['newton']:.2f}",
              flush=True)
    import torch

    import mllmcal

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "logical_cpus": os.cpu_count(), "torch": torch.__version__,
                    "mllmcal": getattr(mllmcal, "__version__", "?"),
                    "loadavg_1_5_15": list(os.getloadavg())},
        "note": "seconds: median of --repeats runs (onepass/newton interleaved), one run for "
                "store_grid, which is measured at N=n (see n vs n_requested) and scaled "
                "linearly where they differ; the 152k case uses N=2000 on this 2-core box",
        "results": results,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
