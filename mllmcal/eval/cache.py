"""The eval's score cache: what a checkpoint and an item are (digests), and the batch files.

Every scored batch is written to its own file ``<out>/cache/<key>.rank<r>of<w>.*.pt`` (its
records and, on the calib split, its temperature-fit accumulator state, together) before
the next batch starts; a rerun reads all cache files of a key and scores only what is
missing. The cache cannot lie: ``<key>`` hashes the checkpoint's identity
(:func:`checkpoint_identity`) with the settings, and every cached record carries its
item's :func:`item_digest` and is used only for an item with the same digest. Files are
written to a temporary name and renamed, so a kill leaves no half-written file; a file that
still cannot be read (a full disk, a foreign file) is deleted with a warning and its items
are scored again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..calibration import TemperatureFitAccumulator
from .data import Item

__all__ = ["WEIGHT_SAMPLES", "WEIGHT_SAMPLE_BYTES", "BatchCache", "checkpoint_identity",
           "item_digest"]

_log = logging.getLogger("mllmcal.eval")

#: blocks of each weight file read into :func:`checkpoint_identity` (at most 1 MiB a file)
WEIGHT_SAMPLES = 16
WEIGHT_SAMPLE_BYTES = 1 << 16

#: one cached batch: its records and its accumulator state (None off the calib split)
Batch = tuple[list[dict], dict | None]


def _hash_weight_sample(h: Any, path: Path, size: int) -> None:
    if size <= WEIGHT_SAMPLES * WEIGHT_SAMPLE_BYTES:
        h.update(path.read_bytes())
        return
    last = size - WEIGHT_SAMPLE_BYTES
    with open(path, "rb") as fh:
        for k in range(WEIGHT_SAMPLES):
            fh.seek(last * k // (WEIGHT_SAMPLES - 1))
            h.update(fh.read(WEIGHT_SAMPLE_BYTES))


#: subfolders of a checkpoint that transformers reads (named chat templates)
_LOADED_SUBFOLDERS = ("additional_chat_templates",)
#: files the eval writes into its ``--out`` folder that look like checkpoint files (plots
#: and report.md are not hashed anyway; the cache is a subfolder)
_EVAL_OUTPUTS = ("report.json",)


def _identity_files(root: Path) -> list[Path]:
    """The files of ``root`` that loading it reads: its top level (``from_pretrained``
    reads a checkpoint's config, weights, tokenizer, processor and chat template from there)
    and :data:`_LOADED_SUBFOLDERS`, without the eval's own outputs."""
    if not root.is_dir():
        return []
    files = [p for p in root.iterdir() if p.is_file() and p.name not in _EVAL_OUTPUTS]
    for sub in _LOADED_SUBFOLDERS:
        if (root / sub).is_dir():
            files += [p for p in (root / sub).rglob("*") if p.is_file()]
    return sorted(files)


def checkpoint_identity(path: str | os.PathLike) -> str:
    """A digest of what makes a checkpoint directory this checkpoint.

    Only the files that loading the checkpoint reads count (:func:`_identity_files`): its
    top-level files and its ``additional_chat_templates/``, not its other subfolders and
    not a ``report.json``. So an ``--out`` inside the checkpoint folder (its report, plots
    and ``cache/``), or anything else kept beside it (logs, earlier runs), does not change
    the identity: a rerun reuses the cache instead of scoring everything again.

    Of those files: the bytes of the small ones (config, generation config, processor,
    tokenizer, chat template: what changes the prompt or the vocabulary) and, for each
    weight file (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``), its name, size,
    modification time in ns and a sample of its bytes (:data:`WEIGHT_SAMPLES` blocks of
    :data:`WEIGHT_SAMPLE_BYTES`, evenly spaced, the first and last included): hashing all
    the weights would read gigabytes on every run. Any rewrite of a weight file changes its
    modification time; the sample also tells apart weights put in place with their old
    time kept (``cp -p``, ``rsync -t``, an unpacked archive), unless they differ only
    outside every sampled block.
    """
    h = hashlib.sha256()
    root = Path(path)
    for p in _identity_files(root):
        rel = p.relative_to(root).as_posix()
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5"):
            st = p.stat()
            h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            _hash_weight_sample(h, p, st.st_size)
        elif p.suffix in (".json", ".jinja", ".model", ".txt", ".tiktoken", ".py"):
            h.update(f"{rel}|".encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def item_digest(item: Item) -> str:
    """A digest of an item's content: question, options, answer, the bytes of every image
    in ``item.images`` (in order), the IDK flags (``withhold_image``, ``unanswerable``) and
    the categories (records carry them into the report's per-category rows)."""
    h = hashlib.sha256(json.dumps([item.question, list(item.options), item.answer,
                                   item.withhold_image, item.unanswerable,
                                   len(item.images), item.category, item.l2_category]).encode())
    for image in item.images:
        try:
            data = Path(image).read_bytes()
        except OSError:
            data = b"<unreadable image>"
        # each image's own digest: where one image ends and the next begins is part of it
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()[:16]


class BatchCache:
    """The batch files under one directory, and the digests their keys are made of.

    Digests are memoised per run: a checkpoint's identity per path, an item's digest per
    item (``Item`` is frozen and hashable by content).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._identity: dict[str, str] = {}
        self._digests: dict[Item, str] = {}
        self._written = 0

    def digest(self, item: Item) -> str:
        """:func:`item_digest`, memoised."""
        if item not in self._digests:
            self._digests[item] = item_digest(item)
        return self._digests[item]

    def key(self, checkpoint: str, split: str, modality: str, settings: list[Any]) -> str:
        """``<split>_<modality>_<hash of the checkpoint identity and settings>``."""
        if checkpoint not in self._identity:
            self._identity[checkpoint] = checkpoint_identity(checkpoint)
        spec = json.dumps([self._identity[checkpoint], *settings])
        return f"{split}_{modality}_{hashlib.sha1(spec.encode()).hexdigest()[:12]}"

    def read(self, key: str) -> tuple[dict[str, dict], list[Batch]]:
        """Records of every readable cache file of ``key``, and each file's batch; damaged
        files are deleted with a warning (their items are scored again)."""
        records: dict[str, dict] = {}
        batches: list[Batch] = []
        for p in sorted(self.root.glob(f"{key}.rank*.pt")):
            try:
                blob = torch.load(p, weights_only=True)
                batch, fit = blob["records"], blob["fit"]
                if fit is not None:
                    TemperatureFitAccumulator.from_dict(fit)  # validates it
            except Exception as exc:  # torch.load raises many types on a damaged file
                _log.warning("discarding damaged cache file %s (%s); its items are scored "
                             "again", p, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                p.unlink(missing_ok=True)
                continue
            for r in batch:
                records[r["id"]] = r
            batches.append((batch, fit))
        return records, batches

    def write(self, stem: str, records: list[dict], fit: dict | None) -> None:
        """One file per batch (module docstring; ``os.replace`` is atomic on POSIX and
        Windows)."""
        self._written += 1
        name = f"{stem}.{os.getpid()}-{self._written}-{time.time_ns()}.pt"
        tmp = self.root / f".{name}.tmp"
        torch.save({"records": records, "fit": fit}, tmp)
        os.replace(tmp, self.root / name)


def reusable_fit_batches(batches: list[Batch], digest: dict[str, str], pos: dict[str, int]
                         ) -> list[tuple[int, list[dict], dict]]:
    """The cached calib batches this rank can reuse: every item still in its shard with the
    same content, no item twice. ``(position of the first item, records, state)``, in item
    order, so the sum of the states does not depend on which files a run found (an
    interrupted run resumes to the bit-identical T)."""
    cands = []
    for recs, fit in batches:
        ids = [r["id"] for r in recs]
        if fit is None or not ids or not all(
                i in digest and r.get("digest") == digest[i] for i, r in zip(ids, recs, strict=True)):
            continue
        cands.append((min(pos[i] for i in ids), -len(ids), ids, recs, fit))
    cands.sort(key=lambda c: c[:3])
    covered: set[str] = set()
    out = []
    for first, _, ids, recs, fit in cands:
        if covered.isdisjoint(ids):
            covered.update(ids)
            out.append((first, recs, fit))
    return out
