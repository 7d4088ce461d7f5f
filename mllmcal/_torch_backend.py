"""The ``torch`` backend: a vectorised fp32 composite, processed in row chunks.

It is the portable fallback (any device, fp64 too) and the shape every fast kernel is
measured against. Memory stays bounded: at most ``CHUNK_ELEMENTS`` fp32 temporaries are
alive at once, whatever N is.
"""

from __future__ import annotations

import torch

from ._contract import (
    BRIER,
    CONF,
    ENT,
    FLAG_CORRECT,
    FLAG_VALID,
    LABEL_LOGPROB,
    LSE,
    MEAN,
    VAR,
    hist_add_,
)

CHUNK_ELEMENTS = 1 << 22


def token_stats_into(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    temperature_rows: torch.Tensor | None,
    fstats: torch.Tensor,
    pred: torch.Tensor,
    flags: torch.Tensor,
    scaled_out: torch.Tensor | None,
    hist: torch.Tensor | None,
    ignore_index: int,
) -> None:
    """Fill ``fstats``/``pred``/``flags`` for ``x`` ``[N, V]`` (see ``_contract``)."""
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

        def put(i: int, t: torch.Tensor, _valid=valid, _nan=nan, _r0=r0, _r1=r1) -> None:
            fstats[i, _r0:_r1] = torch.where(_valid, t, _nan).to(fstats.dtype)

        put(LSE, lse)
        put(CONF, conf)
        put(ENT, entropy)
        put(MEAN, ms + a)
        put(VAR, var)
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
                hist_add_(hist, fstats[CONF, r0:r1], correct, keep)
        else:
            fstats[LABEL_LOGPROB, r0:r1] = float("nan")
            fstats[BRIER, r0:r1] = float("nan")
        flags[r0:r1] = fl
