"""Settings of the vLLM processors of one engine: environment, then ``additional_config``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...ops import check_scalar_temperature

__all__ = ["Config", "env_flag"]


def env_flag(name: str, default: bool | None) -> bool | None:
    """The on/off environment variable ``name`` (``1/true/yes/on``, ``0/false/no/off``,
    any case); ``default`` where it is unset or blank. Anything else raises ValueError."""
    v = os.environ.get(name, "").strip().lower()
    if not v:
        return default
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0/1/true/false, got {os.environ[name]!r}")


@dataclass
class Config:
    """Settings of the processors in one engine.

    Read from the environment of the engine's worker process (``MLLMCAL_VLLM_*``), then
    overridden by ``additional_config={"mllmcal": {...}}`` of the vLLM engine (keys are the
    field names below). See the package docstring for each one.
    """

    records: str | None = None
    temperature: float = 1.0
    online_temperature: bool = False
    feedback: str | None = None
    n_bins: int = 15
    metrics: bool = True
    flush_interval: float = 0.5
    enabled: bool = True
    max_awaiting_feedback: int = 1000
    detach_timeout: float = 60.0
    apply_temperature: bool = False

    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None) -> Config:
        env = os.environ
        cfg = cls(
            records=env.get("MLLMCAL_VLLM_RECORDS") or None,
            temperature=float(env.get("MLLMCAL_VLLM_TEMPERATURE", "1.0")),
            online_temperature=env_flag("MLLMCAL_VLLM_ONLINE_TEMPERATURE", False),
            feedback=env.get("MLLMCAL_VLLM_FEEDBACK") or None,
            n_bins=int(env.get("MLLMCAL_VLLM_N_BINS", "15")),
            metrics=env_flag("MLLMCAL_VLLM_METRICS", True),
            flush_interval=float(env.get("MLLMCAL_VLLM_FLUSH_INTERVAL", "0.5")),
            enabled=not env_flag("MLLMCAL_VLLM_DISABLE", False),
            detach_timeout=float(env.get("MLLMCAL_VLLM_DETACH_TIMEOUT", "60")),
            apply_temperature=env_flag("MLLMCAL_VLLM_APPLY_TEMPERATURE", False),
        )
        if overrides:
            unknown = set(overrides) - set(cls.__dataclass_fields__)
            if unknown:
                raise ValueError(
                    f"unknown mllmcal settings {sorted(unknown)} in additional_config; "
                    f"known: {sorted(cls.__dataclass_fields__)}"
                )
            for k, v in overrides.items():
                setattr(cfg, k, v)
        cfg.temperature = check_scalar_temperature(cfg.temperature)
        if not cfg.flush_interval > 0:
            raise ValueError(f"flush_interval must be > 0 seconds, got {cfg.flush_interval}")
        return cfg
