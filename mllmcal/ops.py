"""Public fused ops and backend dispatch.

``token_stats`` reads a ``[..., V]`` logits tensor once and returns per-row confidence
statistics (see DESIGN.md for the exact semantics). Backends:

* ``"triton"`` -- Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``"cuda"``   -- the CUDA kernels of ``mllmcal._C_cuda`` (CUDA tensors).
* ``"cpu"``    -- the C++/OpenMP kernel of ``mllmcal._C`` (CPU tensors).
* ``"torch"``  -- a chunked fp32 composite (any device; the only one that takes fp64).
* ``"auto"``   -- the fastest available for the device; ``MLLMCAL_BACKEND`` overrides it.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from dataclasses import dataclass, fields
from types import ModuleType

import torch

from . import _contract as C

__all__ = ["TokenStats", "token_stats", "available_backends", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_log = logging.getLogger("mllmcal")


@dataclass
class TokenStats:
    """Per-row statistics of ``logits / T``; each field has the logits' leading shape.

    Float fields are fp32; ``prediction`` is int64 (-1 on invalid rows); ``valid`` and
    ``correct`` are bool. ``label_logprob``, ``correct`` and ``brier`` are None unless
    labels were given. ``logit_mean``/``logit_var`` are ``E_p[z]``/``Var_p[z]`` of the
    scaled logits ``z`` (what temperature fitting needs).
    """

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
    backend: str = "torch"

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }


# --------------------------------------------------------------------------- backends

_BACKEND_MODULES = {
    "torch": "mllmcal._torch_backend",
    "cpu": "mllmcal._cpp",
    "cuda": "mllmcal._cuda",
    "triton": "mllmcal.kernels.token_stats",
}
_loaded: dict[str, ModuleType | Exception] = {}


def _load(name: str) -> ModuleType | Exception:
    """Import a backend module once; remember the failure instead of raising."""
    if name not in _loaded:
        try:
            mod = importlib.import_module(_BACKEND_MODULES[name])
            why = getattr(mod, "unavailable_reason", lambda: None)()
            _loaded[name] = RuntimeError(why) if why else mod
        except Exception as exc:  # a missing .so or Triton degrades, never breaks import
            _loaded[name] = exc
            _log.info("mllmcal backend %r unavailable: %s", name, exc)
    return _loaded[name]


def _device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None if it can)."""
    if name == "torch":
        return None
    if name == "cpu" and device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got a tensor on {device}"
    if name == "cuda" and device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got a tensor on {device}"
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            f"backend 'triton' needs CUDA tensors (got {device}); on the CPU it runs only "
            "under TRITON_INTERPRET=1 set before mllmcal is imported"
        )
    mod = _load(name)
    if isinstance(mod, Exception):
        missing = {
            "cpu": "the compiled extension mllmcal._C (rebuild with "
            "`pip install --no-build-isolation -e .`)",
            "cuda": "the compiled extension mllmcal._C_cuda (built only where nvcc is found, "
            "or with MLLMCAL_BUILD_CUDA=1)",
            "triton": "the `triton` package",
        }[name]
        return f"backend {name!r} is unavailable: missing {missing}: {mod}"
    return None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return [b for b in BACKENDS[1:] if _device_reason(b, device) is None]


def _auto_order(device: torch.device, n: int, v: int, dtype: torch.dtype) -> tuple[str, ...]:
    if device.type == "cuda":
        # Triton vs CUDA per shape, from the table a GPU benchmark run wrote.
        from ._autotune import preferred_cuda_backend

        first = preferred_cuda_backend(n, v, dtype, _device_name(device))
        return (first, "cuda" if first == "triton" else "triton", "torch")
    if device.type == "cpu":
        return ("cpu", "torch")
    return ("torch",)


_device_names: dict[torch.device, str] = {}


def _device_name(device: torch.device) -> str:
    if device not in _device_names:
        _device_names[device] = torch.cuda.get_device_name(device)
    return _device_names[device]


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype, n: int = 1, v: int = 1
) -> str:
    """Turn a requested backend into the one that will run; raise if it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("MLLMCAL_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(
                f"MLLMCAL_BACKEND must be one of {BACKENDS}, got {os.environ['MLLMCAL_BACKEND']!r}"
            )
    if dtype == torch.float64:
        return "torch"  # fp64 is the oracle's precision; only the composite takes it
    if backend == "auto":
        for b in _auto_order(device, n, v, dtype):
            if _device_reason(b, device) is None:
                return b
        return "torch"
    why = _device_reason(backend, device)
    if why is not None:
        raise RuntimeError(why)
    return backend


# --------------------------------------------------------------------------- validation


def _check_temperature(
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
            t = temperature.reshape(n).to(torch.float32).contiguous()
            if validate and n and not bool(((t > 0) & torch.isfinite(t)).all()):
                raise ValueError("every temperature must be finite and > 0")
            return 1.0, t
    return check_scalar_temperature(temperature), None


def check_scalar_temperature(temperature: float) -> float:
    """``float(temperature)``, or a clear error unless it is finite and > 0."""
    try:
        t = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(
            f"temperature must be a float or a tensor, got {type(temperature).__name__}"
        ) from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be finite and > 0, got {t}")
    return t


def _check_labels(
    labels: torch.Tensor | None, n: int, v: int, device: torch.device, ignore_index: int,
    validate: bool,
) -> torch.Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() != n:
        raise ValueError(
            f"labels must have one entry per row of logits ({n}), got shape {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels are on {labels.device} but logits are on {device}")
    y = labels.reshape(n).to(torch.int64).contiguous()
    if validate and n:
        bad = ((y < 0) | (y >= v)) & (y != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"label {int(y[i])} at row {i} is outside [0, {v}) and is not "
                f"ignore_index={ignore_index}"
            )
    return y


def token_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    backend: str = "auto",
    *,
    ignore_index: int = C.IGNORE_INDEX,
    scaled_out: torch.Tensor | None = None,
    histogram: torch.Tensor | None = None,
    validate: bool = True,
) -> TokenStats:
    """Per-token confidence statistics of ``logits / temperature`` in one pass.

    Args:
        logits: ``[..., V]`` fp32, fp16 or bf16 (fp64 goes to the torch backend); any
            device; the last dim must have stride 1 for the fast kernels (otherwise a
            contiguous copy is made). Leading dims are flattened to N rows.
        labels: optional integer ``[...]`` (the leading shape), values in ``[0, V)`` or
            ``ignore_index``.
        temperature: a float > 0 or a float tensor with one entry per row.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"torch"``.
        ignore_index: label value that marks a row without a label.
        scaled_out: optional tensor shaped like ``logits`` (same dtype) that receives
            ``logits / temperature`` in the same pass; it may be ``logits`` itself.
        histogram: optional int64 ``[3, n_bins]`` tensor on the logits' device; rows that
            are valid and labelled are *added* to it (count, Σ confidence in units of
            2**-32, Σ correct). Needs ``labels``.
        validate: check label range and per-row temperatures (a host sync on GPU). The
            decode loop passes False.

    Returns:
        :class:`TokenStats` with fp32 fields shaped like ``logits.shape[:-1]``.

    Example:
        >>> import torch, mllmcal
        >>> s = mllmcal.token_stats(torch.tensor([[2.0, 0.0, 0.0]]), labels=torch.tensor([0]))
        >>> round(float(s.confidence[0]), 4), bool(s.correct[0])
        (0.7870, True)
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    if logits.dim() == 0:
        raise ValueError("logits must have at least one dimension (the vocabulary)")
    lead = tuple(logits.shape[:-1])
    v = logits.shape[-1]
    if v == 0:
        raise ValueError("logits have an empty vocabulary dimension (V = 0)")
    x = logits if logits.dim() == 2 else logits.reshape(-1, v)
    if x.stride(1) != 1:
        x = x.contiguous()
    n = x.shape[0]
    device = x.device
    t_scalar, t_rows = _check_temperature(temperature, n, device, validate)
    y = _check_labels(labels, n, v, device, ignore_index, validate)
    if histogram is not None:
        if y is None:
            raise ValueError("a histogram needs labels (correctness of each row)")
        if histogram.dtype != torch.int64 or histogram.dim() != 2 or histogram.shape[0] != 3:
            raise ValueError(
                f"histogram must be int64 [3, n_bins], got {histogram.dtype} {tuple(histogram.shape)}"
            )
        if histogram.device != device:
            raise ValueError(f"histogram is on {histogram.device} but logits are on {device}")
        if not histogram.is_contiguous():
            raise ValueError("histogram must be contiguous")
    out2d = None
    if scaled_out is not None:
        if scaled_out.shape != logits.shape:
            raise ValueError(
                f"scaled_out has shape {tuple(scaled_out.shape)}, logits {tuple(logits.shape)}"
            )
        if scaled_out.dtype != logits.dtype or scaled_out.device != device:
            raise ValueError("scaled_out must have the dtype and device of logits")
        out2d = scaled_out.reshape(-1, v) if n else scaled_out.reshape(0, v)
        if out2d.stride(1) != 1 or out2d.data_ptr() != scaled_out.data_ptr():
            raise ValueError("scaled_out must have a stride-1 last dimension and be viewable as [N, V]")

    name = resolve_backend(backend, device, x.dtype, n, v)
    fstats = torch.empty((C.N_FSTATS, n), dtype=torch.float32, device=device)
    pred = torch.empty(n, dtype=torch.int64, device=device)
    flags = torch.empty(n, dtype=torch.uint8, device=device)
    if n:
        mod = _load(name)
        assert not isinstance(mod, Exception)
        mod.token_stats_into(
            x, y, t_scalar, t_rows, fstats, pred, flags, out2d, histogram, ignore_index
        )

    flat = len(lead) == 1  # the decode loop's case: skip the reshapes (host overhead)

    def shaped(t: torch.Tensor) -> torch.Tensor:
        return t if flat else t.reshape(lead)

    valid = shaped((flags & C.FLAG_VALID) != 0)
    res = TokenStats(
        logsumexp=shaped(fstats[C.LSE]),
        confidence=shaped(fstats[C.CONF]),
        prediction=shaped(pred),
        entropy=shaped(fstats[C.ENT]),
        valid=valid,
        logit_mean=shaped(fstats[C.MEAN]),
        logit_var=shaped(fstats[C.VAR]),
        backend=name,
    )
    if y is not None:
        res.label_logprob = shaped(fstats[C.LABEL_LOGPROB])
        res.brier = shaped(fstats[C.BRIER])
        res.correct = shaped((flags & C.FLAG_CORRECT) != 0)
    return res
