"""Benchmark suite of token_stats: GPU mode on a CUDA machine, CPU mode elsewhere.

    python bench/bench_gpu.py                      # full grid on the GPU (cold L2, CUDA events)
    python bench/bench_gpu.py --quick              # B in {1, 8, 64}, V in {32000, 128256}
    python bench/bench_gpu.py --device cpu --quick --reps 5
    python bench/bench_gpu.py --write-autotune     # GPU: also update mllmcal/_autotune.json

Prints a Markdown table and writes JSON, Markdown and a PNG plot under bench/results/.
The work is in mllmcal.benchmarks (also `mllmcal bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from mllmcal._autotune import TABLE_PATH  # noqa: E402
from mllmcal.benchmarks import run_suite  # noqa: E402


def write_autotune_table(doc: dict, path: str | os.PathLike = TABLE_PATH) -> dict:
    """From a GPU run, record per (dtype, batch, vocab) whether Triton or CUDA was faster,
    in the format :mod:`mllmcal._autotune` reads. Returns the table."""
    if doc["meta"]["mode"] != "gpu":
        raise ValueError("the auto-selection table needs a GPU run")
    entries = []
    keys = dict.fromkeys((r["dtype"], r["batch"], r["vocab"]) for r in doc["records"])
    for dname, b, v in keys:
        row = {r["backend"]: r["median_us"] for r in doc["records"]
               if (r["dtype"], r["batch"], r["vocab"]) == (dname, b, v)
               and r["backend"] in ("triton", "cuda")}
        if len(row) == 2:
            entries.append({"dtype": dname, "batch": b, "vocab": v,
                            "backend": min(row, key=row.get), "us": row})
    table = {"device": doc["meta"]["device"], "date": doc["meta"]["date"], "entries": entries}
    Path(path).write_text(json.dumps(table, indent=1) + "\n")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--quick", action="store_true", help="reduced shape grid")
    ap.add_argument("--batches", type=int, nargs="+")
    ap.add_argument("--vocabs", type=int, nargs="+")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--backends", nargs="+")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag")
    ap.add_argument("--write-autotune", action="store_true")
    args = ap.parse_args()
    batches, vocabs = args.batches, args.vocabs
    if args.quick:
        batches = batches or [1, 8, 64]
        vocabs = vocabs or [32000, 128256]
    doc = run_suite(device=args.device, batches=batches, vocabs=vocabs, dtypes=args.dtypes,
                    backends=args.backends, reps=args.reps, out_dir=args.out, tag=args.tag)
    if args.write_autotune:
        table = write_autotune_table(doc)
        print(f"autotune table: {len(table['entries'])} entries")


if __name__ == "__main__":
    main()
