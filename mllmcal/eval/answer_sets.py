"""What the report derives from the per-item records beyond the calibration metrics:
per-category rows, conformal prediction sets, selective answering and its risk-coverage plot.

All of it is computed from the records of one model and modality, in item order (every
rank holds the gathered records, so every rank computes the same numbers; only rank 0
draws). The records carry what it needs (:mod:`mllmcal.eval.confidence`): ``category`` /
``l2_category``, ``option_probs`` (the item's probability of each option at T = 1, None
without an answer step), ``confidence`` at T = 1 (None without an answer) and ``correct``.

Conformal sets and the selective threshold are fitted on the calib split's records and
measured on the test split's, both at T = 1 (the model's own probabilities; the fitted T
is reported beside them, not applied to them). One temperature on both splits is what the
guarantee needs: the calib scores must be exchangeable with the test scores. Conformal
coverage holds at any T, only the set sizes change with it. The maths is
:mod:`mllmcal.calibration.conformal`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..calibration.conformal import conformal_summary, selective_answering
from ..prompting import OPTION_LETTERS
from .report import calibration_metrics

__all__ = ["GROUPS", "category_rows", "conformal_sets", "risk_coverage_file", "selective"]

#: report name of each category field of the records (MMBench's column names)
GROUPS = {"category": "category", "l2-category": "l2_category"}


def _groups(records: Sequence[dict]) -> dict[str, list[Any]]:
    """``{report name: per-record value}`` for the category fields some record has."""
    return {name: [r.get(key) for r in records] for name, key in GROUPS.items()
            if any(r.get(key) is not None for r in records)}


def category_rows(records: Sequence[dict], n_bins: int,
                  scaled: Sequence[dict] | None = None) -> dict[str, dict[str, dict]]:
    """Per category: ``{"category" | "l2-category": {value: {"n", "accuracy", "ece",
    "ece_after_temperature"}}}`` (empty when the data has no categories).

    ``scaled``: the same records with the confidence at the fitted T (None: no T)."""
    out: dict[str, dict[str, dict]] = {}
    for name, values in _groups(records).items():
        rows: dict[str, dict] = {}
        for v in dict.fromkeys(x for x in values if x is not None):
            idx = [i for i, x in enumerate(values) if x == v]
            m = calibration_metrics([records[i] for i in idx], n_bins)
            after = (calibration_metrics([scaled[i] for i in idx], n_bins)["ece"]
                     if scaled is not None else None)
            rows[str(v)] = {"n": m["n_items"], "accuracy": m["accuracy"], "ece": m["ece"],
                            "ece_after_temperature": after}
        out[name] = rows
    return out


def _with_probs(records: Sequence[dict]) -> list[dict]:
    return [r for r in records if r.get("option_probs") is not None]


def conformal_sets(calib: Sequence[dict], test: Sequence[dict], alpha: float
                   ) -> dict[str, Any]:
    """LAC and APS sets fitted on ``calib`` at error rate ``alpha``, summarised on ``test``
    (:func:`~mllmcal.calibration.conformal.conformal_summary`), overall and per category.

    Items without option probabilities (no answer step) take no part; ``n_test_no_probs``
    counts them. A split that cannot be used (no calib items with probabilities, say) gives
    ``{"error": message}``."""
    cal, tst = _with_probs(calib), _with_probs(test)
    try:
        if not cal or not tst:
            raise ValueError(f"no {'calib' if not cal else 'test'} item has option "
                             f"probabilities (records without 'option_probs'; the "
                             f"verbalized method gives none)")
        out = conformal_summary(
            [r["option_probs"] for r in cal], [OPTION_LETTERS.index(r["answer"]) for r in cal],
            [r["option_probs"] for r in tst], [OPTION_LETTERS.index(r["answer"]) for r in tst],
            [bool(r["correct"]) for r in tst], alpha=alpha, groups=_groups(tst) or None)
    except ValueError as exc:
        return {"alpha": alpha, "error": str(exc)}
    out["n_test_no_probs"] = len(test) - len(tst)
    return out


def _conf_correct(records: Sequence[dict]) -> tuple[list[float], list[bool]]:
    """Confidence at T = 1 (NaN: no answer, never answered) and correctness."""
    conf = [float(r["confidence"]) if r.get("pred") is not None
            and r.get("confidence") is not None else math.nan for r in records]
    return conf, [bool(r["correct"]) for r in records]


def selective(calib: Sequence[dict], test: Sequence[dict], target_risk: float
              ) -> dict[str, Any]:
    """The confidence threshold fitted on ``calib`` for ``target_risk`` and what it gives
    on ``test`` (:func:`~mllmcal.calibration.conformal.selective_answering`), or
    ``{"target_risk", "error"}``."""
    try:
        if not calib:
            raise ValueError("no calib split to choose the threshold on")
        return selective_answering(*_conf_correct(calib), *_conf_correct(test),
                                   target_risk=target_risk)
    except ValueError as exc:
        return {"target_risk": target_risk, "error": str(exc)}


def risk_coverage_file(test: Sequence[dict], sel: dict[str, Any] | None, path: Path,
                       title: str) -> str | None:
    """Draw the test split's risk-coverage curve to ``path`` with the selective point
    marked (when there is one); returns the file name, or None when no item was scored."""
    from .. import plot

    conf, correct = _conf_correct(test)
    keep = [i for i, c in enumerate(conf) if not math.isnan(c)]
    if not keep:
        return None
    mark = label = None
    point = (sel or {}).get("test") or {}
    if point.get("risk") is not None:
        # the curve is of the scored items; the mark's coverage counts every item, so it is
        # put on the curve's scale
        cov = point["coverage"]
        mark = (cov * len(conf) / len(keep) if len(keep) < len(conf) else cov, point["risk"])
        label = (f"threshold {sel['threshold']:.3f} (target risk {sel['target_risk']:g}): "
                 f"coverage {point['coverage']:.3f}, risk {point['risk']:.3f}")
    c = torch.tensor([conf[i] for i in keep], dtype=torch.float64)
    y = torch.tensor([correct[i] for i in keep])
    plot.risk_coverage_plot(c, y, path, title=title, mark=mark, mark_label=label)
    return path.name
