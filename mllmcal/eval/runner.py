"""The paper's evaluation, end to end: ``run_eval(EvalConfig) -> report dict``.

For each model and modality (image+text, text only): score the calib split while fitting T
on it (answer letter's full-vocabulary NLL), score the test split with confidences at T = 1
and at the fitted T, report metrics at both; then the IDK set under the abstention prompt
variants, and optionally APE prompt optimisation on the dev split. From the records of
both splits (at T = 1): per-category rows, conformal prediction sets and selective
answering (:mod:`mllmcal.eval.answer_sets`), and the risk-coverage plot. Items with more
images than a model takes are left out of its image modality and listed there
(``skipped_items``), never cut to fewer images.

No logits rows are stored. The one ``[V]`` row per item at its answer position
lives only while its batch is scored: on the calib split it goes into a
:class:`~mllmcal.calibration.TemperatureFitAccumulator` (O(K) numbers per batch: the NLL and
its derivatives at K temperatures, or the paper's 999-point grid), on the test split it
gives the confidence at the fitted T (the calib split is fitted first). Storing the rows
instead costs O(items x V): 3 GB for 10k items at a 152k vocabulary in fp16.

Resuming (the files: :mod:`mllmcal.eval.cache`): a rerun scores only what the cache lacks.
On the calib split a cached batch counts as a whole (its state cannot be split by item): it
is used only if every one of its items is still in this rank's shard with the same
content, and the batch states are summed in the order of their first items. A run cut
between batches therefore resumes to the bit-identical temperature: the items left form
the same batches as in an uncut run, and the sum runs in the same order. (The test
split's key includes the fitted T, so it follows the calib split.)

Distributed (:mod:`mllmcal.eval.distributed`): items are sharded round-robin; per-item
records are gathered (``all_gather_object``), the calib split's per-batch accumulator
states are gathered and summed in item order on every rank (so every rank fits the same T,
whatever the order ranks finish in; a float64 ``all_reduce`` would sum in the backend's
order), and the histogram of the test split is summed with
:meth:`CalibrationState.all_reduce`. Metrics are computed on the gathered records in item
order, so they equal a single-process run. APE's proposals are rank 0's, broadcast.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import mllmcal

from ..calibration import CalibrationState, TemperatureFitAccumulator
from ..prompting import DEFAULT_ANSWER_PREFIX
from .answer_sets import category_rows, conformal_sets, risk_coverage_file, selective
from .cache import Batch, BatchCache, reusable_fit_batches
from .confidence import ScoredBatch, score_items, split_supported
from .config import (
    PROTOCOLS,
    TEMPERATURE_METHODS,
    EvalConfig,
    ModelSpec,
    canonical_temperature_method,
    new_fit_accumulator,
    parse_model_spec,
)
from .data import Columns, Item, LoadResult, load_items
from .distributed import Dist
from .idk import ABSTENTION_HINTS, build_idk_set, idk_metrics
from .models import EvalModel, load_model
from .report import calibration_metrics, plot_tags, write_report

# EvalConfig and its parts live in .config; they are re-exported here, where callers
# always found them.
__all__ = ["EvalConfig", "ModelSpec", "parse_model_spec", "run_eval", "fit_calib_temperature",
           "new_fit_accumulator", "canonical_temperature_method", "PROTOCOLS",
           "TEMPERATURE_METHODS"]

_log = logging.getLogger("mllmcal.eval")


# --------------------------------------------------------------------------- scoring


class _Evaluator:
    """Scores items through the batch cache: the scoring loop of every split."""

    def __init__(self, cfg: EvalConfig, dist: Dist) -> None:
        self.cfg = cfg
        self.dist = dist
        self.cache = BatchCache(Path(cfg.out) / "cache")
        # key -> (records by id, cached batches) already read or scored in this run: a key
        # scored again (a prompt APE proposes twice, the seed prompt's test split) is not
        # re-read
        self._memo: dict[str, tuple[dict[str, dict], list[Batch]]] = {}

    def _key(self, em: EvalModel, split: str, modality: str, prefix: str, hint: str | None,
             fit: str | None, temperature: float | None) -> str:
        # repr(float) round-trips: the same fitted T gives the same key
        return self.cache.key(em.path, split, modality, [
            str(em.dtype), self.cfg.method, prefix, hint, modality, self.cfg.max_new_tokens,
            em.use_chat_template, fit, None if temperature is None else repr(float(temperature)),
            # 4: records carry option_probs and the categories
            4, *([self.cfg.engine] if self.cfg.engine != "hf" else [])])

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
            self._memo[key] = self.cache.read(key)
        cached, batches = self._memo[key]
        mine = items[self.dist.rank::self.dist.world]
        digest = {it.id: self.cache.digest(it) for it in mine}
        parts: list[tuple[int, dict]] = []
        if fit is None:
            # a cached record counts only for an item with the same content
            todo = [it for it in mine
                    if it.id not in cached or cached[it.id].get("digest") != digest[it.id]]
        else:
            pos = {it.id: i for i, it in enumerate(items)}
            covered: set[str] = set()
            for first, recs, state in reusable_fit_batches(batches, digest, pos):
                for r in recs:  # the records of the batch whose state is used
                    cached[r["id"]] = r
                    covered.add(r["id"])
                parts.append((first, state))
            todo = [it for it in mine if it.id not in covered]
        stem = f"{key}.rank{self.dist.rank}of{self.dist.world}"
        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not self.cfg.progress,
                   desc=f"{em.name} {split}/{modality}" + (f" [{prefix}]" if prefix != DEFAULT_ANSWER_PREFIX else ""),
                   leave=False)
        for batch in _scorer(self.cfg)(em, todo, method=self.cfg.method, answer_prefix=prefix,
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
            self.cache.write(stem, batch.records, state)
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


def _scorer(cfg: EvalConfig) -> Any:
    """The engine's ``score_items`` (same signature, same :class:`ScoredBatch`)."""
    if cfg.engine == "vllm":
        from .vllm_engine import score_items_vllm

        return score_items_vllm
    return score_items


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


def _histogram_ece(records: Sequence[dict], dist: Dist, n_bins: int) -> dict[str, float] | None:
    """ECE/MCE of this rank's ``records`` in a CalibrationState summed over ranks with
    all_reduce (None if no item is scored)."""
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
          data_info: dict, columns: dict[str, str] | None = None,
          format: str | None = None) -> list[Item]:
    if path is None:
        return []
    res: LoadResult = load_items(path, images, columns=Columns(**(columns or {})), format=format)
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
    if cfg.optimize_prompts:
        from .prompt_opt import check_proposer

        check_proposer(cfg.proposer)  # before the scoring it would otherwise end
    dist = Dist()
    try:
        return _run(cfg, dist)
    finally:
        dist.close()


def _open_model(cfg: EvalConfig, spec: ModelSpec) -> EvalModel:
    if cfg.engine == "vllm":
        from .vllm_engine import load_vllm_model

        return load_vllm_model(spec.path, name=spec.name, dtype=spec.dtype or cfg.dtype,
                               chat_template=spec.chat_template or cfg.chat_template,
                               engine_args=cfg.engine_args)
    return load_model(spec.path, device=cfg.device, dtype=spec.dtype or cfg.dtype,
                      chat_template=spec.chat_template or cfg.chat_template, name=spec.name,
                      device_map=spec.device_map or cfg.device_map)


def _run(cfg: EvalConfig, dist: Dist) -> dict[str, Any]:
    data_info: dict[str, Any] = {}
    lim = {s: cfg.split_limits.get(s, cfg.limit) for s in ("test", "calib", "dev", "idk")}
    test, calib, dev, idk_items = (
        _load(getattr(cfg, s), cfg.images, s, lim[s], data_info, cfg.columns, cfg.format)
        for s in ("test", "calib", "dev", "idk"))
    if not test:
        raise ValueError(f"{cfg.test}: no usable test items (see the skipped-item messages above)")
    if cfg.optimize_prompts and not dev:
        raise ValueError(f"{cfg.dev}: no usable dev items to optimise prompts on (see the "
                         f"skipped-item messages above)")
    if not idk_items and cfg.build_idk:
        idk_items = build_idk_set(test, seed=cfg.seed)[: lim["idk"]]
        data_info["idk"] = {"path": None, "built_from": "test", "n_items": len(idk_items),
                            "n_skipped": 0, "skipped": []}
    ev = _Evaluator(cfg, dist)
    specs = cfg.model_specs()
    models_out, failed = [], []
    first_error: BaseException | None = None
    for spec, tag in zip(specs, plot_tags([s.name or s.path for s in specs]), strict=True):
        try:
            models_out.append(_eval_model(ev, cfg, spec, test, calib, dev, idk_items, dist,
                                          tag))
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
                dist: Dist, tag: str = "") -> dict[str, Any]:
    em = _open_model(cfg, spec)
    modalities = [m for m in cfg.modalities if m == "text" or em.multimodal]
    entry: dict[str, Any] = {"name": em.name, "path": em.path, "multimodal": em.multimodal,
                             "modalities": {}, "idk": {}, "prompt_optimization": None}
    main_mod = modalities[0]
    skipped: dict[str, list[list[str]]] = {}

    def takes(items: list[Item], split: str, mod: str) -> list[Item]:
        # items with more images than this model takes: skipped (and said), never cut
        kept, out = split_supported(em, items, with_image=mod == "image")
        skipped.setdefault(mod, []).extend([split, it.id, why] for it, why in out)
        return kept

    for mod in modalities:
        res = _eval_modality(ev, em, mod, takes(test, "test", mod), takes(calib, "calib", mod),
                             dist, f"{tag or em.name}_{mod}")
        res["skipped_items"] = skipped.get(mod, [])
        entry["modalities"][mod] = res
    idk_items, dev = takes(idk_items, "idk", main_mod), takes(dev, "dev", main_mod)
    entry["modalities"][main_mod]["skipped_items"] = skipped.get(main_mod, [])
    for variant in (cfg.idk_variants if idk_items else ()):
        recs, _ = ev.evaluate(em, idk_items, "idk", main_mod, hint=ABSTENTION_HINTS[variant])
        res = idk_metrics(recs)
        res["answered_ece"] = _answered_ece(recs, cfg.n_bins)
        entry["idk"][variant] = res
    if cfg.optimize_prompts:
        t_main = entry["modalities"][main_mod]["temperature"]
        entry["prompt_optimization"] = _optimize(ev, em, main_mod, dev, test, dist, t_main)
    return entry


def _fit_on_calib(ev: _Evaluator, em: EvalModel, mod: str, calib: Sequence[Item]
                  ) -> tuple[float | None, int, bool, list[dict]]:
    """T fitted on the calib split while it is scored, how many answer rows it used,
    whether T sits at the end of the search range (the optimum may lie beyond it), and the
    calib split's records (at T = 1; conformal sets and selective answering are fitted on
    them).

    One read of each item: each batch's answer rows go into the fit's accumulator and are
    dropped (see the module docstring); the states of all batches and ranks are summed."""
    records, acc = ev.evaluate(em, calib, "calib", mod, fit=ev.cfg.temperature_method)
    assert acc is not None
    n = acc.n_rows + acc.n_masked  # rows whose label had probability 0 are skipped by the fit
    if not acc.n_rows:
        return None, n, False, records
    t, info = acc.fit(return_info=True)
    return float(t), n, bool(info.get("at_bound", False)), records


def fit_calib_temperature(model: str | ModelSpec, calib: str, out: str, *,
                          images: str | None = None, modality: str = "image",
                          method: str = "letter", temperature_method: str = "grid",
                          device: str = "cpu", dtype: str = "auto", batch_size: int = 8,
                          limit: int | None = None,
                          columns: dict[str, str] | None = None,
                          format: str | None = None) -> dict[str, Any]:
    """Fit the temperature of one model on a calib split (what ``mllmcal fit`` prints).

    Scores are cached under ``out/cache`` like :func:`run_eval`'s, so the two share work.
    ``format`` names the file's layout (:data:`~mllmcal.eval.data.FORMAT_NAMES`; None:
    recognised from its columns).

    Returns:
        ``{"temperature": float | None, "temperature_at_bound": bool, "n_rows": int,
        "n_items": int, "n_skipped_items": int (more images than the model takes),
        "method": str, "modality": str}``; ``temperature`` is None when no
        item produced a letter; ``temperature_at_bound``: T is the end of the search range,
        where the optimum may lie beyond it.
    """
    cfg = EvalConfig(models=[model], test=calib, out=out, method=method, device=device,
                     dtype=dtype, batch_size=batch_size, temperature_method=temperature_method,
                     progress=False, format=format, limit=limit)
    cfg.validate()
    items = load_items(calib, images, columns=Columns(**(columns or {})),
                       format=format).items[:limit]
    spec = cfg.model_specs()[0]
    em = _open_model(cfg, spec)
    mod = modality if em.multimodal else "text"
    n_loaded = len(items)
    items, _ = split_supported(em, items, with_image=mod == "image")  # said in a warning
    dist = Dist()
    try:
        t, n, at_bound, _ = _fit_on_calib(_Evaluator(cfg, dist), em, mod, items)
    finally:
        dist.close()
    return {"temperature": t, "temperature_at_bound": at_bound, "n_rows": n,
            "n_items": len(items), "n_skipped_items": n_loaded - len(items),
            "method": cfg.temperature_method, "modality": mod}


def _eval_modality(ev: _Evaluator, em: EvalModel, mod: str, test: list[Item],
                   calib: list[Item], dist: Dist, tag: str = "") -> dict[str, Any]:
    cfg = ev.cfg
    temperature, n_calib, at_bound, calib_records = None, 0, False, []
    if calib and cfg.method != "verbalized":
        temperature, n_calib, at_bound, calib_records = _fit_on_calib(ev, em, mod, calib)
    elif calib:  # verbalized: no T, but the selective threshold is still chosen on calib
        calib_records, _ = ev.evaluate(em, calib, "calib", mod)
    records, _ = ev.evaluate(em, test, "test", mod, temperature=temperature)
    out: dict[str, Any] = {"test": calibration_metrics(records, cfg.n_bins),
                           "test_after_temperature": None, "temperature": temperature,
                           "temperature_method": cfg.temperature_method, "n_calib_rows": n_calib,
                           "temperature_at_bound": at_bound}
    hist = _histogram_ece(records[dist.rank::dist.world], dist, cfg.n_bins)
    if hist is not None:
        out["test"]["ece_histogram_all_reduce"] = hist["ece"]
    scaled = None
    if temperature is not None:
        scaled = [{**r, "confidence": r["confidence_t"] if r["pred"] is not None else None}
                  for r in records]
        out["test_after_temperature"] = calibration_metrics(scaled, cfg.n_bins)
    out["by_category"] = category_rows(records, cfg.n_bins, scaled)
    # conformal sets and the selective threshold: fitted on calib, measured on test, T = 1
    out["conformal"] = (conformal_sets(calib_records, records, cfg.alpha)
                        if calib_records else None)
    out["selective"] = selective(calib_records, records, cfg.target_risk) if calib_records \
        else None
    if cfg.plots and dist.rank == 0:
        # drawn here, where the per-item confidences are (report.json keeps none)
        name = risk_coverage_file(records, out["selective"],
                                  Path(cfg.out) / f"risk_coverage_{tag or em.name}.png",
                                  f"risk-coverage: {em.name} / {mod}")
        out["risk_coverage_plot"] = name
    return out


def _optimize(ev: _Evaluator, em: EvalModel, mod: str, dev: list[Item], test: list[Item],
              dist: Dist, temperature: float | None) -> dict[str, Any]:
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
