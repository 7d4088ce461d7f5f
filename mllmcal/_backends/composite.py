"""The ``torch`` backend: vectorised composites of torch ops, processed in row blocks.

It is the portable fallback (any device, and the only backend that reads fp64) and the
shape every fast kernel is measured against. Memory stays bounded: token statistics keep
at most ``CHUNK_ELEMENTS`` fp32 temporaries alive at once, the fit ``FIT_BLOCK_ELEMENTS``
(~64 MB), whatever N is.
"""

from __future__ import annotations

import torch

from .._contract import (
    BRIER,
    CONF,
    ENT,
    FLAG_CORRECT,
    FLAG_VALID,
    HIST_COUNT,
    HIST_SUM_CONF,
    HIST_SUM_CORRECT,
    LABEL_LOGPROB,
    LSE,
    MEAN,
    VAR,
    conf_bins,
    conf_fixed_point,
)

__all__ = ["histogram_add_into", "temperature_fit_into", "token_stats_into"]

CHUNK_ELEMENTS = 1 << 22
FIT_BLOCK_ELEMENTS = 1 << 24


def histogram_add_into(
    hist: torch.Tensor, conf: torch.Tensor, correct: torch.Tensor, keep: torch.Tensor
) -> None:
    """Add rows where ``keep`` (and ``conf`` is not NaN) to int64 ``[3, n_bins]`` ``hist``."""
    n_bins = hist.shape[1]
    keep = keep & ~torch.isnan(conf)
    conf = torch.where(keep, conf, torch.zeros_like(conf))
    b = conf_bins(conf, n_bins)
    k = keep.long()
    hist[HIST_COUNT].index_add_(0, b, k)
    hist[HIST_SUM_CONF].index_add_(0, b, conf_fixed_point(conf) * k)
    hist[HIST_SUM_CORRECT].index_add_(0, b, correct.long() * k)


def token_stats_into(x: torch.Tensor, labels: torch.Tensor | None, temperature: float,
                     temperature_rows: torch.Tensor | None, fstats: torch.Tensor,
                     pred: torch.Tensor, flags: torch.Tensor, scaled_out: torch.Tensor | None,
                     hist: torch.Tensor | None, ignore_index: int) -> None:
    """Fill ``fstats``/``pred``/``flags`` for ``x`` ``[N, V]`` (see :mod:`mllmcal._contract`)."""
    n, v = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xs = x[r0:r1].to(compute)
        if temperature_rows is not None:
            z = xs / temperature_rows[r0:r1, None].to(compute)
        else:
            z = xs / torch.tensor(temperature, dtype=compute, device=x.device)
        if scaled_out is not None:
            scaled_out[r0:r1].copy_(z)
        m = z.amax(dim=-1)
        valid = torch.isfinite(m)  # amax propagates NaN; +inf and all -inf are not finite
        ms = torch.where(valid, m, torch.zeros_like(m))
        d = z - ms[:, None]
        e = torch.exp(d)
        s = e.sum(-1)
        lse = ms + torch.log(s)
        p = e / s[:, None]
        # Terms whose probability underflows to 0 contribute 0 (0 * log 0 = 0); guarding on
        # e > 0 rather than on finiteness also keeps d**2 from overflowing to inf * 0.
        dz = torch.where(e > 0, d, torch.zeros_like(d))
        a = (p * dz).sum(-1)  # E_p[z - m]
        var = (p * (dz - a[:, None]).square()).sum(-1)
        entropy = torch.log(s) - a
        conf = 1.0 / s  # exp(m - lse)
        argmax = torch.argmax(torch.where(torch.isnan(z), torch.full_like(z, -torch.inf), z), -1)
        nan = torch.full_like(lse, float("nan"))
        for i, t in ((LSE, lse), (CONF, conf), (ENT, entropy), (MEAN, ms + a), (VAR, var)):
            fstats[i, r0:r1] = torch.where(valid, t, nan).to(fstats.dtype)
        pr = torch.where(valid, argmax, torch.full_like(argmax, -1))
        pred[r0:r1] = pr
        fl = valid.to(torch.uint8) * FLAG_VALID
        if labels is not None:
            y = labels[r0:r1]
            ignored = y == ignore_index
            ys = torch.where(ignored, torch.zeros_like(y), y)
            lp = d.gather(1, ys[:, None]).squeeze(1) - torch.log(s)
            brier = (p * p).sum(-1) - 2.0 * torch.exp(lp) + 1.0
            keep = valid & ~ignored
            fstats[LABEL_LOGPROB, r0:r1] = torch.where(keep, lp, nan).to(fstats.dtype)
            fstats[BRIER, r0:r1] = torch.where(keep, brier, nan).to(fstats.dtype)
            correct = keep & (pr == y)
            fl = fl | (correct.to(torch.uint8) * FLAG_CORRECT)
            if hist is not None:
                histogram_add_into(hist, fstats[CONF, r0:r1], correct, keep)
        else:
            fstats[LABEL_LOGPROB, r0:r1] = float("nan")
            fstats[BRIER, r0:r1] = float("nan")
        flags[r0:r1] = fl


def temperature_fit_into(x: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor,
                         out: torch.Tensor, status: torch.Tensor, ignore_index: int) -> None:
    """The fit's per-row accumulators (see :func:`mllmcal.ops.temperature_fit_rows`) with
    the definitions of :func:`mllmcal.reference.temperature_fit_rows`, K passes of ``exp``
    over row blocks; fp64 ``x`` is computed (and ``out`` written) in fp64."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    n, v = x.shape
    rows = max(1, FIT_BLOCK_ELEMENTS // max(1, v))
    b = betas.to(device=x.device, dtype=compute)
    for r0 in range(0, n, rows):
        xs = x[r0:r0 + rows].to(compute)
        y = labels[r0:r0 + rows]
        m = xs.amax(1)
        bad = torch.isnan(xs).any(1) | (xs == torch.inf).any(1)
        valid = ~bad & (m > -torch.inf) & (y != ignore_index)
        m_safe = torch.where(valid, m, 0.0)
        d = xs - m_safe[:, None]
        dy = d.gather(1, torch.where(y == ignore_index, 0, y)[:, None]).squeeze(1)
        used = valid & (dy > -torch.inf)
        d = torch.where(used[:, None], d, -torch.inf)
        res = torch.empty(xs.shape[0], 3, b.numel(), dtype=compute, device=x.device)
        for k in range(b.numel()):
            e = torch.exp(b[k] * d)
            dd = torch.where(e > 0, d, 0.0)  # 0 · inf guard: masked entries carry nothing
            s = e.sum(1)
            s_safe = torch.where(used, s, 1.0)
            mean = (e * dd).sum(1) / s_safe
            res[:, 0, k] = torch.log(s_safe) - b[k] * dy
            res[:, 1, k] = mean - dy
            res[:, 2, k] = ((e * dd * dd).sum(1) / s_safe - mean * mean).clamp_min(0.0)
        out[r0:r0 + rows] = torch.where(used[:, None, None], res, 0.0).to(out.dtype)
        status[r0:r0 + rows] = torch.where(used, 1, torch.where(valid, 2, 0)).to(torch.uint8)
