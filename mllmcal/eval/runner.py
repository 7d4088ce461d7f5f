"""The paper's evaluation, end to end: ``run_eval(EvalConfig) -> report dict``.

For each model and modality (image+text, text only): score the calib split while fitting T
on it (answer letter's full-vocabulary NLL), score the test split with confidences at T = 1
and at the fitted T, report metrics at both; then the IDK set under the abstention prompt
variants, and optionally APE prompt optimisation on the dev split.

No logits rows are stored (issue 13). The one ``[V]`` row per item at its answer position
lives only while its batch is scored: on the calib split it goes into a
:class:`~mllmcal.calibration.TemperatureFitAccumulator` (O(K) numbers per batch: the NLL and
its derivatives at K temperatures, or the paper's 999-point grid), on the test split it
gives the confidence at the fitted T (the calib split is fitted first). Storing the rows
instead costs O(items x V): 3 GB for 10k items at a 152k vocabulary in fp16.

Resuming: every scored batch is written to its own file ``<out>/cache/<key>.rank<r>of<w>.*.pt``
(its records and, on the calib split, its accumulator state, together) before the next
batch starts; a rerun reads all cache files of a key and scores only what is missing. On
the calib split a cached batch counts as a whole (its state cannot be split by item): it
is used only if every one of its items is still in this rank's shard with the same
content, and the batch states are summed in the order of their first items. A run cut
between batches therefore resumes to the bit-identical temperature: the items left form
the same batches as in an uncut run, and the sum runs in the same order. (The test
split's key includes the fitted T, so it follows the calib split.) The cache cannot lie:
``<key>`` hashes the checkpoint's identity (the bytes of its config, processor and
tokenizer files, and each weight file's name, size and modification time) with the
settings; every cached record carries a digest of its item's content (question, options,
answer, image bytes) and is used only for an item with the same digest. Files are written
to a temporary name and renamed, so a kill leaves no half-written file; a file that still
cannot be read (a full disk, a foreign file) is deleted with a warning and its items are
scored again.

Distributed (``torchrun --nproc_per_node N -m mllmcal eval ...``): items are sharded
round-robin; per-item records are gathered with ``all_gather_object`` (they are small),
the calib split's per-batch accumulator states are gathered the same way and summed in
item order on every rank (so every rank fits the same T, whatever the order ranks
finish in; a float64 ``all_reduce`` would sum in the backend's order), and the
histogram of the test split is summed with :meth:`CalibrationState.all_reduce`. Metrics
are computed on the gathered records in item order, so they equal a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import mllmcal

from ..calibration import TemperatureFitAccumulator
from ..calibration.temperature import PAPER_TEMPERATURE_GRID
from ..prompting import DEFAULT_ANSWER_PREFIX
from .confidence import METHODS, ScoredBatch, score_items
from .data import Columns, Item, LoadResult, load_items
from .idk import ABSTENTION_HINTS, build_idk_set, idk_metrics
from .models import EvalModel, load_model
from .report import calibration_metrics, write_report

__all__ = ["EvalConfig", "ModelSpec", "parse_model_spec", "run_eval", "fit_calib_temperature",
           "new_fit_accumulator", "PROTOCOLS", "TEMPERATURE_METHODS"]

_log = logging.getLogger("mllmcal.eval")


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
    names = []
    for s in specs:
        names.append(s.name or Path(os.path.normpath(s.path)).name or s.path)
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
              "temperature_method": "grid", "seed_prompts": ("Answer", "The answer might be",
                                                             "The answer must be")},
}


@dataclass
class EvalConfig:
    """Everything ``mllmcal eval`` takes; see ``mllmcal eval --help`` for each option."""

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
    seed_prompts: tuple[str, ...] = ("Answer", "The answer might be", "The answer must be")
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
        if self.temperature_method not in TEMPERATURE_METHODS:
            raise ValueError(f"--temperature-method must be one of {TEMPERATURE_METHODS}, "
                             f"got {self.temperature_method!r}")
        bad = [v for v in self.idk_variants if v not in ABSTENTION_HINTS]
        if bad:
            raise ValueError(f"unknown IDK prompt variants {bad}; known: {list(ABSTENTION_HINTS)}")
        if self.n_bins < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--n-bins, --batch-size and --max-new-tokens must be >= 1")


# --------------------------------------------------------------------------- distributed


class _Dist:
    """Rank/world and the few collectives the runner needs (no-ops in one process)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.owned = False
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and dist.is_available() and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and os.environ.get("MLLMCAL_DIST_BACKEND") != "gloo" else "gloo"
            dist.init_process_group(backend)
            self.owned = True
        self.on = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.on else 0
        self.world = dist.get_world_size() if self.on else 1

    def gather(self, obj: Any) -> list[Any]:
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        if not self.on:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned:
            self.dist.barrier()
            self.dist.destroy_process_group()


# --------------------------------------------------------------------------- temperature


#: ``grid``: the paper's search over T = 0.01, 0.02, ..., 9.99 (999 exact NLLs, one pass).
#: ``newton``: the continuous optimum in Newton's bracket 0.01..100, fitted in one pass: the
#: NLL and its first two derivatives at K = 41 temperatures (three per halving of T), refined
#: between the bracketing pair with a cubic Hermite interpolant of the derivative (see
#: :mod:`mllmcal.calibration.onepass`; documented to agree with a fine grid search, and so
#: with Newton, to well under 0.5% in T). Newton itself reads the data 5-10 times, which
#: here would mean keeping the rows or running the model again.
TEMPERATURE_METHODS = ("grid", "newton")


def new_fit_accumulator(method: str) -> TemperatureFitAccumulator:
    """An empty accumulator for the eval's ``temperature_method`` (see TEMPERATURE_METHODS)."""
    if method == "grid":
        return TemperatureFitAccumulator(PAPER_TEMPERATURE_GRID, derivatives=False)
    if method == "newton":
        return TemperatureFitAccumulator(t_min=0.01, t_max=100.0)
    raise ValueError(f"temperature method must be one of {TEMPERATURE_METHODS}, got {method!r}")


# --------------------------------------------------------------------------- scoring


#: blocks of each weight file read into :func:`checkpoint_identity` (at most 1 MiB a file)
WEIGHT_SAMPLES = 16
WEIGHT_SAMPLE_BYTES = 1 << 16


def _hash_weight_sample(h: Any, path: Path, size: int) -> None:
    if size <= WEIGHT_SAMPLES * WEIGHT_SAMPLE_BYTES:
        h.update(path.read_bytes())
        return
    last = size - WEIGHT_SAMPLE_BYTES
    with open(path, "rb") as fh:
        for k in range(WEIGHT_SAMPLES):
            fh.seek(last * k // (WEIGHT_SAMPLES - 1))
            h.update(fh.read(WEIGHT_SAMPLE_BYTES))


def checkpoint_identity(path: str | os.PathLike) -> str:
    """A digest of what makes a checkpoint directory this checkpoint.

    The bytes of its small files (config, generation config, processor, tokenizer, chat
    template: what changes the prompt or the vocabulary) and, for each weight file
    (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``), its name, size, modification time
    in ns and a sample of its bytes (:data:`WEIGHT_SAMPLES` blocks of
    :data:`WEIGHT_SAMPLE_BYTES`, evenly spaced, the first and last included): hashing all
    the weights would read gigabytes on every run. Any rewrite of a weight file changes its
    modification time; the sample also tells apart weights put in place with their old
    time kept (``cp -p``, ``rsync -t``, an unpacked archive), unless they differ only
    outside every sampled block.
    """
    h = hashlib.sha256()
    root = Path(path)
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
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
    """A digest of an item's content: question, options, answer, image bytes, IDK flags."""
    h = hashlib.sha256(json.dumps([item.question, list(item.options), item.answer,
                                   item.withhold_image]).encode())
    if item.image is not None:
        try:
            h.update(Path(item.image).read_bytes())
        except OSError:
            h.update(b"<unreadable image>")
    return h.hexdigest()[:16]


#: one cached batch: its records and its accumulator state (None off the calib split)
_Batch = tuple[list[dict], dict | None]


class _Evaluator:
    def __init__(self, cfg: EvalConfig, dist: _Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.cache = Path(cfg.out) / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        # key -> (records by id, cached batches) already read or scored in this run: a key
        # scored again (a prompt APE proposes twice, the seed prompt's test split) is not
        # re-read
        self._memo: dict[str, tuple[dict[str, dict], list[_Batch]]] = {}
        self._identity: dict[str, str] = {}
        self._digests: dict[Item, str] = {}  # Item is frozen and hashable by content
        self._written = 0

    def _digest(self, item: Item) -> str:
        if item not in self._digests:
            self._digests[item] = item_digest(item)
        return self._digests[item]

    def _key(self, em: EvalModel, split: str, modality: str, prefix: str, hint: str | None,
             fit: str | None, temperature: float | None) -> str:
        if em.path not in self._identity:
            self._identity[em.path] = checkpoint_identity(em.path)
        # repr(float) round-trips: the same fitted T gives the same key
        spec = json.dumps([self._identity[em.path], str(em.dtype), self.cfg.method, prefix, hint,
                           modality, self.cfg.max_new_tokens, em.use_chat_template, fit,
                           None if temperature is None else repr(float(temperature)), 3])
        digest = hashlib.sha1(spec.encode()).hexdigest()[:12]
        return f"{split}_{modality}_{digest}"

    def _read_cache(self, key: str) -> tuple[dict[str, dict], list[_Batch]]:
        """Records of every readable cache file of ``key``, and each file's batch; damaged
        files are deleted with a warning (their items are scored again)."""
        records: dict[str, dict] = {}
        batches: list[_Batch] = []
        for p in sorted(self.cache.glob(f"{key}.rank*.pt")):
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

    def _write(self, stem: str, records: list[dict], fit: dict | None) -> None:
        # one file per batch, written under a temporary name and renamed: a kill leaves
        # either the whole batch or nothing (os.replace is atomic on POSIX and Windows)
        self._written += 1
        name = f"{stem}.{os.getpid()}-{self._written}-{time.time_ns()}.pt"
        tmp = self.cache / f".{name}.tmp"
        torch.save({"records": records, "fit": fit}, tmp)
        os.replace(tmp, self.cache / name)

    @staticmethod
    def _fit_batches(batches: list[_Batch], digest: dict[str, str], pos: dict[str, int]
                     ) -> list[tuple[int, list[dict], dict]]:
        """The cached calib batches this rank can reuse: every item still in its shard with
        the same content, no item twice. ``(position of the first item, records, state)``,
        in item order, so the sum of the states does not depend on which files a run
        found (an interrupted run resumes to the bit-identical T)."""
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

    def evaluate(self, em: EvalModel, items: Sequence[Item], split: str, modality: str,
                 prefix: str = DEFAULT_ANSWER_PREFIX, hint: str | None = None,
                 fit: str | None = None, temperature: float | None = None,
                 ) -> tuple[list[dict], TemperatureFitAccumulator | None]:
        """Records for all ``items`` (gathered over ranks, in item order).

        Args:
            fit: a temperature method (:data:`TEMPERATURE_METHODS`): each batch's answer
                rows go into a :func:`new_fit_accumulator` while the batch is scored, and
                the accumulator summed over all batches and ranks is returned (else None).
            temperature: a fitted T: each scored record also gets ``confidence_t``, its
                confidence at T, computed from the batch's answer rows.
        """
        key = self._key(em, split, modality, prefix, hint, fit, temperature)
        if key not in self._memo:
            self._memo[key] = self._read_cache(key)
        cached, batches = self._memo[key]
        mine = items[self.dist.rank::self.dist.world]
        digest = {it.id: self._digest(it) for it in mine}
        parts: list[tuple[int, dict]] = []
        if fit is None:
            # a cached record counts only for an item with the same content
            todo = [it for it in mine
                    if it.id not in cached or cached[it.id].get("digest") != digest[it.id]]
        else:
            pos = {it.id: i for i, it in enumerate(items)}
            covered: set[str] = set()
            for first, recs, state in self._fit_batches(batches, digest, pos):
                for r in recs:  # the records of the batch whose state is used
                    cached[r["id"]] = r
                    covered.add(r["id"])
                parts.append((first, state))
            todo = [it for it in mine if it.id not in covered]
        stem = f"{key}.rank{self.dist.rank}of{self.dist.world}"
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not self.cfg.progress,
                   desc=f"{em.name} {split}/{modality}" + (f" [{prefix}]" if prefix != DEFAULT_ANSWER_PREFIX else ""),
                   leave=False)
        for batch in score_items(em, todo, method=self.cfg.method, answer_prefix=prefix,
                                 with_image=modality == "image", hint=hint,
                                 batch_size=self.cfg.batch_size,
                                 max_new_tokens=self.cfg.max_new_tokens):
            for r in batch.records:
                r["digest"] = digest[r["id"]]
            if temperature is not None:
                _add_confidence_at(batch, temperature)
            state = None
            if fit is not None:
                acc = new_fit_accumulator(fit)
                if batch.rows is not None and batch.row_ids:
                    acc.update(batch.rows, batch.labels.to(batch.rows.device))
                state = acc.to_dict()
                ids = [r["id"] for r in batch.records]
                first = min(pos[i] for i in ids)
                batches.append((batch.records, state))
                parts.append((first, state))
            self._write(stem, batch.records, state)
            for r in batch.records:
                cached[r["id"]] = r
            bar.update(len(batch.records))
        bar.close()
        local = {i: cached[i] for i in digest}
        merged: dict[str, dict] = {}
        for part in self.dist.gather(local):
            merged.update(part)
        records = [merged[it.id] for it in items]
        if fit is None:
            return records, None
        # every rank sums every rank's batch states in item order: the same T everywhere
        everything = sorted((p for part in self.dist.gather(parts) for p in part),
                            key=lambda p: p[0])
        total = new_fit_accumulator(fit)
        for _, state in everything:
            total.merge(TemperatureFitAccumulator.from_dict(state))
        return records, total


def _add_confidence_at(batch: ScoredBatch, temperature: float) -> None:
    """``confidence_t`` of each scored record: the max of ``softmax(row / T)`` of its answer
    row (the letter's probability: greedy chose the argmax, which T does not move)."""
    conf = {}
    if batch.rows is not None and batch.row_ids:
        s = mllmcal.token_stats(batch.rows, temperature=temperature)
        conf = dict(zip(batch.row_ids, torch.where(s.valid, s.confidence, float("nan")).tolist(),
                        strict=True))
    for r in batch.records:
        r["confidence_t"] = conf.get(r["id"]) if r["pred"] is not None else None


def _histogram_ece(records: Sequence[dict], dist: _Dist, n_bins: int) -> dict[str, float] | None:
    """ECE/MCE from a CalibrationState summed over ranks with all_reduce (None if the
    calibration layer is not installed or no item is scored)."""
    try:
        from mllmcal.calibration.state import CalibrationState
    except ImportError:
        return None
    scored = [r for r in records if r.get("pred") is not None and r.get("confidence") is not None]
    state = CalibrationState(n_bins=n_bins)
    if scored:
        state.update(torch.tensor([r["confidence"] for r in scored], dtype=torch.float64),
                     torch.tensor([bool(r["correct"]) for r in scored]))
    if dist.on:
        state.all_reduce()
    if state.count == 0:
        return None
    return {"ece": state.ece("l1"), "mce": state.ece("max"), "count": state.count}


def _answered_ece(records: Sequence[dict], n_bins: int) -> float | None:
    answered = [r for r in records if r["answerable"] and r["pred"] is not None and not r["idk"]]
    return calibration_metrics(answered, n_bins)["ece"] if answered else None


def _load(path: str | None, images: str | None, name: str, limit: int | None,
          data_info: dict, columns: dict[str, str] | None = None) -> list[Item]:
    if path is None:
        return []
    res: LoadResult = load_items(path, images, columns=Columns(**(columns or {})))
    if limit is not None:
        res.items = res.items[:limit]
    data_info[name] = {"path": str(path), "n_items": len(res.items),
                       "n_skipped": len(res.skipped), "skipped": res.skipped}
    return res.items


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run the whole method and write ``report.json``/``report.md``/PNGs to ``cfg.out``.

    Returns the report dict (every rank gets it; only rank 0 writes files). With several
    models, a model that fails to load or to run is reported by name under
    ``report["failed"]`` and the others still produce the report; if every model fails,
    the first failure is raised.
    """
    if cfg.protocol is not None:
        cfg.validate()
        preset = {k: v for k, v in PROTOCOLS[cfg.protocol].items() if k not in cfg.keep}
        kept = {k: getattr(cfg, k) for k in PROTOCOLS[cfg.protocol] if k in cfg.keep}
        if kept:
            _log.warning("protocol %r with %s as given", cfg.protocol,
                         ", ".join(f"{k}={v!r}" for k, v in kept.items()))
        cfg = replace(cfg, **preset)
    cfg.validate()
    dist = _Dist()
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _open_model(cfg: EvalConfig, spec: ModelSpec) -> EvalModel:
    return load_model(spec.path, device=cfg.device, dtype=spec.dtype or cfg.dtype,
                      chat_template=spec.chat_template or cfg.chat_template, name=spec.name,
                      device_map=spec.device_map or cfg.device_map)


def _run(cfg: EvalConfig, dist: _Dist) -> dict[str, Any]:
    data_info: dict[str, Any] = {}
    lim = {s: cfg.split_limits.get(s, cfg.limit) for s in ("test", "calib", "dev", "idk")}
    test = _load(cfg.test, cfg.images, "test", lim["test"], data_info, cfg.columns)
    calib = _load(cfg.calib, cfg.images, "calib", lim["calib"], data_info, cfg.columns)
    dev = _load(cfg.dev, cfg.images, "dev", lim["dev"], data_info, cfg.columns)
    idk_items = _load(cfg.idk, cfg.images, "idk", lim["idk"], data_info, cfg.columns)
    if not test:
        raise ValueError(f"{cfg.test}: no usable test items (see the skipped-item messages above)")
    if not idk_items and cfg.build_idk:
        idk_items = build_idk_set(test, seed=cfg.seed)[: lim["idk"]]
        data_info["idk"] = {"path": None, "built_from": "test", "n_items": len(idk_items),
                            "n_skipped": 0, "skipped": []}
    ev = _Evaluator(cfg, dist)
    specs = cfg.model_specs()
    models_out, failed = [], []
    first_error: BaseException | None = None
    for spec in specs:
        try:
            models_out.append(_eval_model(ev, cfg, spec, test, calib, dev, idk_items, dist))
        except (OSError, ValueError, RuntimeError, ImportError) as exc:
            if len(specs) == 1:
                raise
            _log.error("model %s (%s) failed: %s", spec.name, spec.path, exc)
            failed.append({"name": spec.name, "path": spec.path,
                           "error": f"{type(exc).__name__}: {exc}"})
            first_error = first_error or exc
    if not models_out:
        assert first_error is not None
        raise first_error
    report = {"schema_version": 1, "config": asdict(cfg), "data": data_info,
              "models": models_out, "failed": failed, "world_size": dist.world}
    report["summary"] = _summary(report, cfg)
    if dist.rank == 0:
        write_report(report, cfg.out, plots=cfg.plots)
    return report


def _eval_model(ev: _Evaluator, cfg: EvalConfig, spec: ModelSpec, test: list[Item],
                calib: list[Item], dev: list[Item], idk_items: list[Item],
                dist: _Dist) -> dict[str, Any]:
    em = _open_model(cfg, spec)
    modalities = [m for m in cfg.modalities if m == "text" or em.multimodal]
    entry: dict[str, Any] = {"name": em.name, "path": em.path, "multimodal": em.multimodal,
                             "modalities": {}, "idk": {}, "prompt_optimization": None}
    for mod in modalities:
        entry["modalities"][mod] = _eval_modality(ev, em, mod, test, calib, dist)
    main_mod = modalities[0]
    for variant in (cfg.idk_variants if idk_items else ()):
        recs, _ = ev.evaluate(em, idk_items, "idk", main_mod, hint=ABSTENTION_HINTS[variant])
        res = idk_metrics(recs)
        res["answered_ece"] = _answered_ece(recs, cfg.n_bins)
        entry["idk"][variant] = res
    if cfg.optimize_prompts and dev:
        t_main = entry["modalities"][main_mod]["temperature"]
        entry["prompt_optimization"] = _optimize(ev, em, main_mod, dev, test, dist, t_main)
    return entry


def _fit_on_calib(ev: _Evaluator, em: EvalModel, mod: str, calib: Sequence[Item]
                  ) -> tuple[float | None, int, bool]:
    """T fitted on the calib split while it is scored, how many answer rows it used, and
    whether T sits at the end of the search range (the optimum may lie beyond it).

    One read of each item: each batch's answer rows go into the fit's accumulator and are
    dropped (see the module docstring); the states of all batches and ranks are summed."""
    _, acc = ev.evaluate(em, calib, "calib", mod, fit=ev.cfg.temperature_method)
    assert acc is not None
    n = acc.n_rows + acc.n_masked  # rows whose label had probability 0 are skipped by the fit
    if not acc.n_rows:
        return None, n, False
    t, info = acc.fit(return_info=True)
    return float(t), n, bool(info.get("at_bound", False))


def fit_calib_temperature(model: str | ModelSpec, calib: str, out: str, *,
                          images: str | None = None, modality: str = "image",
                          method: str = "letter", temperature_method: str = "grid",
                          device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                          limit: int | None = None,
                          columns: dict[str, str] | None = None) -> dict[str, Any]:
    """Fit the temperature of one model on a calib split (what ``mllmcal fit`` prints).

    Scores are cached under ``out/cache`` like :func:`run_eval`'s, so the two share work.

    Returns:
        ``{"temperature": float | None, "temperature_at_bound": bool, "n_rows": int,
        "n_items": int, "method": str, "modality": str}``; ``temperature`` is None when no
        item produced a letter; ``temperature_at_bound``: T is the end of the search range,
        where the optimum may lie beyond it.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    items = load_items(calib, images, columns=Columns(**(columns or {}))).items[:limit]
    cfg = EvalConfig(models=[model], test=calib, out=out, method=method, device=device,
                     dtype=dtype, batch_size=batch_size, temperature_method=temperature_method,
                     progress=False)
    cfg.validate()
    spec = cfg.model_specs()[0]
    em = _open_model(cfg, spec)
    mod = modality if em.multimodal else "text"
    dist = _Dist()
    try:
        t, n, at_bound = _fit_on_calib(_Evaluator(cfg, dist), em, mod, items)
    finally:
        dist.close()
    return {"temperature": t, "temperature_at_bound": at_bound, "n_rows": n,
            "n_items": len(items),
            "method": temperature_method, "modality": mod}


def _eval_modality(ev: _Evaluator, em: EvalModel, mod: str, test: list[Item],
                   calib: list[Item], dist: _Dist) -> dict[str, Any]:
    cfg = ev.cfg
    temperature = None
    n_calib = 0
    at_bound = False
    if calib and cfg.method != "verbalized":
        temperature, n_calib, at_bound = _fit_on_calib(ev, em, mod, calib)
    records, _ = ev.evaluate(em, test, "test", mod, temperature=temperature)
    out: dict[str, Any] = {"test": calibration_metrics(records, cfg.n_bins),
                           "test_after_temperature": None, "temperature": temperature,
                           "temperature_method": cfg.temperature_method, "n_calib_rows": n_calib,
                           "temperature_at_bound": at_bound}
    hist = _histogram_ece(records[dist.rank::dist.world], dist, cfg.n_bins)
    if hist is not None:
        out["test"]["ece_histogram_all_reduce"] = hist["ece"]
    if temperature is not None:
        scaled = [{**r, "confidence": r["confidence_t"] if r["pred"] is not None else None}
                  for r in records]
        out["test_after_temperature"] = calibration_metrics(scaled, cfg.n_bins)
    return out


def _optimize(ev: _Evaluator, em: EvalModel, mod: str, dev: list[Item], test: list[Item],
              dist: _Dist, temperature: float | None) -> dict[str, Any]:
    from .prompt_opt import make_proposer, optimize_prompts

    cfg = ev.cfg
    proposer = make_proposer(cfg.proposer, device=cfg.device, seed=cfg.seed)

    def score(prefix: str) -> tuple[float, float]:
        recs, _ = ev.evaluate(em, dev, "dev", mod, prefix=prefix)
        m = calibration_metrics(recs, cfg.n_bins)
        return (m["accuracy"] or 0.0, m["ece"] if m["ece"] is not None else 1.0)

    res = optimize_prompts(score, proposer, seeds=cfg.seed_prompts, k=cfg.ape_k, m=cfg.ape_m,
                           n_rounds=cfg.ape_rounds, progress=cfg.progress and dist.rank == 0,
                           broadcast=dist.broadcast if dist.on else None)
    out = res.to_dict()
    out["test"] = {}
    for p in dict.fromkeys([res.seed, res.best]):
        # with the main test run's T: the seed prompt's scores are that run's, from the cache
        recs, _ = ev.evaluate(em, test, "test", mod, prefix=p, temperature=temperature)
        out["test"][p] = calibration_metrics(recs, cfg.n_bins)
    return out


def _summary(report: dict, cfg: EvalConfig) -> dict[str, Any]:
    m = report["models"][0]
    mod = next(iter(m["modalities"]))
    r = m["modalities"][mod]
    t, ta = r["test"], r["test_after_temperature"] or {}
    idk = m["idk"].get("plain") or next(iter(m["idk"].values()), {}) if m["idk"] else {}
    po = m["prompt_optimization"]
    summary = {
        "model": m["name"], "modality": mod, "method": cfg.method,
        "accuracy": t["accuracy"], "ece": t["ece"], "ece_after_temperature": ta.get("ece"),
        "temperature": r["temperature"], "mce": t["mce"], "brier": t["brier"],
        "auroc": t["auroc"], "n_items": t["n_items"], "n_scored": t["n_scored"],
        "n_no_answer": t["n_no_answer"],
        "n_skipped": sum(d.get("n_skipped", 0) for d in report["data"].values()),
        "idk_rate": idk.get("idk_rate"), "false_idk_rate": idk.get("false_idk_rate"),
        "prompt_optimization": None,
    }
    # every model (and modality) side by side, and the ones that failed, by name
    summary["models"] = [
        {"model": mm["name"], "modality": mod_name, "accuracy": r2["test"]["accuracy"],
         "ece": r2["test"]["ece"], "temperature": r2["temperature"],
         "ece_after_temperature": (r2["test_after_temperature"] or {}).get("ece")}
        for mm in report["models"] for mod_name, r2 in mm["modalities"].items()]
    summary["failed"] = [f["name"] for f in report.get("failed", [])]
    if po:
        seed, best = po["test"][po["seed_prompt"]], po["test"][po["best_prompt"]]
        summary["prompt_optimization"] = {
            "seed_prompt": po["seed_prompt"], "best_prompt": po["best_prompt"],
            "seed": {"accuracy": seed["accuracy"], "ece": seed["ece"]},
            "best": {"accuracy": best["accuracy"], "ece": best["ece"]},
            "rounds": len(po["trajectory"]) - 1,
        }
    return summary
