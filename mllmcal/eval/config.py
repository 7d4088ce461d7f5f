"""What ``mllmcal eval`` is asked to do: :class:`EvalConfig`, the models' specs, the
protocol presets and the temperature-fit methods (with their accumulators)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..calibration import TemperatureFitAccumulator
from ..calibration.temperature import PAPER_TEMPERATURE_GRID
from .confidence import METHODS
from .data import FORMAT_NAMES
from .idk import ABSTENTION_HINTS
from .prompt_opt import SEED_PROMPTS

__all__ = ["ENGINES", "EvalConfig", "ModelSpec", "PROTOCOLS", "TEMPERATURE_METHODS",
           "canonical_temperature_method", "check_device", "new_fit_accumulator",
           "parse_model_spec",
           "unique_names"]


#: the generation engines of ``mllmcal eval --engine``
ENGINES = ("hf", "vllm")


@dataclass
class ModelSpec:
    """One model of a side-by-side run: its path and its own options.

    ``None`` options take the run's (``EvalConfig.dtype`` etc.). ``name`` is the display
    name (default: the folder's name, made unique by :func:`unique_names`).
    """

    path: str
    name: str | None = None
    dtype: str | None = None
    chat_template: str | None = None
    device_map: str | None = None


_SPEC_KEYS = {"name", "dtype", "chat_template", "device_map"}


def parse_model_spec(text: str) -> ModelSpec:
    """``PATH[,key=value...]`` with keys ``name``, ``dtype``, ``chat_template`` (auto|off),
    ``device_map`` (e.g. auto); e.g. ``./qwen,chat_template=off,dtype=bf16,name=qwen``."""
    head, *opts = text.split(",")
    if not head.strip():
        raise ValueError(f"--model {text!r}: empty path")
    spec = ModelSpec(head.strip())
    for opt in opts:
        key, sep, value = opt.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in _SPEC_KEYS or not value.strip():
            raise ValueError(f"--model {text!r}: option {opt!r} is not key=value with a key "
                             f"among {sorted(_SPEC_KEYS)}")
        if key == "chat_template" and value not in ("auto", "off"):
            raise ValueError(f"--model {text!r}: chat_template must be auto or off")
        setattr(spec, key, value.strip())
    return spec


def unique_names(specs: Sequence[ModelSpec]) -> list[str]:
    """Display names, unique: folders that share a name get their parent folders added
    (``a/model``, ``b/model``), then a counter if still equal."""
    names = [s.name or Path(os.path.normpath(s.path)).name or s.path for s in specs]
    for depth in (2, 3):
        dup = {n for n in names if names.count(n) > 1}
        if not dup:
            return names
        names = [("/".join(Path(os.path.normpath(s.path)).parts[-depth:]) if (n in dup and not s.name) else n)
                 for n, s in zip(names, specs, strict=True)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if names.count(n) == 1 else f"{n}#{seen[n]}")
    return out


#: ``--protocol paper``: Chen et al. (COLING 2025), Sec. 3: the "Answer: (" prompt, up to 20
#: greedy tokens with the first option-letter token's probability as confidence, 10
#: equal-width bins, temperature by grid search 0.01..9.99 on the calibration split.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "paper": {"method": "letter", "max_new_tokens": 20, "n_bins": 10,
              "temperature_method": "grid", "seed_prompts": SEED_PROMPTS},
}


@dataclass
class EvalConfig:
    """Everything ``mllmcal eval`` takes; see ``mllmcal eval --help`` for each option (a
    field is the option of the same name: ``target_risk`` is ``--target-risk``)."""

    models: list[str | ModelSpec]
    test: str
    out: str
    calib: str | None = None
    dev: str | None = None
    idk: str | None = None
    images: str | None = None
    method: str = "letter"
    modalities: tuple[str, ...] = ("image", "text")
    device: str = "cpu"
    dtype: str = "auto"
    batch_size: int = 8
    max_new_tokens: int = 20
    n_bins: int = 10
    temperature_method: str = "grid"
    chat_template: str = "auto"
    build_idk: bool = True
    idk_variants: tuple[str, ...] = tuple(ABSTENTION_HINTS)
    optimize_prompts: bool = False
    ape_k: int = 5
    ape_m: int = 5
    ape_rounds: int = 10
    proposer: str = "bank"
    seed_prompts: tuple[str, ...] = SEED_PROMPTS
    limit: int | None = None
    split_limits: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    progress: bool = True
    plots: bool = True
    device_map: str | None = None
    protocol: str | None = None
    #: fields the caller set on purpose: the ``protocol`` preset leaves them as they are
    #: (the CLI fills it with the preset's options given on the command line)
    keep: tuple[str, ...] = ()
    columns: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    engine: str = "hf"  # vllm: :mod:`mllmcal.eval.vllm_engine`
    engine_args: dict[str, Any] = field(default_factory=dict)  # LLM(...) keyword arguments
    format: str | None = None
    alpha: float = 0.1
    target_risk: float = 0.1

    def __post_init__(self) -> None:
        if self.temperature_method in _DEPRECATED_TEMPERATURE_METHODS:
            self.temperature_method = canonical_temperature_method(self.temperature_method)

    def model_specs(self) -> list[ModelSpec]:
        specs = [m if isinstance(m, ModelSpec) else parse_model_spec(m) for m in self.models]
        for s, name in zip(specs, unique_names(specs), strict=True):
            s.name = name
        return specs

    def validate(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is needed")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; known: {list(PROTOCOLS)}")
        bad = [k for k in self.keep if k not in self.__dataclass_fields__]
        if bad:
            raise ValueError(f"keep names unknown settings {bad}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        bad = [m for m in self.modalities if m not in ("image", "text")]
        if bad or not self.modalities:
            raise ValueError(f"--modalities must be image and/or text, got {list(self.modalities)}")
        if (self.temperature_method not in TEMPERATURE_METHODS
                and self.temperature_method not in _DEPRECATED_TEMPERATURE_METHODS):
            raise ValueError(f"--temperature-method must be one of {TEMPERATURE_METHODS}, "
                             f"got {self.temperature_method!r}")
        bad = [v for v in self.idk_variants if v not in ABSTENTION_HINTS]
        if bad:
            raise ValueError(f"unknown IDK prompt variants {bad}; known: {list(ABSTENTION_HINTS)}")
        if self.n_bins < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--n-bins, --batch-size and --max-new-tokens must be >= 1")
        bad = {k: v for k, v in self.split_limits.items() if v is not None and v < 1}
        if bad:  # a negative limit would be taken as a slice from the end
            raise ValueError(f"split limits must be >= 1 items, got {bad}")
        if self.optimize_prompts and not self.dev:
            # there is no default dev split: APE must not pick prompts on test or calib
            raise ValueError("--optimize-prompts needs a dev split to score prompts on "
                             "(--dev FILE, or dev.json etc. in --data DIR)")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "hf" and self.engine_args:
            raise ValueError(f"engine arguments {sorted(self.engine_args)} need --engine vllm")
        if self.engine == "vllm":
            if self.device_map is not None:
                raise ValueError("--device-map is for --engine hf; vLLM spreads a model with "
                                 "--tensor-parallel-size")
            from .vllm_engine import require_vllm

            require_vllm()
        if self.format is not None and self.format not in FORMAT_NAMES:
            raise ValueError(f"--format must be one of {FORMAT_NAMES}, got {self.format!r}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        if not 0.0 <= self.target_risk <= 1.0:
            raise ValueError(f"--target-risk must lie in [0, 1], got {self.target_risk}")
        check_device(self.device)


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` names a device this torch can use (``cpu``,
    ``cuda[:i]`` with CUDA available and ``i`` below the device count, ``mps``, ...): a
    wrong ``--device`` is said before any data or model is read."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {device!r} is not a device ({exc})") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "no CUDA device is visible")
            raise ValueError(f"--device {device}: {why}; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: there are {n} CUDA device(s) "
                             f"(cuda:0..cuda:{n - 1})")
        return
    backend = getattr(torch, dev.type, None) or getattr(torch.backends, dev.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and not available():
        raise ValueError(f"--device {device}: {dev.type} is not available in this torch")


#: ``grid``: the paper's search over T = 0.01, 0.02, ..., 9.99 (999 exact NLLs, one pass).
#: ``onepass``: the continuous optimum in the bracket 0.01..100, fitted in one pass: the NLL
#: and its first two derivatives at K = 41 temperatures (three per halving of T), refined
#: between the bracketing pair with a cubic Hermite interpolant of the derivative (see
#: :mod:`mllmcal.calibration.onepass`, ``fit_temperature(method="onepass")``; documented to
#: agree with a fine grid search, and so with Newton, to well under 0.5% in T). Newton
#: itself reads the data 5-10 times, which here would mean keeping the rows or running the
#: model again.
TEMPERATURE_METHODS = ("grid", "onepass")

#: old spellings of :data:`TEMPERATURE_METHODS`, accepted with a DeprecationWarning
_DEPRECATED_TEMPERATURE_METHODS = {"newton": "onepass"}


def canonical_temperature_method(name: str) -> str:
    """``name`` as one of :data:`TEMPERATURE_METHODS`; ``"newton"``, the old name of
    ``"onepass"`` (it never ran Newton), still works with a DeprecationWarning.

    Raises:
        ValueError: an unknown name.
    """
    if name in _DEPRECATED_TEMPERATURE_METHODS:
        new = _DEPRECATED_TEMPERATURE_METHODS[name]
        warnings.warn(f"temperature method {name!r} is deprecated: it runs the one-pass "
                      f"refined fit; say {new!r}", DeprecationWarning, stacklevel=3)
        return new
    if name not in TEMPERATURE_METHODS:
        raise ValueError(f"temperature method must be one of {TEMPERATURE_METHODS}, "
                         f"got {name!r}")
    return name


def new_fit_accumulator(method: str) -> TemperatureFitAccumulator:
    """An empty accumulator for the eval's ``temperature_method`` (see TEMPERATURE_METHODS)."""
    method = canonical_temperature_method(method)
    if method == "grid":
        return TemperatureFitAccumulator(PAPER_TEMPERATURE_GRID, derivatives=False)
    return TemperatureFitAccumulator(t_min=0.01, t_max=100.0)
