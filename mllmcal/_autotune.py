"""Measured choice between the ``triton`` and ``cuda`` backends for ``backend="auto"``.

``_autotune.json`` (next to this file) is written from a GPU benchmark run by
``bench/bench_gpu.py --write-autotune``: for each measured (dtype, batch, vocab)
it names the faster of the two. A shape that was not measured takes the choice of the
nearest measured one of the same dtype (distance in log batch and log vocab), since the
winner depends on which launch path a shape lands in and that varies smoothly. An empty
table (as shipped today, :mod:`mllmcal._backends.registry` says why), or a table measured
on another GPU model, gives ``DEFAULT``.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("_autotune.json")
DEFAULT = "triton"
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@functools.cache
def _table(path: str = str(TABLE_PATH)) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {"device": None, "entries": []}


def has_measurements() -> bool:
    """Whether the table holds any measured entry (the registry skips the lookup if not)."""
    return bool(_table().get("entries"))


def preferred_cuda_backend(
    n: int, v: int, dtype: torch.dtype, device_name: str | None = None
) -> str:
    """``"triton"`` or ``"cuda"``: the faster backend measured nearest to ``[n, v]``.

    Args:
        n: rows (batch x positions); v: vocabulary size; dtype: the logits' dtype (fp16
            uses the bf16 measurements: same bytes, same code path).
        device_name: ``torch.cuda.get_device_name()``; entries measured on another device
            are ignored. None skips the check.
    """
    table = _table()
    if device_name is not None and table.get("device") not in (None, device_name):
        return DEFAULT
    name = _DTYPE_NAMES.get(dtype, "fp32")
    if name == "fp16":
        name = "bf16"
    entries = [e for e in table.get("entries", []) if e.get("dtype") == name]
    if not entries:
        return DEFAULT

    def dist(e: dict) -> float:
        return math.hypot(math.log(max(n, 1) / e["batch"]), math.log(max(v, 1) / e["vocab"]))

    return min(entries, key=dist)["backend"]
