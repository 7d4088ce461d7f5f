"""The paper's evaluation, end to end: ``run_eval(EvalConfig) -> report dict``.

For each model and modality (image+text, text only): score the calib split keeping one
logits row per item, fit T on those rows (answer letter's full-vocabulary NLL), score the
test split, report metrics at T = 1 and at the fitted T; then the IDK set under the
abstention prompt variants, and optionally APE prompt optimisation on the dev split.

Resuming: every scored batch is appended to ``<out>/cache/<key>.rank<r>of<w>.jsonl`` (and
its kept logits rows to ``...rows<k>.pt``) before the next batch starts; a rerun with the
same settings reads all cache files of a key (any world size) and scores only what is
missing.

Distributed (``torchrun --nproc_per_node N -m mllmcal eval ...``): items are sharded
round-robin; per-item records are gathered with ``all_gather_object`` (they are small),
calibration rows of the calib split are gathered so every rank fits the same T, and the
histogram of the test split is summed with :meth:`CalibrationState.all_reduce`. Metrics
are computed on the gathered records in item order, so they equal a single-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import mllmcal

from ..prompting import DEFAULT_ANSWER_PREFIX
from .confidence import METHODS, score_items
from .data import Item, LoadResult, load_items
from .idk import ABSTENTION_HINTS, build_idk_set, idk_metrics
from .models import EvalModel, load_model, parse_dtype
from .report import calibration_metrics, write_report

__all__ = ["EvalConfig", "run_eval", "fit_temperature_rows"]

_log = logging.getLogger("mllmcal.eval")


@dataclass
class EvalConfig:
    """Everything ``mllmcal eval`` takes; see ``mllmcal eval --help`` for each option."""

    models: list[str]
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
    row_dtype: str = "float16"
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
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.models:
            raise ValueError("at least one --model is needed")
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        bad = [m for m in self.modalities if m not in ("image", "text")]
        if bad or not self.modalities:
            raise ValueError(f"--modalities must be image and/or text, got {list(self.modalities)}")
        if self.temperature_method not in ("grid", "newton"):
            raise ValueError(f"--temperature-method must be grid or newton, got {self.temperature_method!r}")
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


def fit_temperature_rows(rows: torch.Tensor, labels: torch.Tensor, method: str = "grid",
                         chunk: int = 256) -> float:
    """T minimising the mean NLL of ``labels`` under ``softmax(rows / T)``.

    Args:
        rows: ``[N, W]`` fp16/bf16/fp32 logits rows (one per item), any device.
        labels: ``[N]`` int64 index of the answer in each row.
        method: ``grid`` (the paper's 0.01..9.99, step 0.01) or ``newton``.

    The rows are handed to :func:`mllmcal.fit_temperature` as ``chunk``-row batches, which
    it streams through the fused kernel: no ``[N, W]`` fp32 copy is made.
    """
    if rows.shape[0] == 0:
        raise ValueError("no calibration rows to fit a temperature on")
    batches = [(rows[i:i + chunk], labels[i:i + chunk]) for i in range(0, rows.shape[0], chunk)]
    return float(mllmcal.fit_temperature(batches, method=method, progress=False))


# --------------------------------------------------------------------------- scoring


class _Evaluator:
    def __init__(self, cfg: EvalConfig, dist: _Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.cache = Path(cfg.out) / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.row_dtype = parse_dtype(cfg.row_dtype, torch.device("cpu"))
        # key -> (records, rows) already read or scored in this run: a key scored again
        # (a prompt APE proposes twice, the seed prompt's test split) is not re-read
        self._memo: dict[str, tuple[dict[str, dict], dict[str, tuple[torch.Tensor, int]]]] = {}

    def _key(self, em: EvalModel, split: str, modality: str, prefix: str, hint: str | None) -> str:
        spec = json.dumps([em.path, str(em.dtype), self.cfg.method, prefix, hint, modality,
                           self.cfg.max_new_tokens, self.cfg.row_dtype, self.cfg.chat_template])
        digest = hashlib.sha1(spec.encode()).hexdigest()[:12]
        return f"{split}_{modality}_{digest}"

    def _read_cache(self, key: str) -> tuple[dict[str, dict], dict[str, tuple[torch.Tensor, int]]]:
        records, rows = {}, {}
        for p in sorted(self.cache.glob(f"{key}.rank*.jsonl")):
            for line in p.read_text().splitlines():
                if line.strip():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by an interrupt: that item is scored again
                    records[r["id"]] = r
        for p in sorted(self.cache.glob(f"{key}.rank*.rows*.pt")):
            blob = torch.load(p, weights_only=True)
            for i, item_id in enumerate(blob["ids"]):
                rows[item_id] = (blob["rows"][i], int(blob["labels"][i]))
        return records, rows

    def evaluate(self, em: EvalModel, items: Sequence[Item], split: str, modality: str,
                 prefix: str = DEFAULT_ANSWER_PREFIX, hint: str | None = None,
                 gather_rows: bool = False, keep_rows: bool = True,
                 ) -> tuple[list[dict], dict[str, tuple[torch.Tensor, int]]]:
        """Records for all ``items`` (gathered over ranks, in item order) and kept rows
        (this rank's, or all ranks' with ``gather_rows``). ``keep_rows=False`` (splits
        whose logits rows are never used: dev, IDK) does not write the rows to the cache."""
        key = self._key(em, split, modality, prefix, hint)
        if key not in self._memo:
            self._memo[key] = self._read_cache(key)
        cached, cached_rows = self._memo[key]
        mine = items[self.dist.rank::self.dist.world]
        todo = [it for it in mine if it.id not in cached]
        stem = f"{key}.rank{self.dist.rank}of{self.dist.world}"
        n_chunks = len(list(self.cache.glob(f"{stem}.rows*.pt")))
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not self.cfg.progress,
                   desc=f"{em.name} {split}/{modality}" + (f" [{prefix}]" if prefix != DEFAULT_ANSWER_PREFIX else ""),
                   leave=False)
        with open(self.cache / f"{stem}.jsonl", "a") as fh:
            for batch in score_items(em, todo, method=self.cfg.method, answer_prefix=prefix,
                                     with_image=modality == "image", hint=hint,
                                     batch_size=self.cfg.batch_size,
                                     max_new_tokens=self.cfg.max_new_tokens,
                                     row_dtype=self.row_dtype):
                if keep_rows and batch.rows is not None and batch.row_ids:
                    # rows first: a record without its row would be a silent gap on resume
                    torch.save({"ids": batch.row_ids, "rows": batch.rows, "labels": batch.labels},
                               self.cache / f"{stem}.rows{n_chunks}.pt")
                    n_chunks += 1
                    for i, item_id in enumerate(batch.row_ids):
                        cached_rows[item_id] = (batch.rows[i], int(batch.labels[i]))
                for r in batch.records:
                    fh.write(json.dumps(r) + "\n")
                    cached[r["id"]] = r
                fh.flush()
                bar.update(len(batch.records))
        bar.close()
        mine_ids = {it.id for it in mine}
        local = {i: cached[i] for i in mine_ids}
        merged: dict[str, dict] = {}
        for part in self.dist.gather(local):
            merged.update(part)
        records = [merged[it.id] for it in items]
        rows = {i: r for i, r in cached_rows.items() if i in mine_ids}
        if gather_rows:
            all_rows: dict[str, tuple[torch.Tensor, int]] = {}
            for part in self.dist.gather(rows):
                all_rows.update(part)
            rows = all_rows
        return records, rows


def _stack(rows: dict[str, tuple[torch.Tensor, int]], ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [i for i in ids if i in rows]
    if not ids:
        return torch.empty(0, 1), torch.empty(0, dtype=torch.int64)
    return (torch.stack([rows[i][0] for i in ids]),
            torch.tensor([rows[i][1] for i in ids], dtype=torch.int64))


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
          data_info: dict) -> list[Item]:
    if path is None:
        return []
    res: LoadResult = load_items(path, images)
    if limit is not None:
        res.items = res.items[:limit]
    data_info[name] = {"path": str(path), "n_items": len(res.items),
                       "n_skipped": len(res.skipped), "skipped": res.skipped}
    return res.items


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Run the whole method and write ``report.json``/``report.md``/PNGs to ``cfg.out``.

    Returns the report dict (every rank gets it; only rank 0 writes files).
    """
    cfg.validate()
    dist = _Dist()
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _run(cfg: EvalConfig, dist: _Dist) -> dict[str, Any]:
    data_info: dict[str, Any] = {}
    lim = {s: cfg.split_limits.get(s, cfg.limit) for s in ("test", "calib", "dev", "idk")}
    test = _load(cfg.test, cfg.images, "test", lim["test"], data_info)
    calib = _load(cfg.calib, cfg.images, "calib", lim["calib"], data_info)
    dev = _load(cfg.dev, cfg.images, "dev", lim["dev"], data_info)
    idk_items = _load(cfg.idk, cfg.images, "idk", lim["idk"], data_info)
    if not test:
        raise ValueError(f"{cfg.test}: no usable test items (see the skipped-item messages above)")
    if not idk_items and cfg.build_idk:
        idk_items = build_idk_set(test, seed=cfg.seed)[: lim["idk"]]
        data_info["idk"] = {"path": None, "built_from": "test", "n_items": len(idk_items),
                            "n_skipped": 0, "skipped": []}
    ev = _Evaluator(cfg, dist)
    models_out = []
    for spec in cfg.models:
        em = load_model(spec, device=cfg.device, dtype=cfg.dtype, chat_template=cfg.chat_template)
        modalities = [m for m in cfg.modalities if m == "text" or em.multimodal]
        entry: dict[str, Any] = {"name": em.name, "path": em.path, "multimodal": em.multimodal,
                                 "modalities": {}, "idk": {}, "prompt_optimization": None}
        for mod in modalities:
            entry["modalities"][mod] = _eval_modality(ev, em, mod, test, calib, dist)
        main_mod = modalities[0]
        for variant in (cfg.idk_variants if idk_items else ()):
            recs, _ = ev.evaluate(em, idk_items, "idk", main_mod, hint=ABSTENTION_HINTS[variant],
                                  keep_rows=False)
            res = idk_metrics(recs)
            res["answered_ece"] = _answered_ece(recs, cfg.n_bins)
            entry["idk"][variant] = res
        if cfg.optimize_prompts and dev:
            entry["prompt_optimization"] = _optimize(ev, em, main_mod, dev, test, dist)
        models_out.append(entry)
        del em
    report = {"schema_version": 1, "config": asdict(cfg), "data": data_info,
              "models": models_out, "world_size": dist.world}
    report["summary"] = _summary(report, cfg)
    if dist.rank == 0:
        write_report(report, cfg.out, plots=cfg.plots)
    return report


def _eval_modality(ev: _Evaluator, em: EvalModel, mod: str, test: list[Item],
                   calib: list[Item], dist: _Dist) -> dict[str, Any]:
    cfg = ev.cfg
    temperature = None
    n_calib = 0
    if calib and cfg.method != "verbalized":
        _, crow = ev.evaluate(em, calib, "calib", mod, gather_rows=True)
        rows, labels = _stack(crow, [it.id for it in calib])
        n_calib = int(rows.shape[0])
        if n_calib:
            temperature = fit_temperature_rows(rows, labels, cfg.temperature_method)
    records, trow = ev.evaluate(em, test, "test", mod)
    out: dict[str, Any] = {"test": calibration_metrics(records, cfg.n_bins),
                           "test_after_temperature": None, "temperature": temperature,
                           "temperature_method": cfg.temperature_method, "n_calib_rows": n_calib}
    hist = _histogram_ece(records[dist.rank::dist.world], dist, cfg.n_bins)
    if hist is not None:
        out["test"]["ece_histogram_all_reduce"] = hist["ece"]
    if temperature is not None:
        ids = [it.id for it in test[dist.rank::dist.world] if it.id in trow]
        local = {}
        if ids:
            rows, _ = _stack(trow, ids)
            conf_t = mllmcal.token_stats(rows, temperature=temperature).confidence
            local = {i: float(c) for i, c in zip(ids, conf_t.tolist(), strict=True)}
        conf_by_id: dict[str, float] = {}
        for part in dist.gather(local):
            conf_by_id.update(part)
        scaled = [{**r, "confidence": conf_by_id.get(r["id"]) if r["pred"] is not None else None}
                  for r in records]
        out["test_after_temperature"] = calibration_metrics(scaled, cfg.n_bins)
    return out


def _optimize(ev: _Evaluator, em: EvalModel, mod: str, dev: list[Item], test: list[Item],
              dist: _Dist) -> dict[str, Any]:
    from .prompt_opt import make_proposer, optimize_prompts

    cfg = ev.cfg
    proposer = make_proposer(cfg.proposer, device=cfg.device, seed=cfg.seed)

    def score(prefix: str) -> tuple[float, float]:
        recs, _ = ev.evaluate(em, dev, "dev", mod, prefix=prefix, keep_rows=False)
        m = calibration_metrics(recs, cfg.n_bins)
        return (m["accuracy"] or 0.0, m["ece"] if m["ece"] is not None else 1.0)

    res = optimize_prompts(score, proposer, seeds=cfg.seed_prompts, k=cfg.ape_k, m=cfg.ape_m,
                           n_rounds=cfg.ape_rounds, progress=cfg.progress and dist.rank == 0,
                           broadcast=dist.broadcast if dist.on else None)
    out = res.to_dict()
    out["test"] = {}
    for p in dict.fromkeys([res.seed, res.best]):
        recs, _ = ev.evaluate(em, test, "test", mod, prefix=p)
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
    if po:
        seed, best = po["test"][po["seed_prompt"]], po["test"][po["best_prompt"]]
        summary["prompt_optimization"] = {
            "seed_prompt": po["seed_prompt"], "best_prompt": po["best_prompt"],
            "seed": {"accuracy": seed["accuracy"], "ece": seed["ece"]},
            "best": {"accuracy": best["accuracy"], "ece": best["ece"]},
            "rounds": len(po["trajectory"]) - 1,
        }
    return summary
