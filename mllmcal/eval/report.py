"""Metrics over scored items, and the ``report.json`` / ``report.md`` / PNG outputs.

``report.json`` schema (all numbers are floats unless said; None where not measured)::

    {
      "schema_version": 1,
      "config": {...},                      # the EvalConfig that produced it
      "data": {"test": {"path", "n_items", "n_skipped", "skipped": [[id, reason], ...]}, ...},
      "summary": {                          # first model, first modality (image if it has one)
        "model", "modality", "method",
        "accuracy", "ece", "ece_after_temperature", "temperature", "mce", "brier", "auroc",
        "n_items", "n_scored", "n_no_answer", "n_skipped",
        "idk_rate", "false_idk_rate",
        "prompt_optimization": null | {"seed_prompt", "best_prompt",
                                       "seed": {"accuracy", "ece"}, "best": {"accuracy", "ece"}}
      },
      "models": [{
        "name", "path", "multimodal",
        "modalities": {"image" | "text": {
            "test": <metrics>, "test_after_temperature": <metrics> | null,
            "temperature": float | null, "temperature_method", "n_calib_rows": int}},
        "idk": {"<variant>": {"idk_rate", "false_idk_rate", "answered_accuracy",
                              "answered_ece", "by_mode": {...}, ...}},
        "prompt_optimization": null | {"best_prompt", "seed_prompt", "dev", "trajectory",
                                       "test": {"<prompt>": <metrics>}}
      }]
    }

``<metrics>`` = ``{"n_items", "n_scored", "n_no_answer", "accuracy" (no answer counts as
wrong), "accuracy_scored", "ece", "ece_l2", "mce", "brier", "auroc", "mean_confidence",
"n_bins", "bins": {"count", "confidence", "accuracy"}}``; ECE/MCE/Brier/AUROC are over the
scored items (those with a letter and a confidence).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["calibration_metrics", "write_report", "render_markdown", "plot_report"]


def _auroc(conf: np.ndarray, correct: np.ndarray) -> float | None:
    """Probability that a correct item outranks a wrong one (ties count half)."""
    pos, neg = int(correct.sum()), int((~correct).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(conf, kind="mergesort")
    ranks = np.empty(len(conf), dtype=np.float64)
    sorted_conf = conf[order]
    # average ranks over ties
    _, start, counts = np.unique(sorted_conf, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[correct].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def calibration_metrics(records: Sequence[dict], n_bins: int = 10,
                        conf_key: str = "confidence") -> dict[str, Any]:
    """Accuracy, ECE (L1, L2), MCE, Brier, AUROC and per-bin stats, in float64.

    Bins follow DESIGN.md: equal width on [0, 1], bin = min(floor(conf·n_bins), n_bins−1);
    the confidence is rounded to fp32 first, as the fused kernels and
    :class:`mllmcal.CalibrationState` bin it, so both give the same histogram.
    """
    n = len(records)
    scored = [r for r in records if r.get("pred") is not None and r.get(conf_key) is not None]
    conf = np.array([float(np.float32(r[conf_key])) for r in scored], dtype=np.float64)
    correct = np.array([bool(r["correct"]) for r in scored], dtype=bool)
    out: dict[str, Any] = {
        "n_items": n, "n_scored": len(scored), "n_no_answer": n - len(scored),
        "accuracy": sum(bool(r["correct"]) for r in records) / n if n else None,
        "accuracy_scored": float(correct.mean()) if len(scored) else None,
        "n_bins": n_bins,
    }
    if not len(scored):
        out.update(ece=None, ece_l2=None, mce=None, brier=None, auroc=None, mean_confidence=None,
                   bins={"count": [0] * n_bins, "confidence": [None] * n_bins,
                         "accuracy": [None] * n_bins})
        return out
    b = np.minimum(np.floor(conf.astype(np.float32) * np.float32(n_bins)).astype(np.int64), n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(np.float64)
    sum_conf = np.bincount(b, weights=conf, minlength=n_bins)
    sum_corr = np.bincount(b, weights=correct.astype(np.float64), minlength=n_bins)
    nz = count > 0
    gap = np.zeros(n_bins)
    gap[nz] = np.abs(sum_corr[nz] / count[nz] - sum_conf[nz] / count[nz])
    w = count / count.sum()
    out.update(
        ece=float((w * gap).sum()), ece_l2=float(math.sqrt((w * gap**2).sum())),
        mce=float(gap[nz].max()), brier=float(((conf - correct) ** 2).mean()),
        auroc=_auroc(conf, correct), mean_confidence=float(conf.mean()),
        bins={"count": count.astype(int).tolist(),
              "confidence": [float(sum_conf[i] / count[i]) if nz[i] else None for i in range(n_bins)],
              "accuracy": [float(sum_corr[i] / count[i]) if nz[i] else None for i in range(n_bins)]},
    )
    return out


# --------------------------------------------------------------------------- outputs


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(report: dict) -> str:
    """A human-readable ``report.md`` from a report dict."""
    s = report["summary"]
    lines = ["# mllmcal evaluation report", "",
             f"Model `{s.get('model')}`, modality `{s.get('modality')}`, confidence method "
             f"`{s.get('method')}`.", "", "## Summary", "", "| metric | value |", "| --- | --- |"]
    for key in ("accuracy", "ece", "ece_after_temperature", "temperature", "mce", "brier", "auroc",
                "idk_rate", "false_idk_rate", "n_items", "n_scored", "n_no_answer", "n_skipped"):
        lines.append(f"| {key} | {_fmt(s.get(key))} |")
    lines += ["", "## Models and modalities (test split)", "",
              "| model | modality | n | no answer | accuracy | ECE | ECE after T | T | MCE | Brier | AUROC |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        for mod, r in m["modalities"].items():
            t, ta = r["test"], r.get("test_after_temperature") or {}
            lines.append(
                f"| {m['name']} | {mod} | {t['n_items']} | {t['n_no_answer']} | {_fmt(t['accuracy'])} | "
                f"{_fmt(t['ece'])} | {_fmt(ta.get('ece'))} | {_fmt(r.get('temperature'), 3)} | "
                f"{_fmt(t['mce'])} | {_fmt(t['brier'])} | {_fmt(t['auroc'])} |")
    lines += ["", "## I don't know (IDK)", "",
              "| model | prompt variant | IDK rate (unanswerable) | false-IDK rate (answerable) | answered accuracy | answered ECE |",
              "| --- | --- | --- | --- | --- | --- |"]
    for m in report["models"]:
        for variant, r in (m.get("idk") or {}).items():
            lines.append(f"| {m['name']} | {variant} | {_fmt(r['idk_rate'])} | {_fmt(r['false_idk_rate'])} | "
                         f"{_fmt(r['answered_accuracy'])} | {_fmt(r.get('answered_ece'))} |")
    for m in report["models"]:
        po = m.get("prompt_optimization")
        if not po:
            continue
        lines += ["", f"## Prompt optimisation ({m['name']})", "",
                  "| round | best prompt | dev accuracy | dev ECE | new candidates |",
                  "| --- | --- | --- | --- | --- |"]
        for t in po["trajectory"]:
            lines.append(f"| {t['round']} | {t['best_prompt']} | {_fmt(t['accuracy'])} | "
                         f"{_fmt(t['ece'])} | {t['n_new']} |")
        lines += ["", "| prompt | test accuracy | test ECE |", "| --- | --- | --- |"]
        for p, r in po.get("test", {}).items():
            lines.append(f"| {p} | {_fmt(r['accuracy'])} | {_fmt(r['ece'])} |")
    skipped = [(split, d) for split, d in report.get("data", {}).items() if d.get("n_skipped")]
    if skipped:
        lines += ["", "## Skipped items", ""]
        for split, d in skipped:
            for item_id, reason in d["skipped"]:
                lines.append(f"- {split}: `{item_id}`: {reason}")
    plots = report.get("plots") or []
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _plot_bins(ax_rel: Any, ax_hist: Any, metrics: dict, label: str, color: str) -> None:
    n_bins = metrics["n_bins"]
    centers = (np.arange(n_bins) + 0.5) / n_bins
    acc = [a if a is not None else np.nan for a in metrics["bins"]["accuracy"]]
    ax_rel.bar(centers, acc, width=1.0 / n_bins, alpha=0.45, color=color, edgecolor=color,
               label=f"{label} (ECE {_fmt(metrics['ece'], 3)})")
    ax_hist.bar(centers, metrics["bins"]["count"], width=1.0 / n_bins, alpha=0.45, color=color,
                edgecolor=color, label=label)


def plot_report(report: dict, out_dir: str | Path) -> list[str]:
    """Reliability diagram + confidence histogram per model and modality (before/after T),
    and the prompt-optimisation trajectory. Returns the PNG paths relative to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    for m in report["models"]:
        for mod, r in m["modalities"].items():
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
            ax1.plot([0, 1], [0, 1], "k--", lw=1)
            _plot_bins(ax1, ax2, r["test"], "T = 1", "tab:blue")
            if r.get("test_after_temperature"):
                _plot_bins(ax1, ax2, r["test_after_temperature"],
                           f"T = {r['temperature']:.2f}", "tab:orange")
            ax1.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
                    title=f"reliability: {m['name']} / {mod}")
            ax2.set(xlabel="confidence", ylabel="items", xlim=(0, 1), title="confidence histogram")
            ax1.legend(loc="upper left", fontsize=8)
            ax2.legend(loc="upper left", fontsize=8)
            fig.tight_layout()
            name = f"reliability_{_slug(m['name'])}_{mod}.png"
            fig.savefig(out_dir / name, dpi=100)
            plt.close(fig)
            paths.append(name)
        po = m.get("prompt_optimization")
        if po and po["trajectory"]:
            rounds = [t["round"] for t in po["trajectory"]]
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot(rounds, [t["accuracy"] for t in po["trajectory"]], "o-", label="dev accuracy")
            ax.plot(rounds, [t["ece"] for t in po["trajectory"]], "s-", label="dev ECE")
            ax.set(xlabel="round", title=f"prompt optimisation: {m['name']}")
            ax.legend()
            fig.tight_layout()
            name = f"prompt_optimization_{_slug(m['name'])}.png"
            fig.savefig(out_dir / name, dpi=100)
            plt.close(fig)
            paths.append(name)
    return paths


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def write_report(report: dict, out_dir: str | Path, plots: bool = True) -> Path:
    """Write ``report.json``, ``report.md`` and the PNGs into ``out_dir``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        report["plots"] = plot_report(report, out_dir)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    (out_dir / "report.md").write_text(render_markdown(report))
    return path
