"""Test helpers: comparison against the float64 oracle, tolerances, GPU and interpreter
checks, two-rank distributed runs, the extra environments' skip rule and the colour-question
data of the eval tests. Inputs (``make_logits``, ``make_labels``,
``HOSTILE_KINDS``) and the eager baseline live in :mod:`mllmcal.reference`, beside the
oracle, because the shipped ``mllmcal bench`` needs them too.

Test files import this module as ``helpers`` (``tests/`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from mllmcal import reference as R
from mllmcal._contract import conf_bins, conf_fixed_point


def has_cuda() -> bool:
    return torch.cuda.is_available()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backends_with_triton(module: str) -> list:
    """``["cpu", "torch", "triton"]`` for ``parametrize``; "triton" is skipped unless
    ``module`` (a Triton kernel module) imports and Triton can run here (a CUDA device or
    TRITON_INTERPRET=1)."""
    try:
        __import__(module)
        runs = has_cuda() or triton_interpreting()
    except ImportError:
        runs = False
    reason = "Triton needs a CUDA device or TRITON_INTERPRET=1"
    return ["cpu", "torch", pytest.param("triton", marks=pytest.mark.skipif(not runs, reason=reason))]


def need_environment(path: Path, setup_script: str) -> None:
    """Skip the calling test when an extra environment (``path``, e.g. ``.venv-vllm``) is
    missing; fail it under ``CI=true``, where ``scripts/setup.sh --tests`` builds them all."""
    if path.exists():
        return
    msg = f"{path} is missing: run `bash scripts/{setup_script}` (`bash scripts/setup.sh --tests` does)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg)
    pytest.skip(msg)


COLOURS = ["red", "blue", "green", "yellow"]


def colour_questions(d: Path, splits: dict[str, int]) -> Path:
    """Write the eval tests' data into ``d``: per split, ``d/<split>.json`` (LLaVA layout) with
    that many 4-option "What colour is shape i ?" questions, each with a real PNG in
    ``d/images``. Answers and pixels come from one seeded generator, split after split, so a
    prefix of the splits is the same data whatever follows it. Returns ``d``."""
    (d / "images").mkdir()
    g = torch.Generator().manual_seed(0)
    for split, n in splits.items():
        items = []
        for i in range(n):
            k = int(torch.randint(0, 4, (1,), generator=g))
            name = f"{split}{i}.png"
            colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
            Image.new("RGB", (10 + i, 10), colour).save(d / "images" / name)
            q = f"<image>\nWhat colour is shape {i} ?\n" + "\n".join(
                f"({L}) {c}" for L, c in zip("ABCD", COLOURS, strict=True))
            items.append({"id": f"{split}-{i}", "image": name, "conversations": [
                {"from": "human", "value": q}, {"from": "gpt", "value": "ABCD"[k]}]})
        (d / f"{split}.json").write_text(json.dumps(items))
    return d


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """Absolute/relative tolerances against the float64 oracle (the input is already in
    ``dtype``, and the oracle reads the same values, so only fp32 accumulation differs)."""
    return {"rtol": 2e-5, "atol": 2e-5}


def assert_matches_reference(
    stats, logits: torch.Tensor, labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0, scaled_out: torch.Tensor | None = None,
    hist: torch.Tensor | None = None, hist_before: torch.Tensor | None = None,
) -> None:
    """Assert a :class:`mllmcal.TokenStats` (and optional scaled logits / histogram) agree
    with :mod:`mllmcal.reference` on every field, NaN pattern included."""
    v = logits.shape[-1]
    ref = R.token_stats(logits.cpu(), None if labels is None else labels.cpu(),
                        temperature.cpu() if isinstance(temperature, torch.Tensor) else temperature)
    tol = tolerances(logits.dtype)
    valid = stats.valid.reshape(-1).cpu()
    assert torch.equal(valid, ref.valid), f"valid differs: {valid} vs {ref.valid}"
    names = ["logsumexp", "confidence", "entropy", "logit_mean"]
    if labels is not None:
        names += ["label_logprob", "brier"]
    for name in names:
        got = getattr(stats, name).reshape(-1).cpu().double()
        exp = getattr(ref, name)
        # logsumexp and E_p[z] scale with |z|: compare relative to the row's magnitude.
        scale = 1.0
        if name in ("logsumexp", "logit_mean", "label_logprob"):
            scale = ref.logsumexp.abs().nan_to_num(0.0).clamp_min(1.0)
        torch.testing.assert_close(got / scale, exp / scale, rtol=tol["rtol"], atol=tol["atol"],
                                   equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    var_got = stats.logit_var.reshape(-1).cpu().double()
    var_scale = (ref.logit_var.abs() + ref.logsumexp.abs().square() * 1e-6).nan_to_num(0.0).clamp_min(1.0)
    torch.testing.assert_close(var_got / var_scale, ref.logit_var / var_scale, rtol=1e-4, atol=1e-4,
                               equal_nan=True, msg=lambda m: f"logit_var: {m}")
    # prediction: exact wherever the top two scaled logits are distinguishable in fp32.
    z = R.scaled_logits(logits.cpu(), temperature.cpu() if isinstance(temperature, torch.Tensor) else temperature)
    pred = stats.prediction.reshape(-1).cpu()
    for i in torch.nonzero(ref.valid).flatten().tolist():
        zi = z[i]
        if pred[i] != ref.prediction[i]:
            assert 0 <= pred[i] < v and zi[pred[i]] == zi.max(), f"row {i}: prediction {pred[i]} is not a maximum"
            raise AssertionError(f"row {i}: prediction {int(pred[i])} != lowest argmax {int(ref.prediction[i])}")
    assert torch.all(pred[~ref.valid] == -1), "invalid rows must predict -1"
    if labels is not None:
        correct = stats.correct.reshape(-1).cpu()
        assert torch.equal(correct, ref.correct), "correct differs"
    if scaled_out is not None:
        torch.testing.assert_close(scaled_out.reshape(-1, v).cpu().double(), z.to(logits.dtype).double(),
                                   rtol=2e-7 if logits.dtype == torch.float32 else 1e-2,
                                   atol=0.0, equal_nan=True)
    if hist is not None:
        n_bins = hist.shape[1]
        conf = stats.confidence.reshape(-1).cpu()
        keep = valid & (labels.reshape(-1).cpu() != R.IGNORE_INDEX)
        exp_hist = torch.zeros(3, n_bins, dtype=torch.long) if hist_before is None else hist_before.cpu().clone()
        b = conf_bins(torch.where(keep, conf, torch.zeros_like(conf)), n_bins)[keep]
        exp_hist[0].index_add_(0, b, torch.ones_like(b))
        exp_hist[1].index_add_(0, b, conf_fixed_point(conf[keep]))
        exp_hist[2].index_add_(0, b, stats.correct.reshape(-1).cpu()[keep].long())
        assert torch.equal(hist.cpu(), exp_hist), f"histogram differs:\n{hist}\nvs\n{exp_hist}"


def run_two_ranks(script_text: str, tmp_path, mode: str, root: str,
                  timeout: float = 90.0) -> list[dict]:
    """Run ``script_text`` as ranks 0 and 1 of a gloo group on a free loopback port.

    Each rank is started as ``python rank.py RANK PORT MODE OUT_JSON`` with ``root`` on its
    ``PYTHONPATH`` and must write its result to ``OUT_JSON``; a rank still running after
    ``timeout`` seconds (a hang) is killed and the call fails with its stderr.
    """
    import json
    import socket
    import subprocess
    import sys

    script = tmp_path / "rank.py"
    script.write_text(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, mode, str(outs[r])],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for p in procs:
            p.wait(timeout=timeout)  # generous for a loaded CI box
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        assert p.returncode == 0, p.stderr.read()[-3000:]
    return [json.loads(o.read_text()) for o in outs]



class LargestTensor(TorchDispatchMode):
    """Records the most elements any op's output had: ``with LargestTensor() as m: ...``,
    then ``m.numel``. Tests that a path never makes an ``[N, V]`` tensor bound it."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out
