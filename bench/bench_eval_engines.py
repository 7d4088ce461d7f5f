"""Items per second of ``mllmcal eval``'s scoring: ``--engine hf`` against ``--engine vllm``.

    .venv-vllm/bin/python bench/bench_eval_engines.py [--arch llava-1.5] [--items 64]
        [--method letter] [--rounds 5] [--model PATH] [--out bench/results/eval_engines_cpu.json]

(Run with another Python, it re-executes itself with .venv-vllm's, with the test set-up's
pure-Python torchvision on the path for the image-text models.) One process loads the same
checkpoint (``--model PATH``, or a tiny one of ``tests/checkpoints.py``'s
``VLLM_EVAL_BUILDERS``: ``llama``, ``llava-1.5``, ``qwen2-vl``) both ways and scores the same
synthetic items (4-option questions, each with its own PNG) with the eval's own scoring
loops, :func:`mllmcal.eval.confidence.score_items` and
:func:`mllmcal.eval.vllm_engine.score_items_vllm`, in interleaved rounds so that load drift
hits both alike. Each round scores every item once (image items; text items too with
``--modality text``). Reported: items/s of each round (wall time), the best round and
the median, the load times, and the machine's load average before and after. Model loading
and the first (warm-up) round are not timed.

On a shared machine the wall times swing with other processes' load: read the best rounds,
and the load averages next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _vllm_venv import run_with_vllm

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ["red", "blue", "green", "yellow"]


def _items(n: int, d: Path):
    import torch
    from PIL import Image

    from mllmcal.eval.data import load_items

    (d / "images").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        name = f"{i}.png"
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
        Image.new("RGB", (24 + i % 9, 24), colour).save(d / "images" / name)
        q = f"<image>\nWhat colour is shape {i % 20} ?\n" + "\n".join(
            f"({L}) {c}" for L, c in zip("ABCD", COLOURS, strict=True))
        rows.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": q}, {"from": "gpt", "value": "ABCD"[i % 4]}]})
    (d / "items.json").write_text(json.dumps(rows))
    return load_items(str(d / "items.json"), str(d / "images")).items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llava-1.5", choices=["llama", "llava-1.5", "qwen2-vl"])
    ap.add_argument("--model", help="a checkpoint directory instead of a tiny built one")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--method", default="letter", choices=["letter", "option-softmax"])
    ap.add_argument("--modality", default="image", choices=["image", "text"])
    ap.add_argument("--batch-size", type=int, default=8, help="the eval's --batch-size (HF)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the HF engine")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_engines_cpu.json"))
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import torch

    from mllmcal.eval.confidence import score_items
    from mllmcal.eval.models import load_model
    from mllmcal.eval.vllm_engine import load_vllm_model, score_items_vllm

    work = Path(tempfile.mkdtemp(prefix="mllmcal-bench-engines-"))
    load_before = os.getloadavg()
    if args.model:
        model = args.model
    else:
        from checkpoints import VLLM_EVAL_BUILDERS

        words = ["What colour is shape ?", *COLOURS, *map(str, range(20))]
        model = str(VLLM_EVAL_BUILDERS[args.arch](work / args.arch, words))
    items = _items(args.items, work / "data")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    hf = load_model(model)
    load_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    vl = load_vllm_model(model)
    load_vllm = time.perf_counter() - t0
    with_image = args.modality == "image" and hf.multimodal

    def run(engine: str) -> float:
        if engine == "hf":
            torch.set_num_threads(args.threads)
        em, fn = (hf, score_items) if engine == "hf" else (vl, score_items_vllm)
        t = time.perf_counter()
        n = sum(len(b.records) for b in fn(em, items, method=args.method, with_image=with_image,
                                             batch_size=args.batch_size))
        dt = time.perf_counter() - t
        assert n == len(items)
        return n / dt

    run("hf"), run("vllm")  # warm-up
    rates: dict[str, list[float]] = {"hf": [], "vllm": []}
    for _ in range(args.rounds):
        for engine in ("hf", "vllm"):
            rates[engine].append(run(engine))
    result = {
        "model": model if args.model else f"tiny {args.arch} (tests/checkpoints.py)",
        "items": len(items), "method": args.method, "modality": args.modality,
        "batch_size_hf": args.batch_size, "torch_threads_hf": args.threads,
        "load_seconds": {"hf": load_hf, "vllm": load_vllm},
        "items_per_second": rates,
        "best": {k: max(v) for k, v in rates.items()},
        "median": {k: statistics.median(v) for k, v in rates.items()},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    import transformers
    import vllm

    result["versions"] = {"vllm": vllm.__version__, "transformers": transformers.__version__,
                          "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{result['model']}, {len(items)} items, {args.method}, {args.modality}: items/s "
          f"best hf {result['best']['hf']:.1f} vllm {result['best']['vllm']:.1f} "
          f"(median {result['median']['hf']:.1f} / {result['median']['vllm']:.1f}); load avg "
          f"{load_before[0]:.1f} -> {result['loadavg_after'][0]:.1f}; {args.out}")


if __name__ == "__main__":
    run_with_vllm(main, torchvision=True)
