"""``mllmcal eval --engine vllm`` on the real vLLM CPU engine against ``--engine hf``.

vLLM lives in .venv-vllm (scripts/setup_vllm.sh): one subprocess there
(tests/vllm/eval_checks.py) runs the eval's CLI for a text model (Llama), LLaVA-1.5 and
Qwen2-VL, each with the letter and option-softmax methods, one engine per model. The same
evals run here with ``--engine hf``; per item the confidence at T = 1, the confidence at the
fitted T and the prediction must agree (1e-4), as must the fitted temperatures.

The image-text models need torchvision, which .venv-vllm has only as the patched pure-Python
package in .venv-vllm/torchvision-cpu (see scripts/setup_vllm.sh); it is put on the
subprocess's PYTHONPATH here. Without .venv-vllm the engine tests skip locally and FAIL
under CI=true. The processor's opt-in token logits and the records reader are also tested
here without vLLM.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import VLLM_EVAL_BUILDERS
from helpers import COLOURS, colour_questions, need_environment

from mllmcal.eval.runner import EvalConfig, run_eval
from mllmcal.integrations.vllm.token_logits import (
    LogitsWanted,
    RecordsReader,
    check_logits_args,
    keep_token_logits,
    token_logits,
    token_logits_field,
    wanted_logits,
)

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
VPY = VENV / "bin" / "python"
TORCHVISION = VENV / "torchvision-cpu"
TOL = 1e-4
METHODS = ("letter", "option-softmax")
ENGINE_FLAGS = ["--engine-arg", "max_num_seqs=8", "--tensor-parallel-size", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """test (14) and calib (12) splits of 4-option colour questions with real PNGs."""
    return colour_questions(tmp_path_factory.mktemp("vllm-eval-data"), {"test": 14, "calib": 12})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    words = ["What colour is shape ?", *COLOURS, *map(str, range(20))]
    root = tmp_path_factory.mktemp("vllm-eval-models")
    return {name: build(root / name, words) for name, build in VLLM_EVAL_BUILDERS.items()}


@pytest.fixture(scope="module")
def vllm_runs(data_dir, models, tmp_path_factory) -> Path:
    need_environment(VPY, "setup_vllm.sh")
    need_environment(TORCHVISION, "setup_vllm.sh")
    out = tmp_path_factory.mktemp("vllm-eval-out")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLLMCAL_", "PROMETHEUS_", "VLLM_", "TRITON_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TORCHVISION)])
    cmd = [str(VPY), str(ROOT / "tests" / "vllm" / "eval_checks.py"), "--data", str(data_dir),
           "--out", str(out), *[a for n, p in models.items() for a in ("--model", f"{n}={p}")],
           *[a for m in METHODS for a in ("--method", m)], "--also", "llama=verbalized",
           "--", *ENGINE_FLAGS]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"eval_checks.py exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                    f"\n--- stderr\n{proc.stderr[-8000:]}")
    return out


def _records(out: Path) -> dict[tuple[str, str, str], dict]:
    """Every scored record of a run's cache, by (split, modality, item id)."""
    recs = {}
    for p in glob.glob(str(out / "cache" / "*.pt")):
        split, modality = Path(p).name.split("_")[:2]
        for r in torch.load(p, weights_only=True)["records"]:
            recs[(split, modality, r["id"])] = r
    return recs


def _hf_run(data_dir: Path, model: Path, method: str, out: Path) -> dict:
    return run_eval(EvalConfig(
        models=[str(model)], test=str(data_dir / "test.json"), calib=str(data_dir / "calib.json"),
        images=str(data_dir / "images"), out=str(out), method=method, batch_size=4,
        build_idk=False, idk_variants=(), progress=False, plots=False))


AGREEMENT: dict[tuple[str, str], float] = {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(VLLM_EVAL_BUILDERS))
def test_vllm_confidences_equal_hf(name, method, vllm_runs, data_dir, models, tmp_path):
    vdir = vllm_runs / f"{name}-{method}"
    v_report = json.loads((vdir / "report.json").read_text())
    h_report = _hf_run(data_dir, models[name], method, tmp_path / "hf")
    v, h = _records(vdir), _records(tmp_path / "hf")
    assert v.keys() == h.keys() and v
    worst = 0.0
    for key, hr in h.items():
        vr = v[key]
        assert vr["pred"] == hr["pred"], (key, vr, hr)
        assert vr["step"] == hr["step"] or hr["pred"] is None, key
        for field in ("confidence", "confidence_t"):
            a, b = vr.get(field), hr.get(field)
            assert (a is None) == (b is None), (key, field)
            if a is not None:
                worst = max(worst, abs(a - b))
        # the option probabilities that conformal sets and selective answering read
        a, b = vr.get("option_probs"), hr.get("option_probs")
        assert (a is None) == (b is None), (key, "option_probs")
        if a is not None:
            assert len(a) == len(b), key
            worst = max(worst, *(abs(x - y) for x, y in zip(a, b, strict=True)))
    assert worst <= TOL
    AGREEMENT[(name, method)] = worst
    print(f"\nagreement {name} {method}: max |conf_vllm - conf_hf| = {worst:.2e}")
    vm, hm = v_report["models"][0]["modalities"], h_report["models"][0]["modalities"]
    assert vm.keys() == hm.keys() == ({"text"} if name == "llama" else {"image", "text"})
    for mod in vm:
        assert vm[mod]["temperature"] == pytest.approx(hm[mod]["temperature"], rel=1e-3)
        assert vm[mod]["test"]["ece"] == pytest.approx(hm[mod]["test"]["ece"], abs=TOL)
        assert (vm[mod].get("conformal") is None) == (hm[mod].get("conformal") is None), mod
    if name != "llama" and method == "letter":
        # the image reaches the logits: image and text confidences differ (on option-softmax
        # the tiny Qwen2-VL's letters move by ~6e-4 only)
        diff = [abs(v[("test", "image", i)]["confidence"] - v[("test", "text", i)]["confidence"])
                for (s, m, i) in v if s == "test" and m == "image"
                and v[("test", "image", i)]["confidence"] is not None
                and v[("test", "text", i)]["confidence"] is not None]
        assert max(diff) > 100 * TOL


def test_vllm_verbalized_text_equals_hf(vllm_runs, data_dir, models, tmp_path):
    _hf_run(data_dir, models["llama"], "verbalized", tmp_path / "hf")
    v, h = _records(vllm_runs / "llama-verbalized"), _records(tmp_path / "hf")
    assert v.keys() == h.keys() and v
    for key, hr in h.items():
        assert (v[key]["text"], v[key]["pred"], v[key]["confidence"]) == (
            hr["text"], hr["pred"], hr["confidence"]), key


def test_engine_settings_pass_through(vllm_runs):
    settings = json.loads((vllm_runs / "engine_settings.json").read_text())
    for name, s in settings.items():
        assert s["max_num_seqs"] == 8, name           # --engine-arg
        assert s["tensor_parallel_size"] == 1, name   # --tensor-parallel-size
        assert s["dtype"] == "torch.float32", name    # the CPU defaults: fp32 for auto,
        assert s["enforce_eager"] is True, name       # eager mode


def test_processor_token_logits_on_the_engine(vllm_runs):
    got = json.loads((vllm_runs / "token_logits.json").read_text())["llama"]
    assert got["all"]["steps"] == [0, 1, 2] and got["all"]["shape"][0] == 3
    assert got["all"]["max_abs_diff_vs_vllm_logprobs"] < 1e-5
    assert got["ids_last"] == {"steps": [2], "shape": [1, 3], "max_abs_diff_vs_all": 0.0}


# ------------------------------------------------------------------ without vLLM


def test_missing_vllm_is_a_clear_error(data_dir, tmp_path, capsys, monkeypatch):
    from mllmcal.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` meets without it

    rc = main(["eval", "--engine", "vllm", "--model", str(tmp_path), "--test",
               str(data_dir / "test.json"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "needs the package 'vllm'" in capsys.readouterr().err


def test_engine_flags_reach_the_config(monkeypatch, tmp_path, data_dir):
    from mllmcal import cli
    from mllmcal.eval import runner

    seen = {}
    monkeypatch.setattr(runner, "run_eval", lambda cfg: seen.setdefault("cfg", cfg) and {})
    monkeypatch.setattr(cli, "_print_report", lambda *a: None)
    cli.main(["eval", "--model", str(tmp_path), "--test", str(data_dir / "test.json"),
              "--out", str(tmp_path / "o"), "--engine", "vllm", "--tensor-parallel-size", "2",
              "--data-parallel-size", "3", "--engine-arg", "gpu_memory_utilization=0.5",
              "--engine-arg", "quantization=fp8"])
    cfg = seen["cfg"]
    assert cfg.engine == "vllm"
    assert cfg.engine_args == {"tensor_parallel_size": 2, "data_parallel_size": 3,
                               "gpu_memory_utilization": 0.5, "quantization": "fp8"}
    with pytest.raises(ValueError, match="need --engine vllm"):
        EvalConfig(models=["m"], test="t", out="o", engine_args={"x": 1}).validate()
    with pytest.raises(ValueError, match="--engine must be one of"):
        EvalConfig(models=["m"], test="t", out="o", engine="trt").validate()


def test_cpu_engine_defaults_keep_what_is_given():
    from types import SimpleNamespace

    from mllmcal.eval.vllm_engine import cpu_engine_defaults

    cfg = SimpleNamespace(num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2,
                          hidden_size=128, max_position_embeddings=32768)
    d = cpu_engine_defaults(cfg, "auto", {})
    assert d["dtype"] == "float32" and d["enforce_eager"] and d["max_model_len"] == 4096
    # 4 sequences of 4096 tokens: 2 (K, V) x 32 layers x 2 heads x 32 dims x 4 bytes each
    assert d["kv_cache_memory_bytes"] == 4 * 4096 * 2 * 32 * 2 * 32 * 4
    given = {"dtype": "bfloat16", "max_model_len": 512, "enforce_eager": False}
    assert set(cpu_engine_defaults(cfg, "auto", given)) == {"kv_cache_memory_bytes"}


def test_token_logits_request_args():
    check_logits_args({"mllmcal_logits_ids": "all", "mllmcal_logits_last": True})
    check_logits_args({"mllmcal_logits_ids": [0, 5]})
    for bad in ({"mllmcal_logits_ids": []}, {"mllmcal_logits_ids": [1, -2]},
                {"mllmcal_logits_ids": "some"}, {"mllmcal_logits_ids": [True]},
                {"mllmcal_logits_ids": [1], "mllmcal_logits_last": "yes"}):
        with pytest.raises(ValueError, match="mllmcal_logits"):
            check_logits_args(bad)
    assert wanted_logits({}) is None
    assert wanted_logits({"mllmcal_logits_ids": [3, 1]}).ids == (3, 1)


class _Req:
    def __init__(self, want):
        self.token_logits = want


def test_keep_token_logits_round_trip():
    """Two requests with other ids, one with whole rows and only the last step, an empty
    batch slot; a prompt chunk (same token index twice) is replaced by its later row."""
    a, b, c = (_Req(LogitsWanted((2, 0))), _Req(LogitsWanted(None, last=True)),
               _Req(LogitsWanted((2, 0))))
    reqs = [a, None, b, c]
    steps = [torch.randn(4, 6) for _ in range(4)]
    n_tokens = [[0, -1, 0, 0], [0, -1, 0, 0], [1, -1, 1, 1], [2, -1, 2, 2]]  # step 0: a chunk
    for z, n in zip(steps, n_tokens, strict=True):
        before = z.clone()
        keep_token_logits(z, [0, 2, 3], reqs, n)
        assert torch.equal(z, before)  # observe-only
    rec = {"id": "a", **token_logits_field(a, 3)}
    k, got = token_logits(rec)
    assert k == [0, 1, 2] and torch.equal(got, torch.stack([s[0, [2, 0]] for s in steps[1:]]))
    k, got = token_logits({"id": "b", **token_logits_field(b, 3)})
    assert k == [2] and torch.equal(got, steps[3][2:3])
    # a row of a token not committed yet is not written
    k, _ = token_logits({"id": "c", **token_logits_field(c, 2)})
    assert k == [0, 1]
    assert token_logits_field(_Req(None), 3) == {}
    with pytest.raises(KeyError, match="mllmcal_logits_ids"):
        token_logits({"id": "x"})
    # the encoding is plain little-endian float32
    rec = {"token_logits": {"ids": [1], "steps": [0], "shape": [1, 2],
                            "b64": base64.b64encode(np.array([[1.5, -2.0]], "<f4").tobytes()).decode()}}
    assert token_logits(rec)[1].tolist() == [[1.5, -2.0]]


def test_records_reader_waits_and_keeps_others(tmp_path):
    path = tmp_path / "r.jsonl"
    reader = RecordsReader(path)
    with pytest.raises(TimeoutError, match="'a'"):
        reader.collect(["a"], timeout=0.05)

    def write():
        with open(path, "a") as f:
            f.write(json.dumps({"id": "b", "n": 1}) + "\n" + '{"id": "a", ')
            f.flush()
            time.sleep(0.1)
            f.write('"n": 2}\n' + json.dumps({"id": "a", "n": 3}) + "\n")

    t = threading.Thread(target=write)
    t.start()
    got = reader.collect(["a"], timeout=5)
    t.join()
    assert got == {"a": {"id": "a", "n": 2}}  # a duplicate line of the same id: the first
    assert reader.collect(["b"], timeout=0) == {"b": {"id": "b", "n": 1}}
    reader.clear()
    assert path.stat().st_size == 0
    with open(path, "a") as f:  # the engine's file handle appends at the new end
        f.write(json.dumps({"id": "c"}) + "\n")
    assert reader.collect(["c"], timeout=1) == {"c": {"id": "c"}}


def test_prompt_check_catches_a_dropped_or_doubled_bos(models, data_dir):
    """What ``LLM.chat`` does to LLaVA (its prompt without BOS), and a doubled BOS, are
    refused by the check every ``--engine vllm`` batch goes through."""
    from types import SimpleNamespace

    from mllmcal.eval.data import load_items
    from mllmcal.eval.models import load_model
    from mllmcal.eval.vllm_engine import _check_prompts, _prompt_ids

    em = load_model(str(models["llava-1.5"]))
    item = load_items(str(data_dir / "test.json"), str(data_dir / "images")).items[0]
    text = em.render(item, with_image=False)
    ids = _prompt_ids(em, text)
    bos = em.tokenizer.bos_token_id
    assert ids.count(bos) == 1 and ids[0] == bos  # the eval's BOS rule on this tokenizer

    def out(prompt_ids):
        return [SimpleNamespace(prompt_token_ids=prompt_ids)]

    _check_prompts(em, out(ids), [text], None, n_exact=1)  # what the eval gives vLLM
    with pytest.raises(ValueError, match="differs from the HF path"):
        _check_prompts(em, out(ids[1:]), [text], None, n_exact=1)
    with pytest.raises(ValueError, match="BOS 2 times"):
        _check_prompts(em, out([bos, *ids]), [text], None, n_exact=0)
