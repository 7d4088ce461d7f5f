"""What the V1 and V2 processor classes share: settings from the engine, the writer rank,
request validation, and the tracker's start and shutdown."""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import torch

from .config import Config, env_flag
from .token_logits import check_logits_args
from .tracker import Tracker

__all__ = ["ProcessorCore", "config_of", "scale_rows", "check_extra_args",
           "requested", "writer_rank"]

_log = logging.getLogger("mllmcal")


def config_of(vllm_config: Any) -> Config:
    """The environment's settings, overridden by ``additional_config={"mllmcal": {...}}``.
    ``enabled`` is False unless the operator asked for mllmcal (see :func:`requested`)."""
    extra = getattr(vllm_config, "additional_config", None)
    overrides = extra.get("mllmcal") if isinstance(extra, dict) else None
    cfg = Config.from_env(overrides)
    cfg.enabled = cfg.enabled and requested(vllm_config)
    return cfg


def _names_mllmcal(proc: Any) -> bool:
    if isinstance(proc, str):
        return proc.split(":", 1)[0].startswith("mllmcal.")
    return getattr(proc, "__module__", "").startswith("mllmcal.")


def requested(vllm_config: Any) -> bool:
    """Whether this engine's operator asked for mllmcal, rather than vLLM having loaded it
    through the entry point (which reaches every engine in the environment).

    Asked means any of: ``MLLMCAL_VLLM=1`` in the engine's environment; an ``"mllmcal"``
    key in ``additional_config``; one of mllmcal's processors named in the engine's
    ``logits_processors`` (``LLM(logits_processors=[...])``, ``--logits-processors``).
    ``MLLMCAL_VLLM=0`` turns it off whatever else says (as ``MLLMCAL_VLLM_DISABLE=1``).
    """
    env = env_flag("MLLMCAL_VLLM", None)
    if env is not None:
        return env
    extra = getattr(vllm_config, "additional_config", None)
    if isinstance(extra, dict) and "mllmcal" in extra:
        return True
    named = getattr(getattr(vllm_config, "model_config", None), "logits_processors", None)
    return any(_names_mllmcal(p) for p in (named or ()))


# The active processor of each engine, found by the engine's config object: vLLM builds
# every processor of an engine in one call with the same ``vllm_config``, so a class
# loaded twice (entry point and name) gives two instances with the same config.
_active_lock = threading.Lock()
_active: list[weakref.ref] = []
_warned_duplicate = False


def _claim(proc: ProcessorCore, vllm_config: Any) -> bool:
    """Make ``proc`` its engine's active processor; False if the engine has one already."""
    global _warned_duplicate
    with _active_lock:
        _active[:] = [r for r in _active if r() is not None]
        if any(r()._engine_config is vllm_config for r in _active):
            if not _warned_duplicate:
                _warned_duplicate = True
                _log.warning(
                    "mllmcal: vLLM loaded mllmcal's logits processor more than once in one "
                    "engine (its entry point and a logits_processors name, say); only the "
                    "first instance records, the others do nothing. Said once.")
            return False
        _active.append(weakref.ref(proc))
        return True


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
    key = extra.get("mllmcal_key")
    if key is not None and not isinstance(key, str):
        raise ValueError(f"extra_args['mllmcal_key'] must be a string, got {key!r}")
    for key in ("mllmcal", "mllmcal_logprobs", "mllmcal_feedback", "mllmcal_apply_temperature"):
        # Over HTTP, vllm_xargs turns JSON true/false into 1/0.
        if key in extra and extra[key] not in (True, False, 0, 1):
            raise ValueError(f"extra_args[{key!r}] must be true or false, got {extra[key]!r}")
    below = extra.get("mllmcal_stop_below")
    if below is not None and (isinstance(below, bool) or not isinstance(below, (int, float))):
        raise ValueError(f"extra_args['mllmcal_stop_below'] must be a number, got {below!r}")
    window = extra.get("mllmcal_stop_window", 16)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"extra_args['mllmcal_stop_window'] must be an int >= 1, got {window!r}")
    if below is not None and getattr(sampling_params, "ignore_eos", False) and not (
            getattr(sampling_params, "stop_token_ids", None)):
        raise ValueError("extra_args['mllmcal_stop_below'] needs a stop token: with "
                         "ignore_eos, give stop_token_ids")
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


class ProcessorCore:
    """The runner-independent part of a processor class: its :class:`~.config.Config`, its
    tracker, and the hooks vLLM calls on the class. A processor observes (the logits it
    returns are the ones it got), except for requests that ask it to apply the calibration
    temperature to sampling. See :mod:`mllmcal.integrations.vllm`.

    Attributes:
        runner: ``"v1"`` or ``"v2"``, the model-runner interface the class implements.
        config: the engine's settings.
        active: whether this instance records: mllmcal was asked for (``config.enabled``)
            and no other instance is active in the engine. An inactive one does nothing.
        tracker: the runner's :class:`~.tracker.Tracker` (its drain thread starts here);
            None when inactive.
        per_step: names of the runner's methods an active instance takes from its
            tracker.
    """

    runner: str
    config: Config
    active: bool
    tracker: Tracker | None
    # vLLM calls these every step (or every new request): bound straight to the tracker's,
    # the engine thread pays no forwarding frame; the class's own serve an inactive one.
    per_step: tuple[str, ...] = ()

    def _start(self, vllm_config: Any, make_tracker: Any) -> None:
        """Read the settings; if mllmcal was asked for and the engine has no active
        instance yet, build the tracker with ``make_tracker(config)`` and start it."""
        self.config = config_of(vllm_config)
        self._engine_config = vllm_config
        self.active = self.config.enabled and _claim(self, vllm_config)
        self.tracker = None
        if not self.active:
            return
        tracker = self.tracker = make_tracker(self.config)
        # Bound straight to the tracker's, unless a subclass overrides the method (it then
        # runs, and its super() call forwards to the tracker through the class's method).
        owner = next(c for c in type(self).__mro__ if "per_step" in c.__dict__)
        for name in self.per_step:
            if getattr(type(self), name) is getattr(owner, name):
                setattr(self, name, getattr(tracker, name))
        tracker.start()
        # Engine shutdown drops the processor: write whatever is still open then (and at
        # interpreter exit, for engines that are never garbage-collected).
        weakref.finalize(self, tracker.close)

    validate_params = staticmethod(check_extra_args)

    def apply(self, logits: torch.Tensor, *ctx: Any) -> torch.Tensor:
        """The runner's ``apply``: ``[B, V]`` ``logits`` untouched, observed by the tracker
        when active (an active instance calls the tracker's directly, see :attr:`per_step`;
        this forwarding serves a subclass's ``super().apply``)."""
        return logits if self.tracker is None else self.tracker.apply(logits, *ctx)

    def flush(self, *, end_active: bool = False) -> int:
        """Drain now (see :meth:`Tracker.flush`); returns the number of records written."""
        return self.tracker.flush(end_active=end_active) if self.tracker is not None else 0
