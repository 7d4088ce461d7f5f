"""Temperature scaling: offline fit (one-pass, Newton or the paper's grid) and an online
estimator. The one-pass fit and its accumulator live in :mod:`mllmcal.calibration.onepass`.

Maths. With raw logits x, β = 1/T and p = softmax(βx), the per-row NLL is
ℓ(β) = logsumexp(βx) − β·x_y, so

    dℓ/dβ = E_p[x] − x_y,        d²ℓ/dβ² = Var_p[x] ≥ 0.

The NLL is convex in β, and one fused ``token_stats`` pass at T gives both derivatives: it
returns E_p[z], Var_p[z], logsumexp and log p_y of the *scaled* logits z = x/T, from which
E_p[x] = T·E_p[z], Var_p[x] = T²·Var_p[z] and x_y = T·(log p_y + logsumexp). So each Newton
iteration costs one read of the data and no [N, V] temporaries.

Positivity: Newton runs on β inside a bracket [β_lo, β_hi] ⊂ (0, ∞) that shrinks with the
sign of the gradient (convexity: g < 0 means the optimum is at a larger β). A Newton step
that leaves the bracket is replaced by the bracket's geometric midpoint, so β stays > 0 and
the iteration cannot diverge; near the optimum the steps are pure Newton (quadratic).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

from .. import _contract as C
from ..ops import TokenStats, token_stats

__all__ = ["fit_temperature", "OnlineTemperature", "PAPER_TEMPERATURE_GRID", "nll_derivatives"]

_log = logging.getLogger("mllmcal")
Batch = tuple[torch.Tensor, torch.Tensor]
# The search of Chen et al. (COLING 2025): T = 0.01, 0.02, ..., 9.99.
PAPER_TEMPERATURE_GRID = tuple(round(0.01 * k, 2) for k in range(1, 1000))


def _checked(logits_or_batches: Any, labels: torch.Tensor | None) -> Any:
    """The data as a batch source: a logits tensor with its labels becomes one batch; a
    callable returning batches, or an iterable of them, is returned as it is."""
    if isinstance(logits_or_batches, torch.Tensor):
        if labels is None:
            raise ValueError("fit_temperature(logits, labels): labels are required with a logits tensor")
        return ((logits_or_batches, labels),)
    if labels is not None:
        raise ValueError(
            "labels must be None when batches are given; each batch is a (logits, labels) pair"
        )
    if not callable(logits_or_batches) and not isinstance(logits_or_batches, Iterable):
        raise TypeError(
            "expected a logits tensor with labels, an iterable of (logits, labels) batches, or a "
            f"callable returning one; got {type(logits_or_batches).__name__}"
        )
    return logits_or_batches


def _batches(logits_or_batches: Any, labels: torch.Tensor | None) -> Callable[[], Iterator[Batch]]:
    """Return a function that yields the data afresh for every pass."""
    source = _checked(logits_or_batches, labels)
    if callable(source):
        return lambda: iter(source())
    if _is_one_shot(source):
        raise TypeError(
            "method='newton' reads the data several times, but a one-shot iterator/generator "
            "can be read only once. Use method='onepass' (or 'auto'), or pass a list of "
            "(logits, labels) batches, a re-iterable such as a DataLoader, or a callable that "
            "returns a fresh iterator (e.g. `lambda: gen()`)"
        )
    return lambda: iter(source)


def _unpack(batch: Any) -> Batch:
    try:
        x, y = batch
    except (TypeError, ValueError):
        raise TypeError(
            f"each batch must be a (logits, labels) pair, got {type(batch).__name__}"
        ) from None
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("each batch must be a pair of tensors (logits [..., V], labels [...])")
    return x, y


def nll_derivatives(stats: TokenStats, temperature: float) -> tuple[int, float, float, float, int]:
    """Sums over the usable rows of one ``token_stats`` pass at ``temperature``.

    Returns ``(n, Σ NLL, Σ dℓ/dβ, Σ d²ℓ/dβ², n_masked)``, float64 sums; rows that are invalid or
    ignored are skipped, and ``n_masked`` counts rows whose label has probability 0 (a
    masked label token): their NLL is infinite at every T, so they are left out of the fit.
    """
    lp = stats.label_logprob.reshape(-1).double()
    keep = torch.isfinite(lp)
    masked = int((lp == -math.inf).sum())
    t = float(temperature)
    lp = lp[keep]
    lse = stats.logsumexp.reshape(-1)[keep].double()
    mean = stats.logit_mean.reshape(-1)[keep].double()
    var = stats.logit_var.reshape(-1)[keep].double()
    g = t * (mean - lp - lse)  # E_p[x] − x_y
    h = t * t * var
    sums = torch.stack((-lp.sum(), g.sum(), h.sum())).cpu().tolist()
    return int(keep.sum()), sums[0], sums[1], sums[2], masked


def _pass(source: Callable[[], Iterator[Batch]], temperature: float, backend: str,
          ignore_index: int) -> tuple[int, float, float, float, int]:
    n = masked = 0
    f = g = h = 0.0
    for batch in source():
        x, y = _unpack(batch)
        s = token_stats(x, y, temperature, backend, ignore_index=ignore_index)
        bn, bf, bg, bh, bm = nll_derivatives(s, temperature)
        n, f, g, h, masked = n + bn, f + bf, g + bg, h + bh, masked + bm
    return n, f, g, h, masked


def _is_one_shot(obj: Any) -> bool:
    return (not isinstance(obj, torch.Tensor) and not callable(obj)
            and isinstance(obj, Iterable) and iter(obj) is obj)


def _stream(logits_or_batches: Any, labels: torch.Tensor | None) -> Iterator[Batch]:
    """The data as (logits, labels) batches, read once."""
    source = _checked(logits_or_batches, labels)
    for batch in source() if callable(source) else source:
        yield _unpack(batch)


def fit_temperature(
    logits_or_batches: Any,
    labels: torch.Tensor | None = None,
    method: str = "auto",
    *,
    init: float = 1.0,
    t_min: float | None = None,
    t_max: float | None = None,
    rtol: float = 1e-7,
    max_iter: int = 50,
    per_octave: int = 3,
    n_temperatures: int | None = None,
    backend: str = "auto",
    ignore_index: int = C.IGNORE_INDEX,
    progress: bool | None = None,
    return_info: bool = False,
) -> float | tuple[float, dict[str, Any]]:
    """Fit one temperature T > 0 that minimises the full-vocabulary NLL of ``softmax(x / T)``.

    Args:
        logits_or_batches: either a ``[..., V]`` logits tensor (with ``labels``), or the
            data as batches of ``(logits [..., V], labels [...])`` pairs, streamed through the
            fused kernels one batch at a time and never concatenated: a list/tuple, any
            iterable (a ``DataLoader``, a one-shot generator), or a zero-argument callable
            returning a fresh iterator.
        labels: integer labels for a logits tensor (``ignore_index`` rows are skipped);
            must be None when batches are given.
        method: which fit:

            * ``"onepass"``: reads each batch exactly once. One fused kernel call per batch
              accumulates the NLL and its first two derivatives in β = 1/T at
              K temperatures over [t_min, t_max] (default the paper's 0.01–9.99; K = 31,
              three per octave), then refines between the bracketing grid points with a
              cubic Hermite interpolant of the derivative (see
              :mod:`mllmcal.calibration.onepass`): agrees with a fine grid search to well
              under 0.5% in T. Costs about K/4 exps and K multiplies per logit (the
              C++ kernel squares exps along the grid's exact doublings of β), in one read.
            * ``"newton"``: safeguarded Newton in β, one fused ``token_stats`` pass per
              iteration (typically 5–10 passes, one exp per logit each): the exact optimum,
              and faster than ``"onepass"`` when reading the data again is cheap (logits in
              memory or on disk). Needs re-readable data; a one-shot generator is a
              ``TypeError``.
            * ``"grid"``: the paper's search over T = 0.01, 0.02, ..., 9.99 with exact
              full-vocabulary NLL at each T, in one pass (999 temperatures per kernel call;
              fast on the ``cpu``, ``cuda`` and ``triton`` backends, slow on ``torch``).
            * ``"auto"`` (default): ``"onepass"`` for a one-shot iterator/generator (it can
              be read only once), ``"newton"`` for everything else (a tensor, a list, a
              re-iterable, a callable), where re-reading is cheap.
        init: starting temperature for Newton.
        t_min, t_max: Newton's search bracket for T (default 0.01 and 100), or the
            one-pass grid's range (default 0.01 and 9.99). A result at a bound is logged as
            a warning (the NLL keeps decreasing beyond it, e.g. on separable data).
        rtol: Newton stops when a step changes β by less than ``rtol·β``.
        max_iter: cap on Newton passes.
        per_octave, n_temperatures: the ``"onepass"`` grid: ``per_octave`` temperatures per
            halving of T (default 3, K = 31), or, if ``n_temperatures`` is given, that many
            log-spaced ones (16–64 is the useful range); see
            :class:`~mllmcal.calibration.TemperatureFitAccumulator`.
        backend: for Newton, passed to :func:`mllmcal.token_stats`; for ``"onepass"`` and
            ``"grid"``, the fit kernels' backend (``"auto"``, ``"cpu"``, ``"cuda"``,
            ``"triton"``, ``"torch"``).
        ignore_index: label value of rows to skip.
        progress: tqdm progress bar (default off).
        return_info: also return a dict (``n_rows``, ``nll`` per row at T, ``passes``,
            ``n_masked_labels``; Newton adds ``grad``/``converged``; ``"onepass"`` and
            ``"grid"`` add ``grid``/``grid_nll`` (increasing T) and ``method``).

    Rows that are invalid or ignored are skipped; rows whose label token has probability 0
    (masked, ``-inf``) have infinite NLL at every T and are skipped too (and counted).

    For incremental use (an evaluation that scores its calibration split batch by batch,
    checkpoints, and merges across ranks) use
    :class:`mllmcal.calibration.TemperatureFitAccumulator` directly.

    Returns:
        T as a Python float (and the info dict with ``return_info=True``).

    Raises:
        ValueError: no usable rows ("fitting on no data"), or bad arguments.
        TypeError: ``method="newton"`` with a one-shot iterator.
    """
    from .onepass import NO_DATA, PAPER_T_MAX, PAPER_T_MIN, TemperatureFitAccumulator, check_t_range

    if method not in ("auto", "newton", "onepass", "grid"):
        raise ValueError(f"method must be 'auto', 'newton', 'onepass' or 'grid', got {method!r}")
    if method == "auto":
        method = "onepass" if _is_one_shot(logits_or_batches) else "newton"
    if method in ("onepass", "grid"):
        if method == "grid":
            acc = TemperatureFitAccumulator(PAPER_TEMPERATURE_GRID, derivatives=False,
                                            backend=backend, ignore_index=ignore_index)
        else:
            acc = TemperatureFitAccumulator(
                per_octave=per_octave, n_temperatures=n_temperatures,
                t_min=PAPER_T_MIN if t_min is None else t_min,
                t_max=PAPER_T_MAX if t_max is None else t_max,
                backend=backend, ignore_index=ignore_index)
        from tqdm.auto import tqdm

        for x, y in tqdm(_stream(logits_or_batches, labels), desc=f"fit temperature ({method})",
                         unit="batch", disable=not progress):
            acc.update(x, y)
        t, info = acc.fit(return_info=True)
        # Report the grid in increasing T, the order of PAPER_TEMPERATURE_GRID.
        info.update(grid=info["grid"].flip(0), grid_nll=info["grid_nll"].flip(0), method=method)
        return (t, info) if return_info else t

    t_min = 1e-2 if t_min is None else t_min
    t_max = 1e2 if t_max is None else t_max
    check_t_range(t_min, t_max)
    source = _batches(logits_or_batches, labels)
    if not (math.isfinite(init) and t_min <= init <= t_max):
        raise ValueError(f"init must be in [t_min, t_max] = [{t_min}, {t_max}], got {init}")
    from tqdm.auto import tqdm

    beta = 1.0 / init
    lo, hi = 1.0 / t_max, 1.0 / t_min
    bar = tqdm(total=max_iter, desc="fit temperature (Newton)", disable=not progress)
    passes = 0
    n = masked = 0
    f = g = 0.0
    converged = False
    try:
        for _ in range(max_iter):
            n, f, g, h, masked = _pass(source, 1.0 / beta, backend, ignore_index)
            passes += 1
            bar.update(1)
            if n == 0:
                raise ValueError(NO_DATA)
            if g > 0:
                hi = beta
            else:
                lo = beta
            new = beta - g / h if h > 0 else math.nan
            if not (lo < new < hi):
                new = math.sqrt(lo * hi)
            bar.set_postfix(T=f"{1.0 / new:.6g}", nll=f"{f / n:.6g}")
            done = abs(new - beta) <= rtol * beta or g == 0.0
            beta = new
            if done or hi - lo <= rtol * lo:
                converged = True
                break
    finally:
        bar.close()
    t = 1.0 / beta
    if not converged:
        _log.warning("fit_temperature: Newton did not converge in %d passes (T=%g)", max_iter, t)
    if t <= t_min * (1 + 1e-6) or t >= t_max * (1 - 1e-6):
        _log.warning(
            "fit_temperature: the optimum lies at the bound T=%g of [t_min, t_max]; widen them", t
        )
    if masked:
        _log.warning("fit_temperature: skipped %d rows whose label has probability 0", masked)
    info = {"n_rows": n, "nll": f / n, "passes": passes, "grad": g, "n_masked_labels": masked,
            "converged": converged, "method": "newton"}
    return (t, info) if return_info else t


class OnlineTemperature:
    """Running temperature estimate for serving, updated between batches.

    Each :meth:`update` scores a batch at the current T with one fused pass (its
    :class:`~mllmcal.TokenStats` is returned for reuse, e.g. by a ``CalibrationState``), adds
    the batch's NLL gradient G and curvature H in β = 1/T to running sums, and takes one
    Newton step β ← β − G/H. The running gradient is then moved to the new β by its
    linearisation (G ← G + H·Δβ), so the sums always describe the NLL around the current T.
    On a stationary stream with ``decay=1`` the sums approach those of the whole stream and T
    converges to the offline fit; ``decay < 1`` forgets old batches geometrically, to track
    drift. A step changes β by at most a factor ``max_step``, so T stays > 0. Each update
    reads the batch sums back to the host once (one sync per batch, not per token).

    Args:
        init: starting temperature.
        decay: weight kept by the old sums at each update, in (0, 1].
        min_rows: rows to see before T starts moving.
        max_step: bound on the factor by which β can change in one update (> 1).
        t_min, t_max: T is clamped to this range.
        backend, ignore_index: passed to :func:`mllmcal.token_stats`.
    """

    def __init__(self, init: float = 1.0, *, decay: float = 1.0, min_rows: int = 1,
                 max_step: float = 2.0, t_min: float = 1e-2, t_max: float = 1e2,
                 backend: str = "auto", ignore_index: int = C.IGNORE_INDEX) -> None:
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"init temperature must be finite and > 0, got {init}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if not max_step > 1:
            raise ValueError(f"max_step must be > 1, got {max_step}")
        if not (0 < t_min <= init <= t_max):
            raise ValueError(f"need 0 < t_min <= init <= t_max, got {t_min}, {init}, {t_max}")
        self.beta = 1.0 / init
        self.decay, self.min_rows, self.max_step = decay, min_rows, max_step
        self.t_min, self.t_max = t_min, t_max
        self.backend, self.ignore_index = backend, ignore_index
        self.grad = self.curv = self.weight = 0.0
        self.n_rows = 0

    @property
    def temperature(self) -> float:
        return 1.0 / self.beta

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
        """Score ``[..., V]`` logits at the current T, then update T. Returns the stats."""
        t = self.temperature
        s = token_stats(logits, labels, t, self.backend, ignore_index=self.ignore_index)
        n, _, g, h, _ = nll_derivatives(s, t)
        self.grad = self.decay * self.grad + g
        self.curv = self.decay * self.curv + h
        self.weight = self.decay * self.weight + n
        self.n_rows += n
        if self.n_rows >= self.min_rows and self.curv > 0:
            new = self.beta - self.grad / self.curv
            new = min(max(new, self.beta / self.max_step), self.beta * self.max_step)
            new = min(max(new, 1.0 / self.t_max), 1.0 / self.t_min)
            self.grad += self.curv * (new - self.beta)
            self.beta = new
        return s

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta, "grad": self.grad, "curv": self.curv,
                "weight": self.weight, "n_rows": self.n_rows}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.beta, self.grad, self.curv = float(d["beta"]), float(d["grad"]), float(d["curv"])
        self.weight, self.n_rows = float(d["weight"]), int(d["n_rows"])

    def __repr__(self) -> str:
        return f"OnlineTemperature(T={self.temperature:.6g}, n_rows={self.n_rows})"
