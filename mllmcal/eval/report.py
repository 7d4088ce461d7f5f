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
        "models": [{"model", "modality", "accuracy", "ece", "temperature",
                    "ece_after_temperature"}],  # every model and modality
        "failed": [name, ...],
        "prompt_optimization": null | {"seed_prompt", "best_prompt",
                                       "seed": {"accuracy", "ece"}, "best": {"accuracy", "ece"}}
      },
      "failed": [{"name", "path", "error"}],  # models that could not be evaluated
      "models": [{
        "name", "path", "multimodal",
        "modalities": {"image" | "text": {
            "test": <metrics>, "test_after_temperature": <metrics> | null,
            "temperature": float | null, "temperature_method", "n_calib_rows": int,
            "temperature_at_bound": bool (T is the end of the search range),
            "by_category": {"category" | "l2-category": {value: {"n", "accuracy", "ece",
                            "ece_after_temperature"}}},     # {} when the data has none
            "conformal": null (no calib split) | {"error"} | {"alpha", "n_calib", "n_test",
                "n_test_no_probs", "lac" | "aps": {"threshold", "coverage",
                "mean_set_size", "accuracy", "uacc", "n", "by": {group: {value: ...}}}},
            "selective": null | {"target_risk", "error"} | {"target_risk", "threshold",
                "calib": {"coverage", "risk", "n", "n_answered"}, "test": {...}},
            "risk_coverage_plot": file | null (absent without plots),
            "skipped_items": [[split, id, reason], ...]}},  # items this model cannot take
        "idk": {"<variant>": {"idk_rate", "false_idk_rate", "answered_accuracy",
                              "answered_ece", "by_mode": {...}, ...}},
        "prompt_optimization": null | {"best_prompt", "seed_prompt", "dev", "trajectory",
                                       "test": {"<prompt>": <metrics>}},
        "plots": [file, ...]                # this model's PNGs (when plots are drawn)
      }],
      "plots": [file, ...]                  # every PNG, relative to the report's folder
    }

``<metrics>`` = ``{"n_items", "n_scored", "n_no_answer", "accuracy" (no answer counts as
wrong), "accuracy_scored", "ece", "ece_l2", "mce", "brier", "auroc", "mean_confidence",
"n_bins", "bins": {"count", "confidence", "accuracy"}}``; ECE/MCE/Brier/AUROC are over the scored items (those with a letter and a
confidence), computed by :mod:`mllmcal.metrics`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import metrics as _metrics
from ..calibration.state import CalibrationState

__all__ = ["calibration_metrics", "write_report", "render_markdown", "plot_report", "plot_tags",
           "report_problem"]


def calibration_metrics(records: Sequence[dict], n_bins: int = 10,
                        conf_key: str = "confidence") -> dict[str, Any]:
    """Accuracy, ECE (L1, L2), MCE, Brier, AUROC and per-bin stats.

    The scalars come from :mod:`mllmcal.metrics` (float64 definitions; bins follow
    docs/design.md: equal width on [0, 1], bin = min(floor(conf·n_bins), n_bins−1) on the fp32
    confidence, as the fused kernels bin it), the per-bin stats from a
    :class:`mllmcal.CalibrationState`.
    """
    n = len(records)
    scored = [r for r in records if r.get("pred") is not None and r.get(conf_key) is not None]
    out: dict[str, Any] = {
        "n_items": n, "n_scored": len(scored), "n_no_answer": n - len(scored),
        "accuracy": sum(bool(r["correct"]) for r in records) / n if n else None,
        "n_bins": n_bins,
    }
    if not scored:
        out.update(accuracy_scored=None, ece=None, ece_l2=None, mce=None, brier=None, auroc=None,
                   mean_confidence=None,
                   bins={"count": [0] * n_bins, "confidence": [None] * n_bins,
                         "accuracy": [None] * n_bins})
        return out
    conf = torch.tensor([float(r[conf_key]) for r in scored], dtype=torch.float32)
    correct = torch.tensor([bool(r["correct"]) for r in scored], dtype=torch.bool)
    try:
        auroc: float | None = _metrics.auroc(conf, correct)
    except ValueError:  # all correct or all wrong
        auroc = None
    state = CalibrationState(n_bins)
    state.update(conf, correct)
    b = state.bin_stats()
    nz = (b["count"] > 0).tolist()

    def per_bin(t: torch.Tensor) -> list[float | None]:
        return [float(v) if ok else None for v, ok in zip(t.tolist(), nz, strict=True)]

    out.update(
        accuracy_scored=_metrics.accuracy(correct),
        ece=_metrics.ece(conf, correct, n_bins, "l1"),
        ece_l2=_metrics.ece(conf, correct, n_bins, "l2"),
        mce=_metrics.ece(conf, correct, n_bins, "max"),
        brier=_metrics.brier_score(conf, correct),
        auroc=auroc, mean_confidence=float(conf.double().mean()),
        bins={"count": [int(c) for c in b["count"].tolist()],
              "confidence": per_bin(b["confidence"]), "accuracy": per_bin(b["accuracy"])},
    )
    return out


# --------------------------------------------------------------------------- outputs


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _head(*cells: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(cells) + " |", "|" + " --- |" * len(cells)]


def render_markdown(report: dict) -> str:
    """A human-readable ``report.md`` from a report dict."""
    s = report["summary"]
    lines = ["# mllmcal evaluation report", "",
             f"Model `{s.get('model')}`, modality `{s.get('modality')}`, confidence method "
             f"`{s.get('method')}`.", "", "## Summary", "", *_head("metric", "value")]
    for key in ("accuracy", "ece", "ece_after_temperature", "temperature", "mce", "brier", "auroc",
                "idk_rate", "false_idk_rate", "n_items", "n_scored", "n_no_answer", "n_skipped"):
        lines.append(f"| {key} | {_fmt(s.get(key))} |")
    lines += ["", "## Models and modalities (test split)", "",
              *_head("model", "modality", "n", "no answer", "accuracy", "ECE", "ECE after T", "T",
                     "MCE", "Brier", "AUROC")]
    for m in report["models"]:
        for mod, r in m["modalities"].items():
            t, ta = r["test"], r.get("test_after_temperature") or {}
            temp = _fmt(r.get("temperature"), 3)
            if r.get("temperature_at_bound"):
                temp += " (end of the search range)"
            lines.append(
                f"| {m['name']} | {mod} | {t['n_items']} | {t['n_no_answer']} | {_fmt(t['accuracy'])} | "
                f"{_fmt(t['ece'])} | {_fmt(ta.get('ece'))} | {temp} | "
                f"{_fmt(t['mce'])} | {_fmt(t['brier'])} | {_fmt(t['auroc'])} |")
    lines += ["", "## I don't know (IDK)", "",
              *_head("model", "prompt variant", "IDK rate (unanswerable)",
                     "false-IDK rate (answerable)", "answered accuracy", "answered ECE")]
    for m in report["models"]:
        for variant, r in (m.get("idk") or {}).items():
            lines.append(f"| {m['name']} | {variant} | {_fmt(r['idk_rate'])} | {_fmt(r['false_idk_rate'])} | "
                         f"{_fmt(r['answered_accuracy'])} | {_fmt(r.get('answered_ece'))} |")
    lines += _category_lines(report) + _conformal_lines(report)
    for m in report["models"]:
        po = m.get("prompt_optimization")
        if not po:
            continue
        lines += ["", f"## Prompt optimisation ({m['name']})", "",
                  *_head("round", "best prompt", "dev accuracy", "dev ECE", "new candidates")]
        for t in po["trajectory"]:
            lines.append(f"| {t['round']} | {t['best_prompt']} | {_fmt(t['accuracy'])} | "
                         f"{_fmt(t['ece'])} | {t['n_new']} |")
        lines += ["", *_head("prompt", "test accuracy", "test ECE")]
        for p, r in po.get("test", {}).items():
            lines.append(f"| {p} | {_fmt(r['accuracy'])} | {_fmt(r['ece'])} |")
    failed = report.get("failed") or []
    if failed:
        lines += ["", "## Models that failed", ""]
        lines += [f"- `{f['name']}` ({f['path']}): {f['error']}" for f in failed]
    skipped = [(split, d) for split, d in report.get("data", {}).items() if d.get("n_skipped")]
    by_model = [(m["name"], mod, s) for m in report["models"]
                for mod, r in m["modalities"].items() for s in (r.get("skipped_items") or [])]
    if skipped or by_model:
        lines += ["", "## Skipped items", ""]
        for split, d in skipped:
            for item_id, reason in d["skipped"]:
                lines.append(f"- {split}: `{item_id}`: {reason}")
        for name, mod, (split, item_id, reason) in by_model:
            lines.append(f"- {name} / {mod}, {split}: `{item_id}`: {reason}")
    lines += _plot_lines(report)
    return "\n".join(lines) + "\n"


def _category_lines(report: dict) -> list[str]:
    """``## Per category``: accuracy, ECE and n per category, per model and modality."""
    rows = []
    for m in report["models"]:
        for mod, r in m["modalities"].items():
            for group, values in (r.get("by_category") or {}).items():
                for value, c in values.items():
                    rows.append(f"| {m['name']} | {mod} | {group} | {value} | {c['n']} | "
                                f"{_fmt(c['accuracy'])} | {_fmt(c['ece'])} | "
                                f"{_fmt(c.get('ece_after_temperature'))} |")
    if not rows:
        return []
    return ["", "## Per category (test split)", "",
            *_head("model", "modality", "group", "category", "n", "accuracy", "ECE",
                   "ECE after T"), *rows]


def _conformal_lines(report: dict) -> list[str]:
    """``## Conformal prediction sets`` (one row per score, then per category) and
    ``## Selective answering`` (one line per model and modality)."""
    sets, sel = [], []
    for m in report["models"]:
        for mod, r in m["modalities"].items():
            cp = r.get("conformal")
            if cp and cp.get("error"):
                sets.append(f"| {m['name']} | {mod} | – | all | {_fmt(cp.get('alpha'))} | "
                            f"{cp['error']} | | | |")
            elif cp:
                for score in ("lac", "aps"):
                    s = cp.get(score)
                    if not s:
                        continue
                    parts = [("all", s)] + [(f"{g}: {v}", c) for g, per in (s.get("by") or {}).items()
                                            for v, c in per.items()]
                    for label, c in parts:
                        sets.append(f"| {m['name']} | {mod} | {score.upper()} | {label} | "
                                    f"{_fmt(cp['alpha'])} | {_fmt(c['coverage'])} | "
                                    f"{_fmt(c['mean_set_size'])} | {_fmt(c['uacc'])} | {c['n']} |")
            s = r.get("selective")
            if s and s.get("error"):
                sel.append(f"- {m['name']} / {mod}: {s['error']}")
            elif s:
                t, c = s["test"], s["calib"]
                thr = "none (answers nothing)" if s["threshold"] is None else _fmt(s["threshold"])
                sel.append(f"- {m['name']} / {mod}: threshold {thr}; test coverage "
                           f"{_fmt(t['coverage'])}, risk {_fmt(t['risk'])} (target "
                           f"{_fmt(s['target_risk'])}); calib coverage {_fmt(c['coverage'])}, "
                           f"risk {_fmt(c['risk'])}")
    lines = []
    if sets:
        lines += ["", "## Conformal prediction sets (fitted on the calib split, test split)", "",
                  *_head("model", "modality", "score", "items", "α", "coverage",
                         "mean set size", "UAcc", "n"), *sets]
    if sel:
        lines += ["", "## Selective answering (threshold fitted on the calib split)", "", *sel]
    return lines


def _plot_lines(report: dict) -> list[str]:
    """The ``## Plots`` section: each model's own plots under its name (a report written
    before models had ``"plots"``: the flat list)."""
    own = [(m["name"], m["plots"]) for m in report["models"] if m.get("plots")]
    if own:
        lines = ["", "## Plots"]
        for name, plots in own:
            lines += ["", f"### {name}", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
        return lines
    plots = report.get("plots") or []
    return ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots] if plots else []


def _state(metrics: dict | None) -> CalibrationState | None:
    """The metrics' histogram as a CalibrationState (None if nothing was scored), rebuilt
    from the per-bin stats in ``report.json`` directly: each bin's exact sums are its count,
    count x mean confidence (in the state's 2**-32 units) and count x accuracy, so the
    state's per-bin count, accuracy and confidence (and so its ECE) are the report's. Memory
    is O(n_bins) whatever the counts (a bin of 10**12 predictions is 3 integers)."""
    if not metrics or not metrics.get("n_scored"):
        return None
    b = metrics["bins"]
    d = CalibrationState(metrics["n_bins"]).to_dict()  # n_bins checked by report_problem
    d["count"] = [int(k) for k in b["count"]]
    d["sum_confidence_fixed"] = [round(c * k * 2**32) if k else 0
                                 for c, k in zip(b["confidence"], d["count"], strict=True)]
    d["sum_correct"] = [round(a * k) if k else 0
                        for a, k in zip(b["accuracy"], d["count"], strict=True)]
    return CalibrationState.from_dict(d)


def plot_report(report: dict, out_dir: str | Path) -> list[str]:
    """Per model and modality: a reliability diagram and a confidence histogram (T = 1),
    and a before/after-temperature comparison, drawn with :mod:`mllmcal.plot`; plus the
    prompt-optimisation trajectory. Each model's file names carry its :func:`plot_tags`
    tag, and each model entry gets ``"plots"``, its own files. Returns every PNG path,
    relative to ``out_dir``."""
    from .. import plot

    out_dir = Path(out_dir)
    paths = []
    for m, model_tag in zip(report["models"], plot_tags([m["name"] for m in report["models"]]),
                            strict=True):
        own: list[str] = []
        for mod, r in m["modalities"].items():
            tag = f"{model_tag}_{mod}"
            before = _state(r["test"])
            if before is None:
                continue
            what = f"{m['name']} / {mod}"
            rel, hist = f"reliability_{tag}.png", f"confidence_{tag}.png"
            plot.reliability_diagram(before, out_dir / rel, label=what,
                                     title=f"reliability: {what}")
            plot.confidence_histogram(before, out_dir / hist, title=f"confidence histogram: {what}")
            own += [rel, hist]
            after = _state(r.get("test_after_temperature"))
            if after is not None and r.get("temperature") is not None:
                plot.temperature_comparison(before, after, out_dir / f"temperature_{tag}.png",
                                            temperature=r["temperature"],
                                            title=f"temperature scaling: {what}")
                own.append(f"temperature_{tag}.png")
            # drawn by the runner, which had the per-item confidences
            rc = r.get("risk_coverage_plot")
            if isinstance(rc, str) and (out_dir / rc).is_file():
                own.append(rc)
        po = m.get("prompt_optimization")
        if po and po["trajectory"]:
            own.append(_plot_trajectory(po, m["name"], model_tag, out_dir))
        m["plots"] = own
        paths += own
    return paths


def _plot_trajectory(po: dict, model: str, tag: str, out_dir: Path) -> str:
    """Dev accuracy and ECE of the best prompt per APE round (eval-specific)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rounds = [t["round"] for t in po["trajectory"]]
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(rounds, [t["accuracy"] for t in po["trajectory"]], "o-", label="dev accuracy")
    ax.plot(rounds, [t["ece"] for t in po["trajectory"]], "s-", label="dev ECE")
    ax.set(xlabel="round", title=f"prompt optimisation: {model}")
    ax.legend()
    fig.tight_layout()
    name = f"prompt_optimization_{tag}.png"
    fig.savefig(out_dir / name, dpi=100)
    return name


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def plot_tags(names: Sequence[str]) -> list[str]:
    """The file-name tag of each model's plots: unique, even on a case-insensitive file
    system, and the same for the same name in every run.

    A name that is already a safe file name is its own tag (``demo``); any other name
    (``llava 1.5``, ``a/model``) is slugged and gets 8 hex digits of its SHA-1, so that
    names differing only in punctuation or case (``llava 1.5``, ``llava_1.5``) do not
    write the same files. Tags that would still clash (equal names, which
    :func:`~mllmcal.eval.config.unique_names` prevents in a run) get ``-<position>``.
    """
    tags = []
    for n in names:
        slug = _slug(n)
        lossless = slug == n and sum(_slug(o).lower() == slug.lower() for o in names) == 1
        tags.append(slug if lossless else f"{slug}-{hashlib.sha1(n.encode()).hexdigest()[:8]}")
    lower = [t.lower() for t in tags]
    return [t if lower.count(t.lower()) == 1 else f"{t}-{i}" for i, t in enumerate(tags)]


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _metrics_problem(m: Any, where: str) -> str | None:
    """What in one ``<metrics>`` object the markdown and the plots cannot use, or None."""
    if not isinstance(m, dict):
        return f"{where}: must be an object, got {type(m).__name__}"
    for key in ("n_items", "n_scored", "n_no_answer"):
        if not _is_count(m.get(key)):
            return f"{where}.{key}: must be a count (an integer >= 0), got {m.get(key)!r}"
    n_bins, bins = m.get("n_bins"), m.get("bins")
    if not _is_count(n_bins) or n_bins < 1:
        return f"{where}.n_bins: must be an integer >= 1, got {n_bins!r}"
    if not isinstance(bins, dict):
        return f"{where}.bins: must be an object, got {type(bins).__name__}"
    for key in ("count", "confidence", "accuracy"):
        v = bins.get(key)
        if not isinstance(v, list):
            return f"{where}.bins.{key}: must be a list, got {type(v).__name__}"
        if len(v) != n_bins:
            return (f"{where}.n_bins is {n_bins} but its bins.{key} lists {len(v)} bins")
    for i, (k, c, a) in enumerate(zip(bins["count"], bins["confidence"], bins["accuracy"],
                                      strict=True)):
        if not _is_count(k):
            return f"{where}.bins.count[{i}]: must be a count, got {k!r}"
        for key, x in (("confidence", c), ("accuracy", a)):
            if k and not (_is_num(x) and 0.0 <= x <= 1.0):
                return f"{where}.bins.{key}[{i}]: must be a number in [0, 1], got {x!r}"
    return None


def report_problem(report: Any) -> str | None:
    """What makes ``report`` unusable for :func:`write_report`, naming the field (e.g.
    ``models[0].modalities.text.test_after_temperature: must be an object or null, got
    list``), or None. Checks the shapes report.md and the plots read, so that a damaged or
    hand-edited ``report.json`` is an error message, not a traceback or a per-sample
    expansion of its bins."""
    if not isinstance(report, dict):
        return f"top level is a {type(report).__name__}, not an object"
    for key, kind in (("summary", dict), ("models", list)):
        if not isinstance(report.get(key), kind):
            return f"'{key}' is missing or not a{'n object' if kind is dict else ' list'}"
    models = report["summary"].get("models")
    if models is not None and not (isinstance(models, list)
                                   and all(isinstance(x, dict) and "model" in x for x in models)):
        return "summary.models: must be a list of objects with 'model'"
    for i, m in enumerate(report["models"]):
        if not isinstance(m, dict) or not isinstance(m.get("modalities"), dict) or "name" not in m:
            return f"models[{i}] lacks 'name' or 'modalities'"
        for mod, r in m["modalities"].items():
            where = f"models[{i}].modalities.{mod}"
            if not isinstance(r, dict) or not isinstance(r.get("test"), dict):
                return f"{where} lacks 'test'"
            after = r.get("test_after_temperature")
            if after is not None and not isinstance(after, dict):
                return (f"{where}.test_after_temperature: must be an object or null, got "
                        f"{type(after).__name__}")
            t = r.get("temperature")
            if t is not None and not _is_num(t):
                return f"{where}.temperature: must be a number or null, got {t!r}"
            for key in ("test", "test_after_temperature"):
                problem = r.get(key) is not None and _metrics_problem(r[key], f"{where}.{key}")
                if problem:
                    return problem
            for key in ("by_category", "conformal", "selective"):
                v = r.get(key)
                if v is not None and not isinstance(v, dict):
                    return f"{where}.{key}: must be an object or null, got {type(v).__name__}"
            v = r.get("skipped_items")
            if v is not None and not (isinstance(v, list) and all(
                    isinstance(s, list) and len(s) == 3 for s in v)):
                return f"{where}.skipped_items: must be a list of [split, id, reason]"
        for key in ("idk", "prompt_optimization"):
            v = m.get(key)
            if v is not None and not isinstance(v, dict):
                return f"models[{i}].{key}: must be an object or null, got {type(v).__name__}"
        for variant, v in (m.get("idk") or {}).items():
            if not isinstance(v, dict):
                return f"models[{i}].idk.{variant}: must be an object, got {type(v).__name__}"
        po = m.get("prompt_optimization")
        if po and not (isinstance(po.get("trajectory"), list)
                       and all(isinstance(x, dict) for x in po["trajectory"])
                       and isinstance(po.get("test", {}), dict)):
            return f"models[{i}].prompt_optimization: 'trajectory' must be a list of objects"
    for key, kind in (("data", dict), ("failed", list)):
        v = report.get(key)
        if v is not None and not isinstance(v, kind):
            return f"{key}: must be a{'n object' if kind is dict else ' list'}, got {type(v).__name__}"
    return None


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
