"""Float64 definitions of every quantity mllmcal computes: the oracle for all fast paths.

Nothing here is fast and nothing here is clever; each function states the definition from
docs/design.md as directly as torch allows. Fast backends are tested against these functions.

The one deliberate fp32 step is the temperature division: the contract defines
``z = logits / T`` *computed in fp32*, so that a row whose scaled logits overflow fp32 is
invalid for every backend alike. Everything after that is float64.

Beside the oracle sit the inputs it is checked on and the baseline it is measured against:
:func:`make_logits` / :func:`make_labels` (random logits made hostile on purpose: masks,
NaN, +inf, huge values, ties) and :func:`eager_composite` (what users write today). The
tests, ``bench/`` and ``mllmcal bench`` all take them from here, so the thing measured is
the thing tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
HOSTILE_KINDS = ("normal", "masked", "fully_masked", "nan", "posinf", "huge", "ties", "peaked")
# Σ confidence is kept in histograms as an integer in units of 2**-32, so that sums are
# exact and independent of the order in which rows arrive.
CONF_FIXED_POINT_SCALE = 2.0**32


@dataclass
class ReferenceStats:
    """Per-row statistics, all ``[N]``; float fields are float64, ``prediction`` int64."""

    logsumexp: torch.Tensor
    confidence: torch.Tensor
    prediction: torch.Tensor
    entropy: torch.Tensor
    valid: torch.Tensor
    logit_mean: torch.Tensor
    logit_var: torch.Tensor
    label_logprob: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    brier: torch.Tensor | None = None


def scaled_logits(logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """``z = logits / T`` computed in fp32 (fp64 input stays fp64), returned as ``[N, V]``."""
    x = logits.reshape(-1, logits.shape[-1])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(temperature, torch.Tensor):
        t = temperature.reshape(-1, 1).to(device=x.device, dtype=compute)
    else:
        t = torch.tensor(float(temperature), dtype=compute, device=x.device)
    return x.to(compute) / t


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> ReferenceStats:
    """Reference for :func:`mllmcal.token_stats` on ``[..., V]`` logits, flattened to N rows.

    * ``valid``: the row's max is finite and it has no NaN (hence no +inf either).
    * ``logsumexp = log Σ exp z``; ``confidence = exp(max z - logsumexp)``.
    * ``prediction``: the lowest index attaining ``max z``; -1 on invalid rows.
    * ``entropy = -Σ p log p`` (nats, ``0 log 0 = 0``).
    * ``logit_mean = E_p[z]``, ``logit_var = Var_p[z]`` (what temperature fitting needs).
    * with labels: ``label_logprob = z_y - logsumexp``, ``correct = prediction == y``,
      ``brier = Σ (p_i - 1[i=y])^2``; NaN / False where ``y == ignore_index``.

    Invalid rows give NaN for every float field and ``correct = False``.
    """
    z = scaled_logits(logits, temperature).double()
    n, v = z.shape
    m = z.max(dim=-1).values if v > 0 else torch.full((n,), float("nan"), dtype=torch.float64)
    valid = torch.isfinite(m) & ~torch.isnan(z).any(dim=-1)
    zs = torch.where(valid[:, None], z, torch.zeros_like(z))
    ms = torch.where(valid, m, torch.zeros_like(m))
    # Work relative to the row max: with |z| ~ 1e30, ``m + log s`` absorbs ``log s``, so
    # probabilities must come from ``z - m``, never from ``z - logsumexp``.
    d = zs - ms[:, None]
    s = torch.exp(d).sum(-1)
    log_s = torch.log(s)
    lse = ms + log_s
    logp = d - log_s[:, None]
    p = torch.exp(logp)
    live = p > 0  # 0 log 0 = 0; also keeps -inf and underflowed terms out of every sum
    entropy = -torch.where(live, p * logp, torch.zeros_like(p)).sum(-1)
    dl = torch.where(live, d, torch.zeros_like(d))
    mean_d = (p * dl).sum(-1)
    dev = torch.where(live, d - mean_d[:, None], torch.zeros_like(d))
    var = (p * dev * dev).sum(-1)
    mean = ms + mean_d
    conf = 1.0 / s
    # argmax over the scaled row; ``torch.argmax`` returns the first maximal index.
    pred = torch.argmax(zs, dim=-1) if v > 0 else torch.zeros(n, dtype=torch.long)
    nan = torch.full_like(lse, float("nan"))

    def mask(t: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, t, nan)

    out = ReferenceStats(
        logsumexp=mask(lse),
        confidence=mask(conf),
        prediction=torch.where(valid, pred, torch.full_like(pred, -1)),
        entropy=mask(entropy),
        valid=valid,
        logit_mean=mask(mean),
        logit_var=mask(var),
    )
    if labels is not None:
        y = labels.reshape(-1).to(torch.long)
        ignored = y == ignore_index
        ys = torch.where(ignored, torch.zeros_like(y), y)
        lp = d.gather(1, ys[:, None]).squeeze(1) - log_s
        py = torch.exp(lp)
        brier = (p * p).sum(-1) - 2 * py + 1
        keep = valid & ~ignored
        out.label_logprob = torch.where(keep, lp, nan)
        out.brier = torch.where(keep, brier, nan)
        out.correct = keep & (pred == y)
    return out


def histogram_bin(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each confidence: ``min(floor(conf * n_bins), n_bins - 1)``.

    The product is taken in fp32, as every kernel does, so that all backends agree on
    which bin a given fp32 confidence falls in.
    """
    b = torch.floor(confidence.float() * float(n_bins)).long()
    return b.clamp(0, n_bins - 1)


def histogram(
    confidence: torch.Tensor, correct: torch.Tensor, n_bins: int, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Equal-width calibration histogram on [0, 1], float64 sums.

    Returns ``count`` (int64), ``sum_confidence`` and ``sum_correct`` (float64), each
    ``[n_bins]``. Rows where ``mask`` is False (or confidence is NaN) are left out.
    """
    conf = confidence.reshape(-1)
    corr = correct.reshape(-1)
    keep = ~torch.isnan(conf)
    if mask is not None:
        keep &= mask.reshape(-1)
    conf, corr = conf[keep], corr[keep]
    b = histogram_bin(conf, n_bins)
    count = torch.zeros(n_bins, dtype=torch.long).index_add_(0, b, torch.ones_like(b))
    sconf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf.double())
    scorr = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, corr.double())
    return {"count": count, "sum_confidence": sconf, "sum_correct": scorr}


# --------------------------------------------------------------------------- temperature fit

FIT_SKIPPED, FIT_USED, FIT_MASKED_LABEL = 0, 1, 2


def temperature_fit_rows(
    logits: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for the one-pass temperature-fit kernels.

    For each row x with label y and each inverse temperature β (``betas``, ``[K]``), with
    p = softmax(βx):

    * ``nll = logsumexp(βx) − β·x_y``
    * ``dnll = d nll/dβ = E_p[x] − x_y``
    * ``d2nll = d² nll/dβ² = Var_p[x]``

    computed in float64 from ``d = x − max x`` (the subtraction in fp32, as the kernels
    do, so a difference that overflows fp32 is -inf for every backend alike).

    Returns ``(out, status)``: float64 ``[N, 3, K]`` (nll, dnll, d2nll; zeros where the row
    is not used) and uint8 ``[N]``: ``FIT_USED``, ``FIT_SKIPPED`` (invalid row, i.e. a NaN,
    a +inf or no finite entry, or an ignored label), ``FIT_MASKED_LABEL`` (x_y = -inf: the
    NLL is infinite at every T).
    """
    x = logits.reshape(-1, logits.shape[-1]).float()
    y = labels.reshape(-1)
    b = betas.double().reshape(-1)
    n, k = x.shape[0], b.numel()
    out = torch.zeros(n, 3, k, dtype=torch.float64)
    status = torch.zeros(n, dtype=torch.uint8)
    for r in range(n):
        row = x[r]
        if int(y[r]) == ignore_index:
            continue
        if bool(torch.isnan(row).any()) or bool((row == torch.inf).any()):
            continue
        m = row.max()
        if not bool(torch.isfinite(m)):
            continue
        d = (row - m).double()  # fp32 subtraction, then float64
        dy = d[int(y[r])]
        if dy == -torch.inf:
            status[r] = FIT_MASKED_LABEL
            continue
        live = d > -torch.inf
        dl = d[live]
        bz = b[:, None] * dl[None, :]  # [K, live columns]
        lse = torch.logsumexp(bz, 1)
        p = torch.exp(bz - lse[:, None])
        mean = (p * dl).sum(1)
        out[r, 0] = lse - b * dy
        out[r, 1] = mean - dy
        out[r, 2] = (p * (dl[None, :] - mean[:, None]) ** 2).sum(1)
        status[r] = FIT_USED
    return out, status


# --------------------------------------------------------------------------- inputs and baseline


def make_logits(
    n: int, v: int, dtype: torch.dtype = torch.float32, kind: str = "normal", seed: int = 0,
    device: str | torch.device = "cpu", scale: float = 3.0,
) -> torch.Tensor:
    """Random ``[n, v]`` logits of ``dtype``, made hostile according to ``kind``.

    * ``normal``: N(0, scale²); ``peaked``: one large logit per row (confidence near 1).
    * ``masked``: about half the entries -inf (never the whole row).
    * ``fully_masked``: every other row all -inf; ``nan``/``posinf``: one bad entry in
      every third row; ``huge``: entries near ±3e4 (fp16-safe) or ±1e30 (fp32/bf16).
    * ``ties``: values from a 3-level set, so maxima repeat (lowest index must win).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if kind == "masked" and v > 1:
        mask = torch.rand(n, v, generator=g) < 0.5
        keep = torch.randint(0, v, (n,), generator=g)
        mask[torch.arange(n), keep] = False
        x[mask] = float("-inf")
    elif kind == "fully_masked":
        x[::2] = float("-inf")
    elif kind in ("nan", "posinf"):
        cols = torch.randint(0, v, (n,), generator=g)
        rows = torch.arange(0, n, 3)
        x[rows, cols[rows]] = float("nan") if kind == "nan" else float("inf")
    elif kind == "huge":
        big = 3.0e4 if dtype == torch.float16 else 1.0e30
        x = torch.sign(x) * big * (0.5 + torch.rand(n, v, generator=g, dtype=torch.float64) / 2)
    elif kind == "ties":
        x = torch.randint(0, 3, (n, v), generator=g).double()
    elif kind == "peaked":
        x[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += 25.0
    elif kind not in ("normal", "masked"):
        raise ValueError(f"unknown kind {kind!r}")
    return x.to(dtype).to(device)


def make_labels(
    n: int, v: int, seed: int = 0, ignore_frac: float = 0.2, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """int64 ``[n]`` labels in ``[0, v)`` with about ``ignore_frac`` set to -100."""
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = IGNORE_INDEX
    return y.to(device)


def eager_composite(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0):
    """What users write today: the torch eager composite of the same statistics.

    ``log_softmax`` over an fp32 upcast, then max, entropy, gather and Brier as separate
    passes. This is the baseline in every benchmark (``mllmcal bench`` and ``bench/`` import
    it from here) and its ``torch.compile`` form is the second baseline.

    Returns ``(logsumexp, confidence, prediction, entropy, label_logprob, brier)``, ``[N]``.
    """
    z = logits.float() / temperature
    logp = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    conf, pred = logp.max(dim=-1)
    conf = conf.exp()
    p = logp.exp()
    entropy = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)
    y = labels.clamp_min(0)
    label_logprob = logp.gather(-1, y[:, None]).squeeze(-1)
    brier = (p * p).sum(-1) - 2 * label_logprob.exp() + 1
    return lse, conf, pred, entropy, label_logprob, brier
