"""The ``cuda`` backend: launch helper for the kernels of ``mllmcal._C_cuda``.

The extension is torch-free (raw pointers, see ``csrc/cuda/token_stats.h``); this module
turns tensors into pointers, picks the launch shape, owns the split path's workspace and
passes torch's current stream. Importing it never fails: without the extension or without
a device, :func:`unavailable_reason` says which, and ``mllmcal.ops`` moves on.

Launch shape (the decision lives in :func:`plan_splits`):

* path A, ``splits == 1``: one 256-thread block per row. Chosen when the rows alone give
  every SM at least ``ROWS_PER_SM_FOR_PATH_A`` blocks.
* path B, ``splits > 1``: each row's vocabulary is cut into ``splits`` segments, one block
  each, and the row's last block to finish merges the partials (no second launch). A
  decode step at batch 1..8 reads only 0.25-2 MB, far too little to fill an H200 with one
  block per row.
"""

from __future__ import annotations

import functools
import importlib
import math
from types import ModuleType

import torch

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Tunables of the launch shape (bench/NOTES.md has the plan for measuring them).
ROWS_PER_SM_FOR_PATH_A = 2
BLOCKS_PER_SM_TARGET = 4  # resident 256-thread blocks per SM at <= 64 registers
MIN_SPLIT_ELEMENTS = 2048  # below this a block spends more time reducing than reading

# Tests set this to force a path (1 = path A, k > 1 = k splits); None plans by shape.
FORCE_SPLITS: int | None = None

_ext_cache: list[ModuleType | ImportError] = []
_workspaces: dict[tuple[int, int], torch.Tensor] = {}
# Outgrown workspaces stay alive: a captured CUDA graph may still point at them.
_retired: list[torch.Tensor] = []


def _ext() -> ModuleType:
    if not _ext_cache:
        try:
            _ext_cache.append(importlib.import_module("mllmcal._C_cuda"))
        except ImportError as exc:
            _ext_cache.append(exc)
    mod = _ext_cache[0]
    if isinstance(mod, ImportError):
        raise mod
    return mod


def unavailable_reason() -> str | None:
    """None when the extension imports and a CUDA device is visible, else why not."""
    try:
        _ext()
    except ImportError as exc:
        return (
            "mllmcal._C_cuda not built (it is built when nvcc is found at install time, "
            f"or with MLLMCAL_BUILD_CUDA=1): {exc}"
        )
    if not torch.cuda.is_available():
        return "mllmcal._C_cuda is built but torch sees no CUDA device"
    return None


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(n: int, v: int, sm_count: int, max_splits: int = 256) -> int:
    """Blocks per row: 1 (path A) when ``n`` rows fill the GPU, else enough segments to
    put ``BLOCKS_PER_SM_TARGET`` blocks on every SM, each at least ``MIN_SPLIT_ELEMENTS``
    long.

    >>> plan_splits(1024, 128256, 132), plan_splits(1, 128256, 132), plan_splits(8, 32000, 132)
    (1, 63, 16)
    """
    if FORCE_SPLITS is not None:
        return max(1, min(int(FORCE_SPLITS), max_splits))
    if n >= ROWS_PER_SM_FOR_PATH_A * sm_count:
        return 1
    want = math.ceil(BLOCKS_PER_SM_TARGET * sm_count / max(n, 1))
    fit = math.ceil(v / MIN_SPLIT_ELEMENTS)
    splits = min(want, fit, max_splits)
    return splits if splits >= 2 else 1


def _workspace(device: torch.device, stream: torch.cuda.Stream, nbytes: int) -> torch.Tensor:
    """A zeroed byte buffer of at least ``nbytes`` for the split path.

    The kernel returns its arrival counters to zero, so one buffer per (device, stream)
    is reused without a memset per call; calls on one stream are ordered, so they never
    share it concurrently. Inside CUDA-graph capture a buffer too small is not grown in
    the cache (its memory would belong to the graph's pool): the zeroing is captured with
    a fresh buffer instead. Warm up once before capturing to avoid that extra node.
    """
    key = (device.index, stream.cuda_stream)
    buf = _workspaces.get(key)
    if buf is not None and buf.numel() >= nbytes:
        return buf
    fresh = torch.zeros(max(nbytes, 4096), dtype=torch.uint8, device=device)
    if not torch.cuda.is_current_stream_capturing():
        if buf is not None:
            _retired.append(buf)
        _workspaces[key] = fresh
    return fresh


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
    """Fill ``fstats``/``pred``/``flags`` for CUDA ``x`` ``[N, V]`` (see ``_contract``).

    ``x`` is fp32, fp16 or bf16 with ``stride(1) == 1``; all tensors are on ``x``'s
    device. The launch is asynchronous on the current stream; nothing here syncs.
    """
    ext = _ext()
    n, v = x.shape
    if n == 0:
        return
    code = _DTYPE_CODES.get(x.dtype)
    if code is None:
        raise TypeError(f"the cuda backend reads fp32, fp16 or bf16, got {x.dtype}")
    device = x.device
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        splits = plan_splits(n, v, _sm_count(device.index), ext.MAX_SPLITS)
        ws = 0
        if splits > 1:
            ws = _workspace(device, stream, ext.workspace_bytes(n, splits)).data_ptr()
        ext.token_stats(
            x=x.data_ptr(), dtype=code, n=n, v=v, stride_x=x.stride(0),
            labels=0 if labels is None else labels.data_ptr(),
            ignore_index=int(ignore_index), temperature=float(temperature),
            temperature_rows=0 if temperature_rows is None else temperature_rows.data_ptr(),
            fstats=fstats.data_ptr(), pred=pred.data_ptr(), flags=flags.data_ptr(),
            scaled_out=0 if scaled_out is None else scaled_out.data_ptr(),
            stride_out=0 if scaled_out is None else scaled_out.stride(0),
            hist=0 if hist is None else hist.data_ptr(),
            n_bins=0 if hist is None else hist.shape[1],
            workspace=ws, splits=splits, stream=stream.cuda_stream,
        )
