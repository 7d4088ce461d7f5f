"""Where the demo's pieces live (see :mod:`mllmcal.demo`): the shipped checkpoint
(``mllmcal/demo/checkpoint/``) and the cache that the evaluation splits, a pure function of
the seed, are rendered into on first use. Nothing here trains, downloads or imports torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

from .shapes import DEFAULT_SIZES, build_dataset, merge_sizes

__all__ = [
    "CHECKPOINT_DIR",
    "DATA_VERSION",
    "EVAL_SIZES",
    "default_cache_root",
    "demo_data_dir",
    "demo_model_dir",
    "get_demo",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoint"
DATA_VERSION = "demo-data-v3"  # bump when the data generator changes
MARKER = "COMPLETE.json"
#: The splits ``mllmcal demo`` evaluates on (the training split is not needed for that).
EVAL_SIZES: dict[str, int] = {**DEFAULT_SIZES, "train": 0}


def demo_model_dir() -> Path:
    """The directory of the shipped demo checkpoint (model, processor, tokenizer files).

    It loads with ``AutoProcessor.from_pretrained`` and
    ``AutoModelForImageTextToText.from_pretrained``; ``--model demo`` resolves to it.

    Raises:
        FileNotFoundError: the install lacks the checkpoint files (a package built without
            its package data).
    """
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json")
               if not (CHECKPOINT_DIR / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the shipped demo checkpoint in {CHECKPOINT_DIR} lacks {', '.join(missing)}; "
            "reinstall mllmcal with its package data, or recreate it with "
            "`mllmcal demo --retrain`"
        )
    return CHECKPOINT_DIR


def default_cache_root() -> Path:
    """``$MLLMCAL_CACHE`` if set, else ``~/.cache/mllmcal``."""
    env = os.environ.get("MLLMCAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mllmcal"


@contextmanager
def _locked(path: Path):
    # One builder at a time: under torchrun every rank asks for the data; the others wait
    # and then find the marker.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def demo_data_dir(cache_dir: str | Path | None = None, seed: int = 0,
                  sizes: Mapping[str, int] | None = None, force: bool = False,
                  name: str = DATA_VERSION) -> Path:
    """The shapes VQA splits, rendered once into ``cache_dir/{name}-seed{seed}/``.

    Args:
        cache_dir: parent directory; default :func:`default_cache_root`.
        seed: the data set seed (the shipped model was trained on seed 0's train split;
            the evaluation splits are disjoint from it by construction).
        sizes: items per split over :data:`EVAL_SIZES` (no training split by default).
        force: rebuild even if a complete entry exists.

    A marker (``COMPLETE.json`` with the sizes) is written last; an entry without it, or
    built with other sizes, is deleted and rebuilt, never half-used.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    want = merge_sizes(EVAL_SIZES, sizes)
    entry = root / f"{name}-seed{seed}"
    marker = entry / MARKER

    def complete() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("sizes") == want

    if complete() and not force:
        return entry
    with _locked(root / f".{entry.name}.lock"):
        if complete() and not force:  # another process finished while we waited
            return entry
        if entry.exists():
            shutil.rmtree(entry)
        build_dataset(entry, seed=seed, sizes=want)
        tmp = entry / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"seed": seed, "sizes": want}, indent=1))
        os.replace(tmp, marker)
    return entry


def get_demo(cache_dir: str | Path | None = None, seed: int = 0,
             sizes: Mapping[str, int] | None = None, force: bool = False,
             progress: bool = True) -> tuple[Path, Path]:
    """``(demo_model_dir(), demo_data_dir(...))``: the shipped model and the evaluation data.

    Never trains; the first call renders the data (a few seconds), later calls reuse it.
    ``progress`` is accepted for symmetry with the training entry points and unused.
    """
    del progress
    return demo_model_dir(), demo_data_dir(cache_dir, seed=seed, sizes=sizes, force=force)
