"""The launch-shape plan shared by the CUDA and Triton token-statistics launchers.

Both kernels have two paths for an ``[N, V]`` input:

* **rows** (``splits == 1``): one block/program per row, a single pass, no merge. Chosen
  when the rows alone give every SM at least ``ROWS_PER_SM_FOR_PATH_A`` blocks.
* **split** (``splits > 1``): each row's vocabulary is cut into ``splits`` segments, one
  block/program each, and the partial online-softmax states are merged per row (the CUDA
  kernel merges in the row's last block to finish; Triton runs a second, small kernel). A
  decode step at batch 1..8 reads only 0.25-2 MB, far too little to fill an H200 with one
  block per row.

:func:`plan_splits` decides; the two launchers differ only in the shortest segment they
accept (a CUDA block's ``MIN_SPLIT_ELEMENTS``, one Triton ``BLOCK_V`` chunk) and in how
many segments their merge can take. The tunables are unmeasured starting points
(``bench/NOTES.md`` has the plan for measuring them).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BLOCKS_PER_SM_TARGET", "DEFAULT_SM_COUNT", "FORCE_SPLITS", "MIN_SPLIT_ELEMENTS",
    "ROWS_PER_SM_FOR_PATH_A", "plan_splits", "sm_count",
]

ROWS_PER_SM_FOR_PATH_A = 2
BLOCKS_PER_SM_TARGET = 4  # resident 256-thread blocks per SM at <= 64 registers
MIN_SPLIT_ELEMENTS = 2048  # below this a CUDA block spends more time reducing than reading
# SM count assumed without a GPU (Triton's interpreter; H100/H200 SXM): steers the path only.
DEFAULT_SM_COUNT = 132

# Tests set this to force a path in both launchers (1 = rows, k > 1 = k splits); None
# plans by shape.
FORCE_SPLITS: int | None = None

_sm_counts: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA ``device`` (cached), ``DEFAULT_SM_COUNT`` elsewhere."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def plan_splits(
    n: int, v: int, sm_count: int, min_split: int = MIN_SPLIT_ELEMENTS, max_splits: int = 256
) -> int:
    """Segments per row: 1 (rows path) when ``n`` rows fill the GPU, else enough segments to
    put ``BLOCKS_PER_SM_TARGET`` blocks on every SM, each at least ``min_split`` columns,
    at most ``max_splits``.

    >>> plan_splits(1024, 128256, 132), plan_splits(1, 128256, 132), plan_splits(8, 32000, 132)
    (1, 63, 16)
    """
    if FORCE_SPLITS is not None:
        return max(1, min(int(FORCE_SPLITS), max_splits))
    if n >= ROWS_PER_SM_FOR_PATH_A * sm_count:
        return 1
    want = math.ceil(BLOCKS_PER_SM_TARGET * sm_count / max(n, 1))
    splits = min(want, math.ceil(v / min_split), max_splits)
    return splits if splits >= 2 else 1
