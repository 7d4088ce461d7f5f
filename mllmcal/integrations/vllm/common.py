"""What the V1 and V2 processor classes share: settings from the engine, the writer rank,
request validation, and the tracker's start and shutdown."""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from .config import Config
from .token_logits import check_logits_args
from .tracker import Tracker

__all__ = ["ProcessorCore", "config_of", "log_conf", "scale_rows", "check_extra_args",
           "writer_rank"]


def config_of(vllm_config: Any) -> Config:
    """The environment's settings, overridden by ``additional_config={"mllmcal": {...}}``."""
    extra = getattr(vllm_config, "additional_config", None)
    overrides = extra.get("mllmcal") if isinstance(extra, dict) else None
    return Config.from_env(overrides)


def writer_rank() -> bool:
    """Whether this process writes records and metrics: with tensor parallelism every rank
    runs the sampler (and its processors) on the same logits, so only TP rank 0 of the last
    pipeline stage writes."""
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0 and get_pp_group().is_last_rank
    except Exception:  # no distributed state (hand-built tests, single process)
        return True


def check_extra_args(sampling_params: Any) -> None:
    """Reject a request whose ``extra_args`` give mllmcal options of the wrong type."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    rid = extra.get("mllmcal_id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise ValueError(f"extra_args['mllmcal_id'] must be a string or int, got {rid!r}")
    for key in ("mllmcal_logprobs", "mllmcal_feedback", "mllmcal_apply_temperature"):
        # Over HTTP, vllm_xargs turns JSON true/false into 1/0.
        if key in extra and extra[key] not in (True, False, 0, 1):
            raise ValueError(f"extra_args[{key!r}] must be true or false, got {extra[key]!r}")
    pos = extra.get("mllmcal_feedback_position", 0)
    if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
        raise ValueError(
            f"extra_args['mllmcal_feedback_position'] must be an int >= 0, got {pos!r}")
    check_logits_args(extra)


def scale_rows(logits: torch.Tensor, rows: list[int], t: float) -> None:
    """``logits[rows] /= t`` in place, after the statistics and any kept copies were taken.
    All rows: one op; some: one small op per row, so no ``[b, V]`` temporary."""
    if len(rows) == logits.shape[0]:
        logits.div_(t)
    else:
        for r in rows:
            logits[r].div_(t)


def log_conf(conf: float) -> float | None:
    """The argmax token's log-probability, ``log(confidence)`` (None for a zero)."""
    return math.log(conf) if conf > 0 else None


class ProcessorCore:
    """The runner-independent part of a processor class: its :class:`~.config.Config`, its
    tracker, and the hooks vLLM calls on the class.

    Attributes:
        runner: ``"v1"`` or ``"v2"``, the model-runner interface the class implements.
        config: the engine's settings.
        tracker: the runner's :class:`~.tracker.Tracker` (its drain thread starts here).
    """

    runner: str
    config: Config
    tracker: Tracker

    def _start(self, config: Config, tracker: Tracker) -> None:
        self.config, self.tracker = config, tracker
        if config.enabled:
            tracker.start()
        # Engine shutdown drops the processor: write whatever is still open then (and at
        # interpreter exit, for engines that are never garbage-collected).
        weakref.finalize(self, tracker.close)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_extra_args(sampling_params)

    def flush(self, *, end_active: bool = False) -> int:
        """Drain now (see :meth:`Tracker.flush`); returns the number of records written."""
        return self.tracker.flush(end_active=end_active)
