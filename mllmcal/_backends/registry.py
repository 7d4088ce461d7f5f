"""Which backend serves which fused op on which device: one table, one loader, one resolver.

Every fused op (:func:`mllmcal.token_stats` and the histogram add it does in the same pass,
:func:`mllmcal.ops.temperature_fit_rows`) asks :func:`resolve` which backend runs it, with
one policy for all of them:

* an explicit ``backend=`` argument that cannot run here is a ``RuntimeError`` that names
  what is missing (a device, a compiled extension, Triton);
* ``"auto"`` walks :data:`AUTO_ORDER` for the tensor's device type and takes the first
  backend that can run;
* the environment variable ``MLLMCAL_BACKEND`` replaces ``"auto"`` (never an explicit
  argument) process-wide; where the backend it names cannot serve a tensor (``cpu`` for a
  CUDA tensor, ``triton`` without Triton...), ``"auto"`` serves it instead and a
  ``RuntimeWarning`` says so once per (backend, device type);
* fp64 logits go to ``torch``, the composite, whatever was asked: the compiled kernels
  read fp32, fp16 and bf16 only.

CUDA tensors: Triton first, then CUDA. Nobody has measured the two against each other yet
(``mllmcal/_autotune.json`` ships empty; ``bench/NOTES.md`` has the plan), so the order is
a choice, not a measurement: Triton comes with torch's CUDA wheels and so runs wherever a
CUDA tensor exists, while ``mllmcal._C_cuda`` exists only where nvcc was found at install
time. Once a GPU run writes the table (``python bench/bench_gpu.py --write-autotune``),
``"auto"`` takes the faster of the two per shape from it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._autotune import has_measurements, preferred_cuda_backend

__all__ = [
    "AUTO_ORDER", "BACKENDS", "DTYPE_CODES", "OPS", "REGISTRY", "Backend", "available",
    "load", "resolve", "unavailable_reason",
]

_log = logging.getLogger("mllmcal")

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
OPS = ("token_stats", "temperature_fit")
ANY_DEVICE = "*"
# dtype codes of the compiled kernels (csrc/*/bindings: 0 fp32, 1 fp16, 2 bf16); fp64 has
# none, it is the composite's alone.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(frozen=True)
class Backend:
    """One backend: where it runs and where its code lives.

    ``module`` is ``"package.module"`` or ``"package.module:attribute"``; the object it
    names provides ``<op>_into`` for every op in ``ops`` and may provide
    ``unavailable_reason() -> str | None``. ``missing`` says what to install or build when
    that import fails.
    """

    name: str
    devices: tuple[str, ...]
    module: str
    ops: tuple[str, ...]
    missing: str = ""


REGISTRY: dict[str, Backend] = {
    "triton": Backend("triton", ("cuda",), "mllmcal.kernels.backend", OPS,
                      "the `triton` package"),
    "cuda": Backend("cuda", ("cuda",), "mllmcal._backends.compiled:cuda", OPS,
                    "the compiled extension mllmcal._C_cuda (built only where nvcc is found, "
                    "or with MLLMCAL_BUILD_CUDA=1)"),
    "cpu": Backend("cpu", ("cpu",), "mllmcal._backends.compiled:cpu", OPS,
                   "the compiled extension mllmcal._C (rebuild with "
                   "`pip install --no-build-isolation -e .`)"),
    "torch": Backend("torch", (ANY_DEVICE,), "mllmcal._backends.composite", OPS),
}

# "auto", per device type; "torch" ends every list, so something always runs.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

# The one lazy loader's memory: the backend object, or the one reason it is unavailable.
_loaded: dict[str, Any] = {}
_env_warned: set[tuple[str, str]] = set()


def load(name: str) -> Any:
    """The object behind backend ``name`` (imported once), or ``RuntimeError`` saying why not."""
    got = _loaded.get(name)
    if got is None:
        got = _loaded[name] = _import(REGISTRY[name])
    if isinstance(got, str):
        raise RuntimeError(f"backend {name!r} is unavailable: {got}")
    return got


def _import(b: Backend) -> Any:
    """Import ``b.module`` and return it, or a string saying why it cannot run here."""
    path, _, attr = b.module.partition(":")
    try:
        obj = importlib.import_module(path)
        obj = getattr(obj, attr) if attr else obj
        why = getattr(obj, "unavailable_reason", lambda: None)()
    except Exception as exc:  # a missing .so or Triton degrades, never breaks import
        why = f"missing {b.missing}: {exc}" if b.missing else str(exc)
    if why:
        _log.info("mllmcal backend %r unavailable: %s", b.name, why)
        return why
    return obj


def unavailable_reason(
    backend: str, device: torch.device | str = "cpu", op: str = "token_stats"
) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device`` in this process; None when it can.

    ``backend`` is a concrete name (not ``"auto"``); ``device`` a ``torch.device`` or its
    string. This is the public way to ask (``mllmcal bench`` and the tests use it).
    """
    b = REGISTRY.get(backend)
    if b is None:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    return _reason(b, torch.device(device), op)


def _reason(b: Backend, device: torch.device, op: str) -> str | None:
    # The resolver's per-call check: a few dict and attribute reads, no allocation.
    if op not in b.ops:
        return f"backend {b.name!r} does not implement {op}"
    if ANY_DEVICE not in b.devices and device.type not in b.devices:
        # Triton's interpreter runs the kernels on CPU tensors, for tests without a GPU.
        if b.name != "triton":
            return f"backend {b.name!r} needs {b.devices[0].upper()} tensors, got a tensor on {device}"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return (
                f"backend 'triton' needs CUDA tensors (got {device}); on the CPU it runs "
                "only under TRITON_INTERPRET=1 set before mllmcal is imported"
            )
    got = _loaded.get(b.name)
    if got is None:
        got = _loaded[b.name] = _import(b)
    if isinstance(got, str):
        return f"backend {b.name!r} is unavailable: {got}"
    return None


def available(device: torch.device | str = "cpu", op: str = "token_stats") -> list[str]:
    """Names of the backends that can run ``op`` on ``device`` in this process."""
    return [b for b in BACKENDS[1:] if unavailable_reason(b, device, op) is None]


def _auto_order(device: torch.device, n: int, v: int, dtype: torch.dtype) -> tuple[str, ...]:
    order = AUTO_ORDER.get(device.type, ("torch",))
    if device.type == "cuda" and has_measurements():
        first = preferred_cuda_backend(n, v, dtype, _device_name(device))
        order = (first, "cuda" if first == "triton" else "triton", "torch")
    return order


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


# resolve()'s answers for CPU tensors, keyed by what they depend on there: the op, the
# backend asked for, MLLMCAL_BACKEND's raw value (read on every call, so a change is seen
# at once) and the dtype. On the CPU nothing else enters: "auto" does not depend on the
# shape, and the CPU backends' availability is settled by their first import. Triton
# (which on the CPU depends on TRITON_INTERPRET) and answers that warned are not kept.
_cpu_answers: dict[tuple[str, str, object, torch.dtype], str] = {}
_ENV = "MLLMCAL_BACKEND"
_ENV_KEY = os.environ.encodekey(_ENV) if hasattr(os.environ, "encodekey") else _ENV


def resolve(
    op: str, backend: str, device: torch.device, dtype: torch.dtype, n: int = 1, v: int = 1
) -> str:
    """The concrete backend that runs ``op`` for an ``[n, v]`` tensor of ``dtype`` on
    ``device`` when ``backend`` was asked for (policy in the module docstring).

    Raises ``ValueError`` for an unknown name (argument or ``MLLMCAL_BACKEND``) and
    ``RuntimeError`` for an explicit backend that cannot run.
    """
    raw = None
    if backend == "auto":
        # MLLMCAL_BACKEND as stored: one dict read in CPython's store behind os.environ
        # (always current), where os.environ.get costs a few frames and, when unset, two
        # exceptions.
        env_store = getattr(os.environ, "_data", None)
        raw = os.environ.get(_ENV) if env_store is None else env_store.get(_ENV_KEY)
    cpu = device.type == "cpu"
    if cpu:
        got = _cpu_answers.get((op, backend, raw, dtype))
        if got is not None:
            return got
    env = None if raw is None else os.environ.get(_ENV)
    name, keep = _resolve(op, backend, env, device, dtype, n, v)
    if cpu and keep:
        _cpu_answers[(op, backend, raw, dtype)] = name
    return name


def _resolve(
    op: str, backend: str, env: str | None, device: torch.device, dtype: torch.dtype,
    n: int, v: int,
) -> tuple[str, bool]:
    """:func:`resolve`'s answer, and whether it may be kept in ``_cpu_answers``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from_env = False
    if backend == "auto":
        backend = (env or "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"MLLMCAL_BACKEND must be one of {BACKENDS}, got {env!r}")
        from_env = backend != "auto"
    if dtype not in DTYPE_CODES:
        return "torch", True  # fp64 is the oracle's precision; only the composite reads it
    keep = backend != "triton"
    if backend != "auto":
        why = _reason(REGISTRY[backend], device, op)
        if why is None:
            return backend, keep
        if not from_env:
            raise RuntimeError(why)
        keep = False
        key = (backend, device.type)
        if key not in _env_warned:
            _env_warned.add(key)
            warnings.warn(
                f"MLLMCAL_BACKEND={backend!r} cannot serve this tensor ({why}); using the "
                "automatic choice for it instead",
                RuntimeWarning,
                stacklevel=4,
            )
    for b in _auto_order(device, n, v, dtype):
        if _reason(REGISTRY[b], device, op) is None:
            return b, keep
    return "torch", keep
