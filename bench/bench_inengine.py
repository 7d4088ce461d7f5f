"""Per-call time of ``token_stats`` inside the vLLM CPU engine against the same call alone.

    .venv-vllm/bin/python bench/bench_inengine.py [--calls 20] [--out bench/results/inengine_cpu.json]

(Run with another Python, it re-executes itself with .venv-vllm's.) A probe logits
processor, installed in an in-process engine on the toy model of ``bench/bench_vllm.py``,
times ``mllmcal.token_stats`` on a fixed ``[16, 32000]`` fp32 tensor from inside
``apply`` (that is, on the engine's thread, between two forward passes, exactly where
mllmcal's processor runs) with the default thread count and with one thread. It also
records what the engine process looks like from there: the OpenMP/MKL libraries mapped,
torch's thread count, the calling thread's CPU affinity, the OpenMP environment. The same
calls are then timed in a fresh process with no engine ("alone"), on the same tensor.

Each figure is the median of ``--calls`` calls per step over the engine's decode steps
(wall time, ``time.perf_counter``), next to the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _vllm_venv import run_with_vllm

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 32000)


def probe_env() -> dict:
    """What the calling thread sees: OpenMP/MKL libraries, threads, affinity, environment."""
    import torch

    libs = sorted({ln.split()[-1] for ln in open("/proc/self/maps")
                   if any(k in ln for k in ("omp", "mkl", "tcmalloc"))})
    return {
        "libs": libs,
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "process_threads": len(os.listdir("/proc/self/task")),
        "env": {k: v for k, v in os.environ.items()
                if k.startswith(("OMP_", "KMP_", "GOMP_", "MKL_", "LD_PRELOAD"))},
    }


def time_calls(calls: int) -> dict[str, list[float]]:
    """Wall time (s) of ``calls`` token_stats calls per variant on the fixed tensor."""
    import torch

    import mllmcal
    from mllmcal._backends.compiled import cpu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=g) * 3
    n = SHAPE[0]
    fs, pr = torch.empty(7, n), torch.empty(n, dtype=torch.int64)
    fl = torch.empty(n, dtype=torch.uint8)
    variants = {
        "token_stats": lambda: mllmcal.token_stats(x, backend="cpu", validate=False),
        "one_thread": lambda: cpu.token_stats_into(x, None, 1.0, None, fs, pr, fl, None, None,
                                                   -100, num_threads=1),
        "two_threads": lambda: cpu.token_stats_into(x, None, 1.0, None, fs, pr, fl, None, None,
                                                    -100, num_threads=2),
    }
    out: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(calls):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            out[k].append(time.perf_counter() - t0)
    return out


def alone(calls: int, steps: int) -> dict:
    """The same calls in this process with no engine: ``steps`` rounds of ``calls``."""
    env = probe_env()
    rounds = [time_calls(calls) for _ in range(steps)]
    return {"env": env, "rounds": rounds}


def summary(rounds: list[dict[str, list[float]]]) -> dict[str, float]:
    keys = rounds[0].keys()
    return {k: statistics.median(t for r in rounds for t in r[k]) * 1e6 for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--alone", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "inengine_cpu.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.alone:
        print(json.dumps(alone(args.calls, args.max_tokens)))
        return

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    sys.path.insert(0, str(ROOT / "tests"))
    import checkpoints
    from vllm import LLM, SamplingParams
    from vllm.v1.sample.logits_processor import LogitsProcessor

    seen: dict = {"rounds": [], "env": None}

    class Probe(LogitsProcessor):
        def __init__(self, vllm_config, device, is_pin_memory):
            pass

        def is_argmax_invariant(self) -> bool:
            return False  # True would skip apply() for greedy requests

        def update_state(self, batch_update) -> None:
            pass

        def apply(self, logits):
            if seen["env"] is None:
                seen["env"] = probe_env()
            if seen["on"]:
                seen["rounds"].append(time_calls(args.calls))
            return logits

    seen["on"] = False
    work = Path(tempfile.mkdtemp(prefix="mllmcal-bench-inengine-"))
    model = checkpoints.build_vllm_llama(work / "model", n_words=SHAPE[1] - 4, hidden=256, layers=4)
    llm = LLM(model=str(model), dtype="float32", max_model_len=512, enforce_eager=True,
              kv_cache_memory_bytes=256 << 20, max_num_seqs=args.prompts, seed=0,
              logits_processors=[Probe])
    words = [f"w{i}" for i in range(SHAPE[1] - 4)]
    prompts = [" ".join(words[(97 * i + 13 * j) % len(words)] for j in range(16 + 3 * i))
               for i in range(args.prompts)]
    ps = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], ps, use_tqdm=False)  # warm-up
    seen["on"] = True
    load0 = os.getloadavg()
    llm.generate(prompts, ps, use_tqdm=False)
    seen["on"] = False
    after = {"env": probe_env(), "rounds": [time_calls(args.calls) for _ in range(8)]}
    res = subprocess.run([sys.executable, __file__, "--alone", "--calls", str(args.calls),
                          "--max-tokens", str(args.max_tokens)],
                         capture_output=True, text=True, check=True, env={**os.environ})
    fresh = json.loads(res.stdout.strip().splitlines()[-1])
    result = {
        "what": f"token_stats on a fixed {list(SHAPE)} fp32 tensor, median wall us per call",
        "command": "python bench/bench_inengine.py " + " ".join(sys.argv[1:]),
        "load_average": {"start": load0, "end": os.getloadavg()},
        "in_engine": {"env": seen["env"], "median_us": summary(seen["rounds"]),
                      "steps": len(seen["rounds"])},
        "same_process_engine_idle": {"env": after["env"], "median_us": summary(after["rounds"])},
        "alone": {"env": fresh["env"], "median_us": summary(fresh["rounds"])},
    }
    ratios = {k: result["in_engine"]["median_us"][k] / result["alone"]["median_us"][k]
              for k in result["alone"]["median_us"]}
    result["in_engine_over_alone"] = ratios
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("load_average", "in_engine_over_alone")}, indent=1))
    for k in ("in_engine", "same_process_engine_idle", "alone"):
        print(k, {n: round(v, 1) for n, v in result[k]["median_us"].items()},
              "threads", result[k]["env"]["torch_threads"], "affinity", result[k]["env"]["affinity"],
              "libs", [os.path.basename(p) for p in result[k]["env"]["libs"]],
              "env", result[k]["env"]["env"])


if __name__ == "__main__":
    run_with_vllm(main)
