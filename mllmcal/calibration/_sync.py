"""What crosses a process or file boundary: the all_reduce handshake and dict validation.

Both streaming accumulators of the package (:class:`~mllmcal.calibration.state.
CalibrationState` and :class:`~mllmcal.calibration.onepass.TemperatureFitAccumulator`)
sum themselves over ranks with :func:`agree_then_sum` and check their ``from_dict`` input
with :func:`dict_problems`; the CalibrationState's own schema is :func:`state_dict_problems`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from .functional import MAX_VALUE, NLL_OVERFLOW_NATS

__all__ = ["agree_then_sum", "require_process_group", "dict_problems", "is_int",
           "state_dict_problems", "STATE_FORMAT", "STATE_FORMATS_READ", "STATE_HIST_KEYS",
           "STATE_TOTAL_KEYS"]

STATE_FORMAT = "mllmcal.CalibrationState/2"
# Version 1 had the same keys with values limited to int64; it reads unchanged.
STATE_FORMATS_READ = ("mllmcal.CalibrationState/1", STATE_FORMAT)
STATE_HIST_KEYS = ("count", "sum_confidence_fixed", "sum_correct")
STATE_TOTAL_KEYS = ("n_scored", "sum_nll_fixed", "sum_brier_fixed", "n_nll_overflow")


# ---------------------------------------------------------------- all_reduce


def require_process_group() -> Any:
    """``torch.distributed``, or ``RuntimeError`` when no process group is initialised."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "all_reduce needs an initialised torch.distributed process group "
            "(call torch.distributed.init_process_group first)"
        )
    return dist


def agree_then_sum(
    layout: Sequence[float],
    tensors: Sequence[torch.Tensor],
    check: Callable[[list[float], list[float]], None],
    *,
    device: torch.device,
    group: Any = None,
) -> None:
    """Check that every rank has the same layout, then sum ``tensors`` over the ranks in place.

    Args:
        layout: numbers that describe this rank's data (sizes, a format version, flags),
            each exact in float64.
        tensors: summed in place, one ``all_reduce(SUM)`` each, in order.
        check: called as ``check(low, high)`` with the minimum and the maximum of each
            layout number over the ranks, before any sum; it raises to stop. Every rank
            sees the same ``low`` and ``high``, so a mismatch raises on all of them
            instead of leaving some ranks waiting in a sum of tensors of different sizes.
        device: where the float64 layout tensor goes (CUDA for NCCL, CPU for gloo).
        group: the ``torch.distributed`` process group (``None``: the default group).

    Raises ``RuntimeError`` when no process group is initialised.
    """
    dist = require_process_group()
    # One fixed-size max-reduce of (x, -x) gives (max, -min) of every number.
    desc = torch.tensor([v for x in layout for v in (float(x), -float(x))],
                        dtype=torch.float64, device=device)
    dist.all_reduce(desc, op=dist.ReduceOp.MAX, group=group)
    d = desc.cpu().tolist()
    check([-v for v in d[1::2]], d[0::2])
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


# ---------------------------------------------------------------- dict validation


def is_int(v: Any) -> bool:
    """True for a Python int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def dict_problems(d: Any, formats: Collection[str], keys: Collection[str]) -> list[str]:
    """The problems with a would-be ``to_dict`` output's format and key set (empty if none).

    ``TypeError`` if ``d`` is not a mapping. A wrong ``"format"`` is reported alone (the
    other checks would be noise); otherwise missing and unexpected keys are listed.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"from_dict needs a dict, got {type(d).__name__}")
    if d.get("format") not in formats:
        return [f"format is {d.get('format')!r}, expected one of {tuple(formats)}"]
    problems: list[str] = []
    missing = sorted(set(keys) - set(d))
    if missing:
        problems.append(f"missing keys {missing}")
    extra = sorted(set(d) - set(keys), key=str)
    if extra:
        problems.append(f"unexpected keys {extra}")
    return problems


def state_dict_problems(d: Any) -> list[str]:
    """Every problem with a would-be :meth:`CalibrationState.to_dict` output (empty if none)."""
    keys = {"format", "n_bins", *STATE_HIST_KEYS, *STATE_TOTAL_KEYS}
    problems = dict_problems(d, STATE_FORMATS_READ, keys)
    if d.get("format") not in STATE_FORMATS_READ or not keys <= set(d):
        return problems
    n_bins = d["n_bins"]
    if not is_int(n_bins) or n_bins < 1:
        problems.append(f"n_bins must be an int >= 1, got {n_bins!r}")
        return problems
    lists = {}
    for key in STATE_HIST_KEYS:
        v = d[key]
        if not isinstance(v, (list, tuple)):
            problems.append(f"{key} must be a list of {n_bins} ints, got {type(v).__name__}")
            continue
        if len(v) != n_bins:
            problems.append(f"{key} has {len(v)} entries, expected n_bins={n_bins}")
            continue
        bad = [(i, x) for i, x in enumerate(v) if not is_int(x) or x < 0 or x > MAX_VALUE]
        if bad:
            i, x = bad[0]
            problems.append(
                f"{key}[{i}] = {x!r}: entries must be non-negative ints within the state's "
                f"limit 2**94 ({len(bad)} bad entries)"
            )
            continue
        lists[key] = v
    scalars = {}
    for key in STATE_TOTAL_KEYS:
        x = d[key]
        if not is_int(x) or x < 0 or x > MAX_VALUE:
            problems.append(f"{key} = {x!r}: must be a non-negative int within the state's "
                            "limit 2**94")
        else:
            scalars[key] = x
    if len(lists) == 3:
        problems += _histogram_problems(*(lists[k] for k in STATE_HIST_KEYS), n_bins)
    if len(scalars) == 4:
        n_sc, n_over = scalars["n_scored"], scalars["n_nll_overflow"]
        if n_over > n_sc:
            problems.append(f"n_nll_overflow {n_over} > n_scored {n_sc}")
        if len(lists) == 3 and n_sc > sum(lists["count"]):
            problems.append(f"n_scored {n_sc} > total count {sum(lists['count'])} (every "
                            "scored row is also in the histogram)")
        if scalars["sum_brier_fixed"] > n_sc * (2 << 30) + n_sc:
            problems.append(f"sum_brier_fixed {scalars['sum_brier_fixed']} exceeds 2 per "
                            f"scored row ({n_sc} rows)")
        n_finite = max(0, n_sc - n_over)
        if scalars["sum_nll_fixed"] > n_finite * (int(NLL_OVERFLOW_NATS) << 24) + n_finite:
            problems.append(f"sum_nll_fixed {scalars['sum_nll_fixed']} exceeds 2**31 nats per "
                            f"row with a finite NLL ({n_finite} rows)")
    return problems


def _histogram_problems(n: list[int], sc: list[int], sy: list[int], n_bins: int) -> list[str]:
    problems = []
    scale = 1 << 32
    for b in range(n_bins):
        if sy[b] > n[b]:
            problems.append(f"bin {b}: sum_correct {sy[b]} > count {n[b]}")
        # A confidence c in bin b has b <= fp32(c · n_bins) < b + 1 (or c = 1.0 in the
        # last bin); allow fp32 round-off (relative 2**-22) and the per-row 0.5-unit
        # rounding of c · 2**32.
        lo_edge = b / n_bins * (1 - 2.0**-22)
        hi_edge = 1.0 if b == n_bins - 1 else min(1.0, (b + 1) / n_bins * (1 + 2.0**-22))
        lo_sum = math.floor(n[b] * lo_edge * scale) - n[b]
        hi_sum = math.ceil(n[b] * hi_edge * scale) + n[b]
        if not lo_sum <= sc[b] <= min(hi_sum, n[b] * scale):
            problems.append(
                f"bin {b}: sum_confidence_fixed {sc[b]} is outside what {n[b]} confidences "
                f"in [{b}/{n_bins}, {b + 1}/{n_bins}] can sum to"
            )
    return problems
