"""The demo through the evaluator: the :class:`~mllmcal.eval.runner.EvalConfig` of
``mllmcal demo`` and the quick headline figures of a demo checkpoint.

Scoring, prompting, the temperature fit, ECE and the IDK metrics are all
:mod:`mllmcal.eval`'s; this module only chooses the settings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

__all__ = ["demo_eval_config", "evaluate_demo_model"]


def demo_eval_config(model: Any, data_dir: str | Path, out: str | Path, *,
                     split_limits: dict[str, int] | None = None, limit: int | None = None,
                     **settings: Any):
    """The :class:`~mllmcal.eval.runner.EvalConfig` that evaluates ``model`` on the demo data.

    Args:
        model: a checkpoint path or a :class:`~mllmcal.eval.runner.ModelSpec`.
        data_dir: a demo data directory (``test/calib/dev/idk.json`` and ``images/``).
        out: the output directory (report and score cache).
        split_limits, limit: items per split, and a cap on every split.
        settings: any other ``EvalConfig`` field (``optimize_prompts``, ``ape_rounds``, ...).
    """
    from mllmcal.eval.data import find_split
    from mllmcal.eval.runner import EvalConfig

    data_dir = Path(data_dir)
    paths = {s: find_split(data_dir, s) for s in ("test", "calib", "dev", "idk")}
    images = data_dir / "images"
    return EvalConfig(
        models=[model], out=str(out), images=str(images) if images.is_dir() else None,
        **{s: str(p) if p else None for s, p in paths.items()},
        limit=limit, split_limits=dict(split_limits or {}), **settings)


def evaluate_demo_model(model_dir: str | Path, data_dir: str | Path,
                        limit: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """The paper's headline figures for a demo checkpoint, quickly: the evaluator at the
    answer position only (one generated token), without prompt optimisation or plots.

    On ``data_dir``'s ``test`` (answerable) items with the image and text only, T fitted
    on ``calib`` in one pass, and the ``idk`` split under each abstention hint. The first
    ``limit`` items of each split (all if None). A quick check for tuning and tests; the
    report of ``mllmcal demo`` is the full pipeline (up to 20 generated tokens, APE).

    Returns ``{"n_test", "accuracy", "ece", "mean_confidence", "temperature",
    "ece_after_temperature", "text_only_accuracy", "text_only_ece", "idk": {variant:
    {"idk_rate", "false_idk_rate", "answered_accuracy"}}}``.
    """
    import torch

    from mllmcal.eval.runner import run_eval

    prev = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="mllmcal-demo-eval-") as out:
            cfg = demo_eval_config(str(model_dir), data_dir, out, limit=limit,
                                   max_new_tokens=1, batch_size=64,
                                   temperature_method="onepass", progress=False, plots=False)
            report = run_eval(cfg)
    finally:
        torch.set_num_threads(prev)
    m = report["models"][0]
    img, txt = m["modalities"]["image"], m["modalities"]["text"]
    return {
        "n_test": img["test"]["n_items"],
        "accuracy": img["test"]["accuracy"],
        "ece": img["test"]["ece"],
        "mean_confidence": img["test"]["mean_confidence"],
        "temperature": img["temperature"],
        "ece_after_temperature": (img["test_after_temperature"] or {}).get("ece"),
        "text_only_accuracy": txt["test"]["accuracy"],
        "text_only_ece": txt["test"]["ece"],
        "idk": {variant: {k: r[k] for k in ("idk_rate", "false_idk_rate", "answered_accuracy")}
                for variant, r in m["idk"].items()},
    }
