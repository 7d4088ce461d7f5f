"""The ``cpu`` and ``cuda`` backends: tensors turned into the raw pointers of ``mllmcal._C``
and ``mllmcal._C_cuda``.

Both extensions are torch-free (pointers, shapes, strides in elements, a dtype code from
:data:`~mllmcal._backends.registry.DTYPE_CODES`) and bind each op with the same arguments
then a tail of launch arguments of their own (``csrc/common/bindings.h``), so one class
marshals the common part and each backend adds its tail. Nothing here
re-checks what :mod:`mllmcal.ops` validated. Importing this module never imports an
extension; the registry imports it on first use and reports a failure as "unavailable".

CPU threads: the kernel uses ``torch.get_num_threads()`` threads (so
``torch.set_num_threads`` and ``OMP_NUM_THREADS`` govern it as they govern torch), or
``num_threads`` when given. The threads beyond the caller are helpers of a small pool
(``csrc/cpu/split_pool.h``) that sleep between calls; under its default wake policy
(:meth:`CpuBackend.pool_policy`) a call wakes them only when its work is worth more than
the measured cost of waking them (on a 2-vCPU VM, ~50 µs: more than a [1, 151936] row).
``MLLMCAL_CPU_POOL`` (``auto``, ``always``, ``never``) sets the policy when the backend
loads, e.g. in a serving engine's worker processes.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import launch
from .registry import DTYPE_CODES

__all__ = ["CompiledBackend", "CpuBackend", "CudaBackend", "cpu", "cuda"]

CPU_MODES = {"auto": 0, "rows": 1, "split": 2}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class CompiledBackend:
    """One pybind extension behind the backend contract (``token_stats_into``,
    ``temperature_fit_into``, see :mod:`mllmcal._contract`)."""

    extension = ""

    @functools.cached_property
    def ext(self) -> ModuleType:
        """The extension module (imported on first use; a plain attribute read after)."""
        return importlib.import_module(self.extension)

    def unavailable_reason(self) -> str | None:
        """None when the extension has every op, else why not. A failed import raises
        ``ImportError``, which the registry reports with what to build."""
        if not hasattr(self.ext, "temperature_fit"):
            return f"{self.extension} was built before temperature_fit existed; rebuild it"
        return None

    def token_stats_into(self, x, labels, temperature, temperature_rows, fstats, pred, flags,
                         scaled_out, hist, ignore_index, **knobs) -> None:
        """Fill ``fstats``/``pred``/``flags`` (and ``scaled_out``/``hist``) for ``x``
        ``[N, V]``, as :mod:`mllmcal._contract` says; ``knobs`` go to :meth:`_tail`."""
        n, v = x.shape
        self.ext.token_stats(
            x.data_ptr(), DTYPE_CODES[x.dtype], n, v, x.stride(0), _ptr(labels),
            int(ignore_index), float(temperature), _ptr(temperature_rows), fstats.data_ptr(),
            pred.data_ptr(), flags.data_ptr(), _ptr(scaled_out),
            0 if scaled_out is None else scaled_out.stride(0), _ptr(hist),
            0 if hist is None else hist.shape[1], *self._tail(x, n, v, **knobs),
        )

    def temperature_fit_into(self, x: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor,
                             out: torch.Tensor, status: torch.Tensor, ignore_index: int) -> None:
        """Per-row fit accumulators (see :func:`mllmcal.ops.temperature_fit_rows`): ``x``
        ``[N, V]``, ``labels`` int64 ``[N]``, ``betas`` fp32 ``[K]``, ``out`` fp32
        ``[N, 3, K]`` and ``status`` uint8 ``[N]``, contiguous, fully overwritten."""
        n, v = x.shape
        self.ext.temperature_fit(
            x.data_ptr(), DTYPE_CODES[x.dtype], n, v, x.stride(0), labels.data_ptr(),
            int(ignore_index), betas.data_ptr(), betas.numel(), out.data_ptr(),
            status.data_ptr(), *self._fit_tail(x),
        )

    def _tail(self, x: torch.Tensor, n: int, v: int, **knobs) -> tuple:
        raise NotImplementedError

    def _fit_tail(self, x: torch.Tensor) -> tuple:
        raise NotImplementedError


class CpuBackend(CompiledBackend):
    """``mllmcal._C``: the C++/OpenMP kernels (CPU tensors)."""

    extension = "mllmcal._C"

    def kernel_isa(self) -> str:
        """Instruction set the kernel was dispatched to here (``generic``/``avx2``/``avx512``)."""
        return self.ext.kernel_isa()

    def supported_isas(self) -> list[str]:
        """Kernel instruction sets this CPU can run."""
        return self.ext.supported_isas()

    def unavailable_reason(self) -> str | None:
        if not hasattr(self.ext, "pool_policy"):
            return f"{self.extension} was built before its thread pool's wake policy; rebuild it"
        policy = os.environ.get("MLLMCAL_CPU_POOL", "")
        if policy:  # for processes the user's code does not run in (serving engines)
            try:
                self.ext.pool_policy(policy)
            except ValueError as exc:
                return f"MLLMCAL_CPU_POOL: {exc}"
        return super().unavailable_reason()

    def pool_policy(self, policy: str = "") -> str:
        """Set the thread pool's wake policy for every later call, process-wide; return
        the one before. ``"auto"`` (default): wake the helpers only when the work left is
        worth more than the measured cost of waking them; ``"always"``: at the start of
        every call; ``"never"``: the caller runs everything. Results are the same under
        every policy (the work split is fixed by the thread count). ``""`` only reads it."""
        return self.ext.pool_policy(policy)

    def pool_stats(self, reset: bool = False, wake_cost_us: float = -1.0) -> dict[str, float]:
        """The pool's counters and estimates: ``calls`` (calls that could use helpers),
        ``woken`` (calls that woke them), ``helper_items`` (work items they ran),
        ``wake_cost_us`` and ``ns_per_element`` (-1 while unknown), as they were before
        this call. ``reset`` then zeroes and forgets them; ``wake_cost_us >= 0`` pins the
        wake-cost estimate (for tests)."""
        return self.ext.pool_stats(reset, wake_cost_us)

    def _tail(self, x: torch.Tensor, n: int, v: int, *, num_threads: int | None = None,
              mode: str = "auto", chunk_columns: int = 0, isa: str = "") -> tuple:
        """Knobs for tests and benchmarks: ``num_threads`` (default torch's), ``mode``
        ``"rows"`` (one thread per row) or ``"split"`` (vocabulary chunks merged per row),
        ``chunk_columns`` for ``"split"`` (0: automatic), ``isa`` to force one."""
        threads = torch.get_num_threads() if num_threads is None else int(num_threads)
        return threads, CPU_MODES[mode], int(chunk_columns), isa

    def _fit_tail(self, x: torch.Tensor) -> tuple:
        return (0,)  # OpenMP's default thread count

    def token_stats_at(self, x: torch.Tensor, labels: torch.Tensor | None, temperature: float,
                       ignore_index: int, fstats: int, pred: int, flags: int) -> None:
        """:meth:`token_stats_into` of the eager decode call (:func:`mllmcal.token_stats`
        without per-row temperatures, ``scaled_out`` or histogram; default threads and plan)
        with its three outputs given as addresses, so that they can share one allocation:
        fstats fp32 ``[7, N]``, pred int64 ``[N]`` (8-byte aligned) and flags uint8 ``[N]``."""
        n, v = x.shape
        self.ext.token_stats(
            x.data_ptr(), DTYPE_CODES[x.dtype], n, v, x.stride(0),
            0 if labels is None else labels.data_ptr(), ignore_index, temperature, 0, fstats,
            pred, flags, 0, 0, 0, 0, torch.get_num_threads(), CPU_MODES["auto"], 0, "",
        )


class CudaBackend(CompiledBackend):
    """``mllmcal._C_cuda``: the CUDA kernels (CUDA tensors), launched asynchronously on
    torch's current stream; nothing here synchronises.

    It owns the split path's workspace: a zeroed byte buffer per (device, stream), reused
    without a memset per call because the kernel returns its arrival counters to zero;
    calls on one stream are ordered, so they never share it concurrently. Inside CUDA-graph
    capture a buffer too small is not grown in the cache (its memory would belong to the
    graph's pool): the zeroing is captured with a fresh buffer instead. Warm up once
    before capturing to avoid that extra node.
    """

    extension = "mllmcal._C_cuda"

    def __init__(self) -> None:
        self._workspaces: dict[tuple[int, int], torch.Tensor] = {}
        # Outgrown workspaces stay alive: a captured CUDA graph may still point at them.
        self._retired: list[torch.Tensor] = []

    def unavailable_reason(self) -> str | None:
        why = super().unavailable_reason()
        if why is None and not torch.cuda.is_available():
            why = "mllmcal._C_cuda is built but torch sees no CUDA device"
        return why

    def token_stats_into(self, x, *args, **knobs) -> None:
        with torch.cuda.device(x.device):  # the launch uses the current device's context
            super().token_stats_into(x, *args, **knobs)

    def temperature_fit_into(self, x, *args) -> None:
        with torch.cuda.device(x.device):
            super().temperature_fit_into(x, *args)

    def _workspace(self, device: torch.device, stream: int, nbytes: int) -> torch.Tensor:
        key = (device.index, stream)
        buf = self._workspaces.get(key)
        if buf is not None and buf.numel() >= nbytes:
            return buf
        fresh = torch.zeros(max(nbytes, 4096), dtype=torch.uint8, device=device)
        if not torch.cuda.is_current_stream_capturing():
            if buf is not None:
                self._retired.append(buf)
            self._workspaces[key] = fresh
        return fresh

    def _tail(self, x: torch.Tensor, n: int, v: int) -> tuple:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        splits = launch.plan_splits(n, v, launch.sm_count(x.device),
                                    max_splits=self.ext.MAX_SPLITS)
        ws = 0
        if splits > 1:
            ws = self._workspace(x.device, stream, self.ext.workspace_bytes(n, splits)).data_ptr()
        return ws, splits, stream

    def _fit_tail(self, x: torch.Tensor) -> tuple:
        return (torch.cuda.current_stream(x.device).cuda_stream,)


cpu = CpuBackend()
cuda = CudaBackend()
