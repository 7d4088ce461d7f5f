"""Calibration plots, rendered with matplotlib's Agg canvas to PNG or SVG files.

No pyplot and no global backend switch: each function builds its own ``Figure`` on a
``FigureCanvasAgg``, so plotting works headless and never disturbs an interactive session.
The output format follows the file suffix (``.png`` or ``.svg``). Every function returns the
path it wrote.

Inputs called ``data`` are either a :class:`~mllmcal.CalibrationState` or a
``(confidence, correct)`` pair of ``[n]`` tensors (binned here with ``n_bins``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .calibration.metrics import risk_coverage_curve
from .calibration.state import CalibrationState

__all__ = [
    "reliability_diagram",
    "confidence_histogram",
    "risk_coverage_plot",
    "temperature_comparison",
]

_FORMATS = (".png", ".svg")


def _as_state(data: Any, n_bins: int) -> CalibrationState:
    if isinstance(data, CalibrationState):
        if data.count == 0:
            raise ValueError("cannot plot an empty CalibrationState")
        return data
    try:
        confidence, correct = data
    except (TypeError, ValueError):
        raise TypeError(
            "expected a CalibrationState or a (confidence, correct) pair of tensors, got "
            f"{type(data).__name__}"
        ) from None
    s = CalibrationState(n_bins)
    s.update(torch.as_tensor(confidence).detach().cpu(), torch.as_tensor(correct).detach().cpu())
    if s.count == 0:
        raise ValueError("cannot plot no data (0 samples)")
    return s


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() not in _FORMATS:
        raise ValueError(f"path must end in .png or .svg, got {str(path)!r}")
    p.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(p, format=p.suffix[1:].lower(), dpi=120, bbox_inches="tight")
    return p


def _draw_reliability(ax, ax_hist, s: CalibrationState, label: str, color: str,
                      alpha_gap: float = 0.3) -> None:
    b = s.bin_stats()
    nz = b["count"] > 0  # empty bins are not drawn: they have no accuracy
    lo, hi = b["lower"][nz].numpy(), b["upper"][nz].numpy()
    width = hi - lo
    acc, conf = b["accuracy"][nz].numpy(), b["confidence"][nz].numpy()
    ax.bar(lo, acc, width=width, align="edge", color=color, alpha=0.8, edgecolor="black",
           linewidth=0.5, label=f"{label} (ECE = {s.ece('l1'):.4f})")
    # The gap to the bin's mean confidence, shaded between the two levels.
    ax.bar(lo, conf - acc, bottom=acc, width=width, align="edge", color="red",
           alpha=alpha_gap, hatch="//", edgecolor="red", linewidth=0.0, label="gap to confidence")
    if ax_hist is not None:
        ax_hist.bar(lo, b["count"][nz].numpy(), width=width, align="edge", color=color,
                    alpha=0.8, edgecolor="black", linewidth=0.5)


def _axes_with_histogram(fig: Figure, top: Any, bottom: Any, *,
                         diagonal_label: str | None = None, ylabels: bool = True):
    """Reliability axes (diagonal drawn) over a count histogram sharing its x axis."""
    ax = fig.add_subplot(top)
    ax_hist = fig.add_subplot(bottom, sharex=ax)
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1, label=diagonal_label)
    ax.set(xlim=(0, 1), ylim=(0, 1))
    ax.tick_params(labelbottom=False)
    ax_hist.set(xlabel="confidence")
    if ylabels:
        ax.set_ylabel("accuracy")
        ax_hist.set_ylabel("count")
    return ax, ax_hist


def reliability_diagram(data: Any, path: str | os.PathLike, *, n_bins: int = 15,
                        title: str | None = None, label: str = "model") -> Path:
    """Reliability diagram: per-bin accuracy bars, the gap to confidence shaded, empty bins
    left out, a count histogram beneath, and the ECE in the legend."""
    s = _as_state(data, n_bins)
    fig = Figure(figsize=(5, 6))
    gs = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax, ax_hist = _axes_with_histogram(fig, gs[0], gs[1], diagonal_label="perfect calibration")
    _draw_reliability(ax, ax_hist, s, label, "tab:blue")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"Reliability diagram ({s.count} predictions)")
    return _save(fig, path)


def confidence_histogram(data: Any, path: str | os.PathLike, *, n_bins: int = 15,
                         title: str | None = None) -> Path:
    """Histogram of confidences (fraction of predictions per bin), with the mean
    confidence and the accuracy marked."""
    s = _as_state(data, n_bins)
    b = s.bin_stats()
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    frac = (b["count"] / b["count"].sum()).numpy()
    ax.bar(b["lower"].numpy(), frac, width=(b["upper"] - b["lower"]).numpy(), align="edge",
           color="tab:blue", edgecolor="black", linewidth=0.5)
    ax.axvline(s.mean_confidence(), color="tab:orange", linestyle="--",
               label=f"mean confidence = {s.mean_confidence():.3f}")
    ax.axvline(s.accuracy(), color="tab:green", linestyle=":", label=f"accuracy = {s.accuracy():.3f}")
    ax.set(xlim=(0, 1), xlabel="confidence", ylabel="fraction of predictions",
           title=title or "Confidence histogram")
    ax.legend(fontsize=8)
    return _save(fig, path)


def risk_coverage_plot(confidence: torch.Tensor, correct: torch.Tensor,
                       path: str | os.PathLike, *, title: str | None = None,
                       mark: tuple[float, float] | None = None,
                       mark_label: str | None = None) -> Path:
    """Selective risk against coverage (most confident first), with the AURC in the legend.

    ``mark=(coverage, risk)`` draws one operating point on the curve, e.g. the selective
    answering threshold of :func:`mllmcal.calibration.conformal.selective_answering`.
    """
    cov, risk = risk_coverage_curve(confidence, correct)
    cov, risk = cov.cpu().numpy(), risk.cpu().numpy()
    fig = Figure(figsize=(5, 3.5))
    ax = fig.add_subplot()
    ax.plot(cov, risk, color="tab:blue", label=f"AURC = {risk.mean():.4f}")
    ax.fill_between(cov, risk, alpha=0.2, color="tab:blue")
    if mark is not None:
        mc, mr = float(mark[0]), float(mark[1])
        ax.plot([mc], [mr], "o", color="tab:red", zorder=3,
                label=mark_label or f"coverage {mc:.3f}, risk {mr:.3f}")
        ax.axvline(mc, color="tab:red", linestyle=":", linewidth=1)
    top = max(float(risk.max()), float(mark[1]) if mark is not None else 0.0)
    ax.set(xlim=(0, 1), ylim=(0, max(1e-3, top * 1.05)), xlabel="coverage",
           ylabel="risk (error rate)", title=title or "Risk-coverage curve")
    ax.legend(fontsize=8)
    return _save(fig, path)


def temperature_comparison(before: Any, after: Any, path: str | os.PathLike, *,
                           n_bins: int = 15, temperature: float | None = None,
                           title: str | None = None) -> Path:
    """Side-by-side reliability diagrams before and after temperature scaling."""
    s0, s1 = _as_state(before, n_bins), _as_state(after, n_bins)
    fig = Figure(figsize=(9, 6))
    gs = fig.add_gridspec(2, 2, height_ratios=(3, 1), hspace=0.08, wspace=0.15)
    t_label = "after" if temperature is None else f"after (T = {temperature:.3g})"
    for col, (s, name, color) in enumerate(((s0, "before", "tab:orange"),
                                            (s1, t_label, "tab:blue"))):
        ax, ax_hist = _axes_with_histogram(fig, gs[0, col], gs[1, col], ylabels=col == 0)
        _draw_reliability(ax, ax_hist, s, name, color)
        ax.set_title(name)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title or "Temperature scaling")
    return _save(fig, path)
