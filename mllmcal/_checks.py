"""Validation of the fused ops' inputs: temperatures and labels, with errors that name
the problem. ``token_stats`` and ``linear_token_stats`` call these before their op; the
ops themselves only dispatch to a backend."""

from __future__ import annotations

import math
import struct

import torch

__all__ = [
    "FEW_ROWS", "check_labels", "check_scalar_temperature", "check_temperature",
    "plain_labels",
]

# Kernels compute z = x / T in fp32, so T must survive the cast: a float that rounds to 0,
# to a subnormal (whose reciprocal overflows) or to inf in fp32 is refused up front.
_FP32_TINY = torch.finfo(torch.float32).tiny
_FP32_MAX = torch.finfo(torch.float32).max


def _as_fp32(t: float) -> float:
    try:
        return struct.unpack("f", struct.pack("f", t))[0]
    except OverflowError:  # struct refuses finite doubles beyond fp32's range
        return math.copysign(math.inf, t)


def check_scalar_temperature(temperature: float) -> float:
    """``float(temperature)``, or a clear error unless it is finite and > 0, in fp32 too."""
    # The common case in two comparisons: a float in [tiny, max] of fp32 rounds to a
    # normal finite fp32 (NaN fails both comparisons and goes to the full check).
    if type(temperature) is float and _FP32_TINY <= temperature <= _FP32_MAX:
        return temperature
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(
            f"temperature must be a float or a tensor, got {type(temperature).__name__}"
        ) from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    t32 = _as_fp32(t)
    if not (math.isfinite(t32) and t32 >= _FP32_TINY):
        what = "infinite" if not math.isfinite(t32) else "zero or subnormal"
        raise ValueError(
            f"temperature {t!r} is {what} in fp32, where the kernels divide by it; "
            f"use a temperature in [{_FP32_TINY:.3g}, {_FP32_MAX:.3g}]"
        )
    return t


def check_temperature(
    temperature: float | torch.Tensor, n: int, device: torch.device, validate: bool
) -> tuple[float, torch.Tensor | None]:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() == 1 and temperature.dim() == 0:
            temperature = float(temperature)
        else:
            if temperature.numel() != n:
                raise ValueError(
                    f"temperature must be a float or have one entry per row ({n}), "
                    f"got shape {tuple(temperature.shape)}"
                )
            if temperature.device != device:
                raise ValueError(
                    f"temperature is on {temperature.device} but logits are on {device}"
                )
            if not temperature.is_floating_point():
                raise TypeError(f"temperature must be floating point, got {temperature.dtype}")
            t = temperature.detach().reshape(n).to(torch.float32).contiguous()
            if validate and n and not torch.compiler.is_compiling():
                ok = (t >= _FP32_TINY) & torch.isfinite(t)
                if not bool(ok.all()):
                    raise ValueError(
                        "every temperature must be finite and > 0 in fp32 (at least "
                        f"{_FP32_TINY:.3g}, where the kernels divide by it)"
                    )
            return 1.0, t
    return check_scalar_temperature(temperature), None


FEW_ROWS = 64  # up to this many CPU rows, labels are checked in Python (see check_labels)


def check_labels(
    labels: torch.Tensor | None, lead: tuple[int, ...], n: int, v: int, device: torch.device,
    ignore_index: int, validate: bool,
) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    # By shape, not by element count: labels [3, 2] for logits [2, 3, V] have the right
    # count but pair rows with the wrong labels.
    if tuple(labels.shape) != lead:
        what = "one entry per row of logits" if labels.numel() != n else "the leading shape"
        raise ValueError(
            f"labels must have {what} of logits {lead} (logits {lead + (v,)}), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but logits are on {device}")
    y = labels.detach().reshape(n).to(torch.int64).contiguous()
    if not n:
        return y
    if device.type == "cpu" and n <= FEW_ROWS and not torch.compiler.is_compiling():
        # The decode loop's few rows: a Python scan (~1 µs) instead of four small ops and a
        # reduction (~20 µs). Same verdicts.
        rows = [i for i, t in enumerate(y.tolist()) if (t < 0 or t >= v) and t != ignore_index]
        if not rows:
            return y
        if validate:
            raise ValueError(
                f"label {int(y[rows[0]])} at row {rows[0]} is outside [0, {v}) and is not "
                f"ignore_index={ignore_index}"
            )
        y = y.clone()
        y[rows] = ignore_index
        return y
    bad = ((y < 0) | (y >= v)) & (y != ignore_index)
    if validate and not torch.compiler.is_compiling():
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"label {int(y[i])} at row {i} is outside [0, {v}) and is not "
                f"ignore_index={ignore_index}"
            )
        return y
    # Unchecked (validate=False, or inside torch.compile where a check would be a host
    # sync): an out-of-range label must never reach a kernel as an address, so it is
    # treated as ignored (NaN label_logprob, never correct, not in the histogram).
    return torch.where(bad, torch.full_like(y, ignore_index), y)


def plain_labels(
    labels: torch.Tensor | None, n: int, v: int, ignore_index: int
) -> torch.Tensor | None | bool:
    """``labels`` when a kernel can read them as they are, with no tensor op: a plain int64
    ``[n]`` CPU tensor, stride 1, at most ``FEW_ROWS`` rows, all in ``[0, v)`` or
    ``ignore_index``. None for no labels; False for anything else, which
    :func:`check_labels` then converts, masks or refuses with its error."""
    if labels is None:
        return None
    if (
        type(labels) is not torch.Tensor
        or labels.dtype is not torch.int64
        or labels.dim() != 1
        or labels.shape[0] != n
        or n > FEW_ROWS
        or not labels.is_cpu
        or (n > 1 and labels.stride(0) != 1)
    ):
        return False
    for t in labels.tolist():  # check_labels' test, inline: this runs every decode step
        if (t < 0 or t >= v) and t != ignore_index:
            return False
    return labels


def check_histogram(histogram: torch.Tensor, labels: torch.Tensor | None,
                    device: torch.device) -> None:
    """A fused op's ``histogram=``: contiguous int64 ``[3, n_bins]`` on ``device``, and only
    with labels (a row's correctness is what it counts)."""
    if labels is None:
        raise ValueError("a histogram needs labels (correctness of each row)")
    if histogram.dtype != torch.int64 or histogram.dim() != 2 or histogram.shape[0] != 3:
        raise ValueError(
            f"histogram must be int64 [3, n_bins], got {histogram.dtype} {tuple(histogram.shape)}"
        )
    if histogram.device != device:
        raise ValueError(f"histogram is on {histogram.device} but the inputs are on {device}")
    if not histogram.is_contiguous():
        raise ValueError("histogram must be contiguous")
