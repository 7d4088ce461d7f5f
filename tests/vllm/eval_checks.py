"""Run ``mllmcal eval --engine vllm`` for several models and methods in ONE process.

Run by tests/test_eval_vllm.py with .venv-vllm's Python (vLLM is not in the main venv):

    python tests/vllm/eval_checks.py --data DIR --out DIR --model NAME=PATH ... \
        [--method letter --method option-softmax] [-- ENGINE FLAGS]

For each model and method it calls the CLI's ``main`` as a user's command line would be
parsed (no CPU settings: the eval sets what the CPU engine needs), into
``OUT/NAME-METHOD``, adding the engine flags given after ``--``. One engine per model serves all its methods (the eval caches its
engines per process), so the engine start (~10 s in-process) is paid once per model. It
also writes ``OUT/token_logits.json``: a direct check of the processor's opt-in
``mllmcal_logits_ids`` against vLLM's own log-probs, and ``OUT/engine_settings.json``
(what each engine got). Asserting is done by the test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _token_logits_check(path: str) -> dict:
    """Greedy requests on the engine the eval made for ``path``: the kept whole rows,
    log-softmaxed, against vLLM's returned log-probs; the kept columns of chosen ids (last
    step only) against the same entries of the whole rows."""
    from vllm import SamplingParams

    from mllmcal.eval import vllm_engine
    from mllmcal.integrations.vllm.token_logits import token_logits

    (llm, reader), = [v for k, v in vllm_engine._ENGINES.items() if k[0] == path]
    ids = llm.get_tokenizer()("What colour is shape 3 ? Answer : (")["input_ids"]
    cols = [5, 7, 9]
    got = {}
    for mode, extra in (("all", {"mllmcal_logits_ids": "all"}),
                        ("ids_last", {"mllmcal_logits_ids": cols, "mllmcal_logits_last": True})):
        rid = f"check-{mode}"
        sp = SamplingParams(temperature=0.0, max_tokens=3, logprobs=5, ignore_eos=True,
                            extra_args={"mllmcal_id": rid, **extra})
        res = llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0]
        vllm_engine._flush_in_process()
        steps, z = token_logits(reader.collect([rid])[rid])
        got[mode] = (steps, z, res)
    steps, z, res = got["all"]
    diffs = []
    for k, row in zip(steps, z.tolist(), strict=True):
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        diffs += [abs(row[t] - lse - lp.logprob) for t, lp in res.logprobs[k].items()]
    steps_l, z_l, _ = got["ids_last"]
    return {"all": {"steps": steps, "shape": list(z.shape), "n_tokens": len(res.token_ids),
                    "max_abs_diff_vs_vllm_logprobs": max(diffs)},
            "ids_last": {"steps": steps_l, "shape": list(z_l.shape),
                         "max_abs_diff_vs_all": float((z_l[0] - z[-1, cols]).abs().max())}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--method", action="append", default=None)
    ap.add_argument("--modalities", default="image,text")
    ap.add_argument("--also", action="append", default=[], metavar="NAME=METHOD",
                    help="one more method for one model")
    args, flags = ap.parse_known_args()  # flags after "--": engine options for every run
    flags = [f for f in flags if f != "--"]
    from mllmcal.cli import main as cli
    from mllmcal.eval import vllm_engine

    data, out = Path(args.data), Path(args.out)
    checks, settings = {}, {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        also = [m for n, _, m in (a.partition("=") for a in args.also) if n == name]
        for method in [*(args.method or ["letter", "option-softmax"]), *also]:
            rc = cli(["eval", "--engine", "vllm", "--model", path, "--method", method,
                      "--test", str(data / "test.json"), "--calib", str(data / "calib.json"),
                      "--images", str(data / "images"), "--out", str(out / f"{name}-{method}"),
                      "--modalities", args.modalities, "--batch-size", "4", "--no-idk",
                      "--no-plots", "--no-progress", *flags])
            if rc != 0:
                sys.exit(f"mllmcal eval --engine vllm exited {rc} for {name} {method}")
        (llm, _), = [v for k, v in vllm_engine._ENGINES.items() if k[0] == path]
        vc = llm.llm_engine.vllm_config
        settings[name] = {"max_num_seqs": vc.scheduler_config.max_num_seqs,
                          "tensor_parallel_size": vc.parallel_config.tensor_parallel_size,
                          "dtype": str(vc.model_config.dtype),
                          "enforce_eager": vc.model_config.enforce_eager}
        if name == "llama":
            checks[name] = _token_logits_check(path)
    (out / "token_logits.json").write_text(json.dumps(checks))
    (out / "engine_settings.json").write_text(json.dumps(settings))


if __name__ == "__main__":
    main()
