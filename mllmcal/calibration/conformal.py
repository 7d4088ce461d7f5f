"""Split conformal prediction sets (LAC, APS) and selective answering for multiple choice.

Inputs are per-item probabilities over the item's own options: a ``[n, K]`` float tensor
or NumPy array (any float dtype and device; copied to the CPU and computed in float64
here, as these are per-item summaries, not a hot path), ``K`` the largest option count. Items with fewer options are padded, marked by one of

- ``n_options``: ``[n]`` ints, option ``k`` of item ``i`` exists iff ``k < n_options[i]``;
- ``mask``: ``[n, K]`` bool, True where the option exists;
- neither: entries equal to ``-inf`` are padding.

NaN is never padding unless ``n_options`` or ``mask`` says so: a NaN inside an item's
options is what a broken score looks like, and is a ``ValueError`` naming the item. Rows
are renormalised over the item's options (so the letter method's full-softmax letter
probabilities, which leave mass on other tokens, can be passed as they are); a negative
or infinite probability, a row whose options sum to 0, or an item with fewer than 2
options is a ``ValueError``. ``labels`` are ``[n]`` ints, the true option's index.

Scores (larger = less conforming), as in LLM-Uncertainty-Bench (Ye et al. 2024,
"Benchmarking LLMs via Uncertainty Quantification", ``uncertainty_quantification_via_cp.py``)
and VLM-Uncertainty-Bench (Kostumov et al. 2024):

- **LAC** (Sadinle et al. 2019): ``s(x, y) = 1 - p_y``.
- **APS** (Romano et al. 2020): the mass of the options at least as probable as ``y``,
  ``s(x, y) = sum_{j : p_j >= p_y} p_j``. Options tied in probability enter together (the
  benches order ties by ``argsort``, so their sets depend on the option order; here they
  do not). Randomised APS draws one ``u ~ U(0, 1)`` per item from a seeded generator:
  ``s(x, y) = sum_{j : p_j > p_y} p_j + u * sum_{j : p_j = p_y} p_j``.

Threshold (split conformal; Vovk et al. 2005, Angelopoulos & Bates 2021): with ``n``
calibration scores and ``k = ceil((n + 1)(1 - alpha))``, ``q_hat`` is the ``k``-th
smallest score, the ``k/n`` empirical quantile with the ``(n + 1)`` finite-sample
correction. ``k`` is computed exactly from ``alpha`` as written (its shortest decimal
``repr``): in floats ``(n+1)(1-alpha)`` is ``3.0000000000000004`` for ``n = 9, alpha =
0.7``, which would round ``k`` up to 4, and the binary value of ``0.3`` is just under
0.3, which would make ``k = 8`` for ``n = 9``. When
``k > n`` (``alpha < 1/(n + 1)``), ``q_hat = +inf`` and every option is in every set.
The set is ``{k : s(x, k) <= q_hat}``, so for exchangeable calib and test items
``1 - alpha <= P(y in set)``, and ``<= 1 - alpha + 1/(n + 1)`` when scores have no ties.

Two choices differ from the benches, on purpose: they take ``np.quantile(scores,
k/n, method='higher')``, which is the ``(k+1)``-th smallest score whenever ``k < n`` (one
order statistic more than the guarantee needs, so their coverage can exceed the upper
bound); and their APS ties follow the option order. Like them, an empty set gets the
most probable option(s) (``nonempty=True``, the default; it only adds coverage), so set
sizes and UAcc compare with their tables.

UAcc (Ye et al. 2024, README and ``cal_uacc``): ``UAcc = Acc / mean set size *
sqrt(|Y|)``, ``|Y|`` the number of options. With items of different option counts,
``|Y|`` is their mean option count (the benches have one count for all items). UAcc can
exceed 1.

Selective answering: an item is answered iff its confidence ``>= threshold`` (a whole
tie group is answered or not); selective risk is the error rate of the answered items and
coverage the fraction answered. :func:`selective_threshold` picks the threshold with the
largest coverage whose risk is at most the target on the data it is given.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Literal

import numpy as np
import torch

from .functional import check_choice

__all__ = [
    "SCORES",
    "SplitConformal",
    "SelectivePoint",
    "conformal_quantile",
    "conformal_scores",
    "conformal_summary",
    "option_probs",
    "prediction_set_summary",
    "selective_answering",
    "selective_at",
    "selective_threshold",
]

SCORES = ("lac", "aps")
Score = Literal["lac", "aps"]
ArrayLike = torch.Tensor | np.ndarray | Sequence


def _tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a tensor, an array or a list of numbers: {e}") from None


def option_probs(probs: ArrayLike, *, n_options: ArrayLike | None = None,
                 mask: ArrayLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check and renormalise ``[n, K]`` option probabilities (see the module docstring).

    ``probs`` may also be a list of per-item lists of different lengths (padded here).
    Returns ``(p, valid)``: ``p`` float64 ``[n, K]`` summing to 1 over each item's options,
    0 on padding; ``valid`` bool ``[n, K]``.
    """
    rows = (Sequence, np.ndarray, torch.Tensor)
    if isinstance(probs, Sequence) and probs and all(isinstance(r, rows) for r in probs) \
            and len({len(r) for r in probs}) > 1:
        if n_options is not None or mask is not None:
            raise ValueError("ragged probs carry their own option counts; give no n_options or mask")
        n_options = [len(r) for r in probs]
        width = max(n_options)
        probs = [[float(v) for v in r] + [float("-inf")] * (width - len(r)) for r in probs]
    p = _tensor(probs, "probs")
    if p.numel() == 0 and p.dim() != 2:
        raise ValueError("no items: probs is empty (n = 0)")
    if p.dim() != 2:
        raise ValueError(f"probs must be [n, K] (items x options), got shape {tuple(p.shape)}")
    if not (p.is_floating_point() or p.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"probs must hold floats, got {p.dtype}")
    p = p.double()
    n, k = p.shape
    if k < 2:
        raise ValueError(f"probs has K = {k} option column(s); an item needs at least 2 options")
    if n_options is not None and mask is not None:
        raise ValueError("give n_options or mask, not both")
    if n_options is not None:
        counts = _tensor(n_options, "n_options").reshape(-1)
        if counts.numel() == 1 and n != 1:
            counts = counts.expand(n)
        if counts.numel() != n:
            raise ValueError(f"n_options has {counts.numel()} entries for {n} items")
        if counts.is_floating_point() and bool((counts != counts.round()).any()):
            raise ValueError("n_options must hold whole numbers")
        counts = counts.long()
        if n and int(counts.max()) > k:
            raise ValueError(f"n_options has {int(counts.max())} options but probs has K = {k} columns")
        valid = torch.arange(k)[None, :] < counts[:, None]
    elif mask is not None:
        valid = _tensor(mask, "mask").bool()
        if valid.shape != p.shape:
            raise ValueError(f"mask has shape {tuple(valid.shape)}, probs {tuple(p.shape)}")
    else:
        valid = p != float("-inf")
    few = valid.sum(1) < 2
    if bool(few.any()):
        i = int(few.nonzero()[0, 0])
        raise ValueError(f"item {i} has {int(valid[i].sum())} option(s); conformal sets need at least 2")
    for bad, what in ((torch.isnan(p), "NaN"), (torch.isinf(p), "an infinite probability"),
                      (p < 0, "a negative probability")):
        bad = bad & valid
        if bool(bad.any()):
            i, j = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"probs has {what} at item {i}, option {j} ({float(p[i, j])})")
    p = torch.where(valid, p, 0.0)
    total = p.sum(1, keepdim=True)
    zero = total[:, 0] <= 0
    if bool(zero.any()):
        raise ValueError(f"item {int(zero.nonzero()[0, 0])}: its options' probabilities sum to 0")
    return p / total, valid


def _labels(labels: ArrayLike, valid: torch.Tensor) -> torch.Tensor:
    y = _tensor(labels, "labels").reshape(-1)
    if y.numel() != valid.shape[0]:
        raise ValueError(f"labels has {y.numel()} entries for {valid.shape[0]} items")
    if y.is_floating_point() and bool((y != y.round()).any()):
        raise ValueError("labels must be option indices (whole numbers)")
    y = y.long()
    out = (y < 0) | (y >= valid.shape[1])
    if not bool(out.any()):
        out = ~valid.gather(1, y[:, None])[:, 0]
    if bool(out.any()):
        i = int(out.nonzero()[0, 0])
        raise ValueError(f"item {i}: label {int(y[i])} is not one of its options")
    return y


def _all_scores(p: torch.Tensor, valid: torch.Tensor, score: str,
                u: torch.Tensor | None) -> torch.Tensor:
    """Score of every option, float64 ``[n, K]`` (+inf on padding)."""
    if check_choice("score", score, SCORES) == "lac":
        s = 1.0 - p
    else:
        # Sort each row once; a stable descending sort gives one canonical summation order
        # (tied values are equal, so their order cannot change the sums). Padding sorts
        # last as -1, so it never joins a tie group with a real zero-probability option.
        key = torch.where(valid, p, -1.0)
        ps, order = torch.sort(key, dim=1, descending=True, stable=True)
        cum = torch.cumsum(ps.clamp(min=0), dim=1)
        # first / last sorted position of each option's tie group: a running max of the
        # group starts from the left, a running min of the group ends from the right
        k = ps.shape[1]
        pos = torch.arange(k).expand_as(ps)
        differs = ps[:, 1:] != ps[:, :-1]
        edge = torch.ones_like(ps[:, :1], dtype=torch.bool)
        starts = torch.where(torch.cat([edge, differs], 1), pos, -1)
        ends = torch.where(torch.cat([differs, edge], 1), pos, k)
        first = starts.cummax(1).values
        last = ends.flip(1).cummin(1).values.flip(1)
        incl = cum.gather(1, last)  # mass of every option at least as probable
        if u is None:
            sorted_s = incl
        else:
            excl = torch.where(first > 0, cum.gather(1, (first - 1).clamp(min=0)), 0.0)
            sorted_s = excl + u[:, None] * (incl - excl)
        s = torch.empty_like(p).scatter_(1, order, sorted_s)
    return torch.where(valid, s, float("inf"))


def _uniform(n: int, generator: torch.Generator | None, seed: int) -> torch.Tensor:
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g, dtype=torch.float64)


def conformal_scores(probs: ArrayLike, labels: ArrayLike, score: Score = "lac", *,
                     n_options: ArrayLike | None = None, mask: ArrayLike | None = None,
                     randomized: bool = False, generator: torch.Generator | None = None,
                     seed: int = 0) -> torch.Tensor:
    """Non-conformity score of each item's true option, float64 ``[n]`` (LAC or APS)."""
    p, valid = option_probs(probs, n_options=n_options, mask=mask)
    y = _labels(labels, valid)
    u = _uniform(p.shape[0], generator, seed) if randomized and score == "aps" else None
    return _all_scores(p, valid, score, u).gather(1, y[:, None])[:, 0]


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    return a


def conformal_quantile(scores: ArrayLike, alpha: float) -> float:
    """``q_hat``: the ``ceil((n+1)(1-alpha))``-th smallest of the ``n`` scores; +inf when
    that exceeds ``n``. Raises ``ValueError`` for no scores or a NaN score."""
    alpha = _check_alpha(alpha)
    s = _tensor(scores, "scores").double().reshape(-1)
    n = s.numel()
    if n == 0:
        raise ValueError("no calibration items (n_calib = 0): the conformal threshold needs at least one")
    if bool(torch.isnan(s).any()):
        raise ValueError("calibration scores contain NaN")
    # alpha as written (0.7, not its binary neighbour) and exact rationals: see the module doc
    k = math.ceil((n + 1) * (1 - Fraction(repr(alpha))))
    if k > n:
        return math.inf
    return float(torch.sort(s).values[k - 1])


class SplitConformal:
    """Split conformal prediction sets over multiple-choice options.

    >>> import torch
    >>> cp = SplitConformal("lac", alpha=0.5).fit(torch.tensor([[0.75, 0.25], [0.375, 0.625]]),
    ...                                           torch.tensor([0, 1]))
    >>> cp.threshold  # k = ceil(3 * 0.5) = 2: the larger of the scores 0.25 and 0.375
    0.375
    >>> cp.predict_sets(torch.tensor([[0.875, 0.125], [0.5, 0.5]])).tolist()  # 2nd: empty -> top
    [[True, False], [True, True]]

    ``score`` is ``"lac"`` or ``"aps"``; ``randomized`` applies to APS (seeded: ``fit`` draws
    its uniforms from ``seed``, ``predict_sets`` from ``seed + 1`` unless given a
    generator). ``nonempty`` adds the most probable option(s) to an empty set.
    """

    def __init__(self, score: Score = "lac", alpha: float = 0.1, *, randomized: bool = False,
                 nonempty: bool = True, seed: int = 0) -> None:
        self.score, self.alpha = check_choice("score", score, SCORES), _check_alpha(alpha)
        self.randomized, self.nonempty, self.seed = bool(randomized), bool(nonempty), int(seed)
        self.threshold: float | None = None
        self.n_calib = 0

    def fit(self, probs: ArrayLike, labels: ArrayLike, *, n_options: ArrayLike | None = None,
            mask: ArrayLike | None = None) -> SplitConformal:
        """Set ``threshold`` (``q_hat``) from the calibration items; returns ``self``."""
        if len(probs) == 0:
            raise ValueError("no calibration items (n_calib = 0): the conformal threshold "
                             "needs at least one")
        s = conformal_scores(probs, labels, self.score, n_options=n_options, mask=mask,
                             randomized=self.randomized, seed=self.seed)
        self.threshold = conformal_quantile(s, self.alpha)
        self.n_calib = s.numel()
        return self

    def predict_sets(self, probs: ArrayLike, *, n_options: ArrayLike | None = None,
                     mask: ArrayLike | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Prediction sets, bool ``[n, K]`` (False on padding)."""
        if self.threshold is None:
            raise RuntimeError("call fit on the calibration split before predict_sets")
        p, valid = option_probs(probs, n_options=n_options, mask=mask)
        u = (_uniform(p.shape[0], generator, self.seed + 1)
             if self.randomized and self.score == "aps" else None)
        sets = (_all_scores(p, valid, self.score, u) <= self.threshold) & valid
        if self.nonempty:
            empty = ~sets.any(1, keepdim=True)
            top = valid & (p == p.max(1, keepdim=True).values)
            sets = sets | (empty & top)
        return sets

    def to_dict(self) -> dict[str, Any]:
        """The fitted rule as JSON-able values (``threshold`` +inf is written as None)."""
        t = self.threshold
        return {"score": self.score, "alpha": self.alpha, "randomized": self.randomized,
                "nonempty": self.nonempty, "seed": self.seed, "n_calib": self.n_calib,
                "threshold": None if t is None or math.isinf(t) else t}


def _metrics(covered: torch.Tensor, size: torch.Tensor, correct: torch.Tensor,
             n_opt: torch.Tensor) -> dict[str, Any]:
    n = covered.numel()
    if n == 0:
        return {"n": 0, "coverage": None, "mean_set_size": None, "accuracy": None, "uacc": None}
    mean_size = float(size.double().mean())
    acc = float(correct.double().mean())
    return {"n": n, "coverage": float(covered.double().mean()), "mean_set_size": mean_size,
            "accuracy": acc,
            "uacc": acc / mean_size * math.sqrt(float(n_opt.double().mean())) if mean_size else None}


def prediction_set_summary(sets: ArrayLike, labels: ArrayLike, correct: ArrayLike,
                           n_options: ArrayLike, *,
                           groups: Mapping[str, Sequence[Hashable]] | None = None) -> dict[str, Any]:
    """Coverage, mean set size, accuracy and UAcc of prediction sets, overall and per group.

    ``sets`` bool ``[n, K]``; ``labels`` ``[n]`` true option indices; ``correct`` ``[n]``
    bools, whether the model's answer was right (a missing answer is wrong); ``n_options``
    ``[n]`` ints (or one int). ``groups`` maps a grouping name (``"category"``) to ``[n]``
    group values; each gets ``{value: metrics}`` under ``"by"`` (None values skipped). The
    threshold is marginal, so a group's coverage is not guaranteed to reach ``1 - alpha``.
    Returns plain floats and ints.
    """
    s = _tensor(sets, "sets").bool()
    if s.dim() != 2:
        raise ValueError(f"sets must be [n, K], got shape {tuple(s.shape)}")
    n = s.shape[0]
    y = _tensor(labels, "labels").long().reshape(-1)
    c = _tensor(correct, "correct").bool().reshape(-1)
    k = _tensor(n_options, "n_options").reshape(-1)
    k = k.expand(n) if k.numel() == 1 else k
    for name, t in (("labels", y), ("correct", c), ("n_options", k)):
        if t.numel() != n:
            raise ValueError(f"{name} has {t.numel()} entries for {n} sets")
    if n and (bool((y < 0).any()) or bool((y >= s.shape[1]).any())):
        raise ValueError("labels must index the sets' columns")
    covered = s.gather(1, y[:, None])[:, 0] if n else torch.zeros(0, dtype=torch.bool)
    size = s.sum(1)
    out = _metrics(covered, size, c, k)
    if groups:
        out["by"] = {}
        for gname, values in groups.items():
            values = list(values)
            if len(values) != n:
                raise ValueError(f"group {gname!r} has {len(values)} values for {n} sets")
            per: dict[str, Any] = {}
            for v in dict.fromkeys(x for x in values if x is not None):
                idx = torch.tensor([i for i, x in enumerate(values) if x == v], dtype=torch.long)
                per[str(v)] = _metrics(covered[idx], size[idx], c[idx], k[idx])
            out["by"][gname] = per
    return out


def conformal_summary(calib_probs: ArrayLike, calib_labels: ArrayLike, test_probs: ArrayLike,
                      test_labels: ArrayLike, test_correct: ArrayLike, *, alpha: float = 0.1,
                      calib_n_options: ArrayLike | None = None,
                      test_n_options: ArrayLike | None = None,
                      groups: Mapping[str, Sequence[Hashable]] | None = None,
                      scores: Sequence[str] = SCORES, randomized: bool = False,
                      seed: int = 0) -> dict[str, Any]:
    """Fit LAC and APS on the calib split and summarise their test sets, for ``report.json``.

    Returns ``{"alpha", "n_calib", "n_test", "<score>": {"threshold" (None = +inf),
    "coverage", "mean_set_size", "accuracy", "uacc", "n", "by": {group: {value: ...}}}}``,
    all plain Python values. Padding as in the module docstring (``*_n_options`` or
    ``-inf``; ragged lists are accepted).
    """
    p_test, valid_test = option_probs(test_probs, n_options=test_n_options)
    y_test = _labels(test_labels, valid_test)
    out: dict[str, Any] = {"alpha": _check_alpha(alpha), "n_test": p_test.shape[0]}
    for score in scores:
        cp = SplitConformal(score, alpha, randomized=randomized, seed=seed)  # type: ignore[arg-type]
        cp.fit(calib_probs, calib_labels, n_options=calib_n_options)
        sets = cp.predict_sets(test_probs, n_options=test_n_options)
        out["n_calib"] = cp.n_calib
        out[score] = {"threshold": cp.to_dict()["threshold"],
                      **prediction_set_summary(sets, y_test, test_correct, valid_test.sum(1),
                                               groups=groups)}
    return out


# --------------------------------------------------------------------------- selective


@dataclass(frozen=True)
class SelectivePoint:
    """Answer iff confidence ``>= threshold``: the fraction answered (``coverage``) and
    their error rate (``risk``, None when nothing is answered)."""

    threshold: float
    coverage: float
    risk: float | None
    n: int
    n_answered: int
    target_risk: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return d


def _conf_correct(confidence: ArrayLike, correct: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n]`` float64 confidence (NaN = no answer, never answered) and ``[n]`` bool."""
    c = _tensor(confidence, "confidence").double().reshape(-1)
    y = _tensor(correct, "correct").reshape(-1)
    if c.numel() != y.numel():
        raise ValueError(f"confidence has {c.numel()} entries but correct has {y.numel()}")
    if c.numel() == 0:
        raise ValueError("no items: selective answering needs at least one (confidence, correct) pair")
    bad = ~torch.isnan(c) & ~((c >= 0) & (c <= 1))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"confidence must lie in [0, 1] (NaN = no answer); got {float(c[i])} at {i}")
    if y.dtype != torch.bool and bool(((y != 0) & (y != 1)).any()):
        raise ValueError("correct must be bools or 0/1")
    return c, y.bool()


def selective_at(confidence: ArrayLike, correct: ArrayLike, threshold: float) -> SelectivePoint:
    """Coverage and risk when answering the items with confidence ``>= threshold``.

    ``confidence`` ``[n]`` floats in [0, 1], NaN for an item with no answer (never
    answered, counted in ``n``); ``correct`` ``[n]`` bools.
    """
    c, y = _conf_correct(confidence, correct)
    take = c >= threshold  # NaN compares False
    k = int(take.sum())
    err = int((take & ~y).sum())
    return SelectivePoint(float(threshold), k / c.numel(), err / k if k else None, c.numel(), k)


def selective_threshold(confidence: ArrayLike, correct: ArrayLike,
                        target_risk: float = 0.1) -> SelectivePoint:
    """The threshold with the largest coverage whose selective risk is ``<= target_risk``.

    Candidates are the distinct confidences (answering a tie group whole); risk is not
    monotone in coverage, so every candidate is checked. When even the most confident
    group's risk exceeds the target, the threshold is +inf (answer nothing: coverage 0,
    risk None). Inputs as in :func:`selective_at`; the risk is measured on the data given.
    """
    t = float(target_risk)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"target_risk must lie in [0, 1], got {target_risk}")
    c, y = _conf_correct(confidence, correct)
    n = c.numel()
    ok = ~torch.isnan(c)
    best = SelectivePoint(math.inf, 0.0, None, n, 0, t)
    if not bool(ok.any()):
        return best
    uniq, inv = torch.unique(c[ok], return_inverse=True)  # ascending
    count = torch.zeros(uniq.numel(), dtype=torch.long).index_add_(0, inv, torch.ones_like(inv))
    errs = torch.zeros(uniq.numel(), dtype=torch.long).index_add_(0, inv, (~y[ok]).long())
    # answering every item with confidence >= uniq[j]: suffix sums from the top down
    k = count.flip(0).cumsum(0).flip(0)
    e = errs.flip(0).cumsum(0).flip(0)
    # integer errors against a float budget, so risk == target exactly counts as within it
    feasible = (e.double() <= t * k.double()).nonzero()
    if feasible.numel() == 0:
        return best
    j = int(feasible[0, 0])  # lowest threshold = largest coverage
    kj, ej = int(k[j]), int(e[j])
    return SelectivePoint(float(uniq[j]), kj / n, ej / kj, n, kj, t)


def selective_answering(calib_confidence: ArrayLike, calib_correct: ArrayLike,
                        test_confidence: ArrayLike, test_correct: ArrayLike, *,
                        target_risk: float = 0.1) -> dict[str, Any]:
    """Fit the threshold on the calib split, then measure it on test, for ``report.json``.

    Returns ``{"target_risk", "threshold" (None = answer nothing), "calib": {"coverage",
    "risk", "n", "n_answered"}, "test": {...}}``. The test point is the one to mark on the
    test risk-coverage plot (``mllmcal.plot.risk_coverage_plot(..., mark=(coverage, risk))``);
    the test risk may exceed the target, as the threshold was chosen on calib.
    """
    fit = selective_threshold(calib_confidence, calib_correct, target_risk)
    test = selective_at(test_confidence, test_correct, fit.threshold)
    keep = ("coverage", "risk", "n", "n_answered")
    return {"target_risk": fit.target_risk, "threshold": fit.to_dict()["threshold"],
            "calib": {k: getattr(fit, k) for k in keep}, "test": {k: getattr(test, k) for k in keep}}
