"""The demo through the evaluator: the :class:`~mllmcal.eval.runner.EvalConfig` of
``mllmcal demo``.

Scoring, prompting, the temperature fit, ECE and the IDK metrics are all
:mod:`mllmcal.eval`'s; this module only chooses the settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["demo_eval_config"]


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

