"""Time per generated token and peak memory of ``generate`` in three modes, measured in
one run:

* ``none``: plain greedy ``generate``;
* ``processor``: with :class:`mllmcal.integrations.transformers.CalibratedLogitsProcessor`
  (temperature != 1; it writes z into its own buffer in the same pass), then
  ``token_logprobs``;
* ``output_scores``: ``output_scores=True`` followed by ``compute_transition_scores``,
  which is the usual way to get per-token confidence from transformers.

The model is Llama-shaped, built from a config with random weights (nothing is
downloaded): hidden 512, 4 layers, vocabulary 128256. Modes are interleaved within each
repeat so that load from other processes hits them alike; the median is reported.
The overhead of the processor is ``median(processor) / median(none) - 1``.

Peak memory is the process's peak resident set during the call, minus the resident
set just before it. Linux's ``VmHWM`` is reset through ``/proc/self/clear_refs`` before
each call. "retained" is what the mode keeps after the call: the processor's records, or
the ``scores`` tuple.

    python bench/bench_generate.py                      # batch 1 and 16, 32 new tokens
    python bench/bench_generate.py --batches 4 --new-tokens 8 --repeats 1   # quick look
"""

from __future__ import annotations

import os

# On a shared CPU, OpenMP threads that spin-wait between parallel regions steal the cores
# from each other and from other processes, and timings swing by several times. Passive
# waiting applies to every mode alike; it must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import mllmcal
from mllmcal.integrations.transformers import CalibratedLogitsProcessor
from mllmcal.ops import resolve_backend

MODES = ("none", "processor", "output_scores")


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def build_model(vocab: int, hidden: int, layers: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128), max_position_embeddings=1024,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def run_mode(model, mode: str, ids: torch.Tensor, new_tokens: int, temperature: float) -> dict:
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    peak_ok = _reset_peak()
    rss0 = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    retained = 0
    if mode == "none":
        out = model.generate(**kwargs)
        n_new = out.shape[1] - ids.shape[1]
    elif mode == "processor":
        proc = CalibratedLogitsProcessor(temperature=temperature)
        out = model.generate(**kwargs, logits_processor=[proc], return_dict_in_generate=True)
        lp = proc.token_logprobs(out.sequences)
        n_new = lp.shape[1]
        retained = proc.nbytes()
    else:
        out = model.generate(**kwargs, return_dict_in_generate=True, output_scores=True)
        lp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        n_new = lp.shape[1]
        retained = sum(s.untyped_storage().nbytes() for s in out.scores)
    dt = time.perf_counter() - t0
    hwm = _rss_kib("VmHWM")
    peak = (hwm - rss0) * 1024 if (peak_ok and hwm is not None and rss0 is not None) else None
    del out
    return {"seconds": dt, "new_tokens": n_new, "peak_rss_delta_bytes": peak,
            "retained_bytes": retained}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "generate_cpu.json"))
    args = ap.parse_args()
    hf_logging.set_verbosity_error()

    model = build_model(args.vocab, args.hidden, args.layers)
    backend = resolve_backend("auto", torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    results = {}
    total = len(args.batches) * (args.repeats + 1) * len(MODES)
    with torch.inference_mode(), tqdm(total=total, desc="generate", unit="call") as bar:
        for b in args.batches:
            ids = torch.randint(3, args.vocab, (b, args.prompt_len), generator=g)
            runs = {m: [] for m in MODES}
            for rep in range(args.repeats + 1):  # repeat 0 warms up and is discarded
                for mode in MODES:
                    bar.set_postfix(batch=b, mode=mode)
                    r = run_mode(model, mode, ids, args.new_tokens, args.temperature)
                    if rep:
                        runs[mode].append(r)
                    bar.update()
            per_mode = {}
            for mode, rs in runs.items():
                per_tok = [r["seconds"] / r["new_tokens"] for r in rs]
                peaks = [r["peak_rss_delta_bytes"] for r in rs if r["peak_rss_delta_bytes"] is not None]
                per_mode[mode] = {
                    "ms_per_token_median": 1e3 * statistics.median(per_tok),
                    "ms_per_token_all": [1e3 * t for t in per_tok],
                    "peak_rss_delta_mib_median": statistics.median(peaks) / 2**20 if peaks else None,
                    "retained_mib": rs[-1]["retained_bytes"] / 2**20,
                    "new_tokens": rs[-1]["new_tokens"],
                }
            base = per_mode["none"]["ms_per_token_median"]
            for mode in MODES:
                per_mode[mode]["time_vs_none"] = per_mode[mode]["ms_per_token_median"] / base
            results[f"batch_{b}"] = per_mode

    report = {
        "bench": "generate",
        "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers,
                  "dtype": "float32", "params": sum(p.numel() for p in model.parameters())},
        "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "repeats": args.repeats,
        "temperature": args.temperature, "token_stats_backend": backend,
        "torch": torch.__version__, "mllmcal": mllmcal.__version__,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": platform.machine(), "device": "cpu", "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))

    print(f"\nLlama-shaped fp32, V={args.vocab}, hidden {args.hidden}, {args.layers} layers, "
          f"{args.new_tokens} new tokens, greedy, token_stats backend={backend!r}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'mode':>14} {'ms/token':>9} {'x none':>7} {'peak ΔRSS MiB':>14} "
          f"{'retained MiB':>13}")
    for key, per_mode in results.items():
        for mode, r in per_mode.items():
            peak = r["peak_rss_delta_mib_median"]
            print(f"{key.split('_')[1]:>5} {mode:>14} {r['ms_per_token_median']:9.2f} "
                  f"{r['time_vs_none']:7.3f} {'n/a' if peak is None else f'{peak:14.1f}':>14} "
                  f"{r['retained_mib']:13.3f}")
        ov = per_mode["processor"]["time_vs_none"] - 1
        print(f"      processor overhead vs none: {100 * ov:+.1f}% of the step time")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
