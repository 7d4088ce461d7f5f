"""The contract between :func:`mllmcal.token_stats` and its backends.

Every backend (:mod:`mllmcal._backends.registry` lists them) provides one function with
this signature::

    token_stats_into(x, labels, temperature, temperature_rows,
                     fstats, pred, flags, scaled_out, hist, ignore_index) -> None

Inputs (already validated by :mod:`mllmcal.ops`; backends do not re-check):

* ``x``: ``[N, V]`` fp32/fp16/bf16 (fp64 only for the torch backend), ``x.stride(1) == 1``,
  any ``x.stride(0) >= 0``: rows may repeat (stride 0, ``expand``) or overlap (``unfold``),
  since they are only read. N >= 0, V >= 1. Read in its own dtype, upcast in registers.
* ``labels``: int64 ``[N]`` contiguous, values in ``[0, V)`` or ``ignore_index``; or None.
* ``temperature``: python float > 0, used when ``temperature_rows`` is None.
* ``temperature_rows``: fp32 ``[N]`` contiguous, all > 0; or None.

Outputs (preallocated, contiguous, to be fully overwritten):

* ``fstats``: fp32 ``[7, N]``; row ``LSE`` logsumexp, ``CONF`` confidence, ``ENT`` entropy,
  ``LABEL_LOGPROB``, ``BRIER``, ``MEAN`` = E_p[z], ``VAR`` = Var_p[z] (z = x / T, in the
  scaled units). Invalid rows: all NaN. Without labels, or where the label is ignored,
  ``LABEL_LOGPROB`` and ``BRIER`` are NaN.
* ``pred``: int64 ``[N]``; argmax of z, lowest index on ties; -1 on invalid rows.
* ``flags``: uint8 ``[N]``; bit ``FLAG_VALID`` (finite max, no NaN), bit ``FLAG_CORRECT``
  (valid, label given and not ignored, and pred == label).
* ``scaled_out``: optional ``[N, V]`` tensor of ``x``'s dtype with ``stride(1) == 1`` and rows
  that do not overlap (``stride(0) >= V``); gets
  ``z = x / T`` (computed in fp32, rounded to its dtype). It may alias ``x``.
* ``hist``: optional int64 ``[3, n_bins]`` contiguous, *added to*: for each row that is
  valid and has a non-ignored label, with ``b = min(floor(conf * n_bins), n_bins - 1)``
  (product in fp32): ``hist[0, b] += 1``, ``hist[1, b] += rint(conf * 2**32)``,
  ``hist[2, b] += correct``. Integer adds: the result does not depend on the order rows
  are processed or how they are split.

Terms whose ``exp(z - max)`` underflows to 0 contribute nothing to entropy, mean and
variance (``0 * log 0 = 0``); kernels must guard them so that ``0 * inf`` never appears.

Row validity: a row is valid when max z is finite and no element is NaN. ``-inf``
elements are masked tokens with probability 0.
"""

from __future__ import annotations

import torch

LSE, CONF, ENT, LABEL_LOGPROB, BRIER, MEAN, VAR = range(7)
N_FSTATS = 7
IGNORE_INDEX = -100
FLAG_VALID = 1
FLAG_CORRECT = 2
CONF_FIXED_POINT_SCALE = 2.0**32
HIST_COUNT, HIST_SUM_CONF, HIST_SUM_CORRECT = range(3)


def conf_bins(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """``min(floor(conf * n_bins), n_bins - 1)`` with the product in fp32, as int64."""
    return torch.floor(conf.float() * float(n_bins)).long().clamp_(0, n_bins - 1)


def conf_fixed_point(conf: torch.Tensor) -> torch.Tensor:
    """``rint(conf * 2**32)`` as int64; exact for fp32 confidences (a power-of-two scale)."""
    return torch.round(conf.double() * CONF_FIXED_POINT_SCALE).long()
