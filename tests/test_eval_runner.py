"""The evaluation end to end on tiny random checkpoints: confidence against its float64
definition, temperature scaling, resume from the cache, a two-process gloo run, and the
calib split's one-pass temperature fit (no logits rows stored)."""

import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from checkpoints import build_tiny_checkpoint
from helpers import COLOURS, colour_questions
from PIL import Image

import mllmcal
from mllmcal.eval import runner
from mllmcal.eval.confidence import score_items
from mllmcal.eval.data import load_items
from mllmcal.eval.models import load_model
from mllmcal.eval.runner import EvalConfig, fit_calib_temperature, run_eval


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return colour_questions(tmp_path_factory.mktemp("data"), {"test": 14, "calib": 12, "dev": 6})


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    words = ["What colour is shape ?", *COLOURS, *map(str, range(20))]
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llava"), words, multimodal=True)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    words = ["What colour is shape ?", *COLOURS, *map(str, range(20))]
    return build_tiny_checkpoint(tmp_path_factory.mktemp("llama"), words, multimodal=False, seed=1)


def _close(a, b):
    """Equal up to float noise: padding differs between batch compositions (resume, shards)."""
    a, b = json.loads(json.dumps(a)), json.loads(json.dumps(b))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    else:
        assert a == b


def _cfg(data_dir, models, out, **kw):
    base = dict(models=[str(m) for m in models], test=str(data_dir / "test.json"),
                calib=str(data_dir / "calib.json"), dev=str(data_dir / "dev.json"),
                out=str(out), progress=False, plots=False, batch_size=4)
    base.update(kw)
    return EvalConfig(**base)


@pytest.mark.parametrize("n_options", [4, 2])
@pytest.mark.parametrize("with_image", [True, False])
def test_letter_confidence_is_the_float64_probability_of_the_first_letter(
        data_dir, llava_dir, with_image, n_options):
    """The first generated token that is one of the ITEM's letters (with 2 options, "C" is
    no answer and decoding goes on), its float64 probability at that step."""
    em = load_model(str(llava_dir))
    items = load_items(data_dir / "test.json").items[:6]
    if n_options < 4:
        items = [it.with_(options=it.options[:n_options],
                          answer=it.answer if it.answer_index < n_options else "A")
                 for it in items]
    recs = [r for b in score_items(em, items, with_image=with_image, batch_size=3) for r in b.records]
    skipped_letters = 0
    for it, rec in zip(items, recs, strict=True):
        prompt = em.render(it, with_image=with_image)
        img = [Image.open(it.image).convert("RGB")] if with_image else None
        inputs = em.encode([prompt], img)
        # greedy decode by hand, in float64 softmax, until a letter shows up
        ids = inputs["input_ids"]
        for step in range(20):  # noqa: B007 -- step is checked after the loop
            with torch.no_grad():
                logits = em.model(**{**inputs, "input_ids": ids,
                                     "attention_mask": torch.ones_like(ids)}).logits[0, -1]
            p = torch.softmax(logits.double(), -1)
            tok = int(p.argmax())
            letter = int(em.letter_of_token[tok])
            if 0 <= letter < len(it.options):
                break
            skipped_letters += letter >= 0
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
        else:
            assert rec["pred"] is None
            continue
        assert rec["pred"] == "ABCDEFGH"[letter] and rec["step"] == step
        assert rec["confidence"] == pytest.approx(float(p[tok]), rel=1e-4, abs=1e-6)
        assert rec["correct"] == (rec["pred"] == it.answer)
    print(f"letters of no option passed over: {skipped_letters}")
    # this fixture's model does write such letters first: the check above can tell
    assert skipped_letters > 0


def test_option_softmax_and_verbalized_methods(data_dir, causal_dir):
    em = load_model(str(causal_dir))
    items = load_items(data_dir / "test.json").items[:5]
    batches = list(score_items(em, items, method="option-softmax", batch_size=5))
    (b,) = batches
    assert b.rows.shape == (5, 8)
    for i, it in enumerate(items):
        enc = em.encode([em.render(it, with_image=False)], None)
        with torch.no_grad():
            last = em.model(**enc).logits[0, -1].double()
        restricted = last[em.answer_token_ids()[:4]]
        p = torch.softmax(restricted, -1)
        assert b.records[i]["pred"] == "ABCD"[int(p.argmax())]
        assert b.records[i]["confidence"] == pytest.approx(float(p.max()), rel=1e-3)
        assert int(b.labels[i]) == it.answer_index
    verb = [r for bb in score_items(em, items, method="verbalized") for r in bb.records]
    assert len(verb) == 5 and all("parse_failure" in r for r in verb)
    assert all(r["confidence"] is None for r in verb if r["parse_failure"])


def test_end_to_end_report_two_models_and_resume(data_dir, llava_dir, causal_dir, tmp_path,
                                                  caplog):
    cfg = _cfg(data_dir, [llava_dir, causal_dir], tmp_path / "out", optimize_prompts=True,
               ape_k=2, ape_m=2, ape_rounds=1, temperature_method="grid", plots=True)
    report = run_eval(cfg)
    s = report["summary"]
    for key in ("accuracy", "ece", "ece_after_temperature", "temperature", "idk_rate",
                "false_idk_rate", "prompt_optimization"):
        assert key in s
    assert 0.01 <= s["temperature"] <= 9.99 and s["n_items"] == 14
    llava, llama = report["models"]
    assert set(llava["modalities"]) == {"image", "text"} and set(llama["modalities"]) == {"text"}
    for m in report["models"]:
        for r in m["modalities"].values():
            t = r["test"]
            assert t["n_scored"] + t["n_no_answer"] == 14
            if "ece_histogram_all_reduce" in t and t["ece"] is not None:
                assert t["ece_histogram_all_reduce"] == pytest.approx(t["ece"], abs=1e-6)
        assert set(m["idk"]) == {"plain", "invite", "strict"}
        assert m["idk"]["plain"]["n_unanswerable"] == 14
    po = s["prompt_optimization"]
    assert po["seed_prompt"] == "Answer" and po["rounds"] == 1
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["summary"] == json.loads(json.dumps(s))
    assert "## I don't know" in (out / "report.md").read_text()
    assert (out / f"reliability_{llava['name']}_image.png").stat().st_size > 1000
    _assert_no_rows_cached(out / "cache")

    # interrupt: a batch file lost, another cut short by a kill; the result must not change
    batches = sorted((out / "cache").glob("test_image_*.rank0of1.*.pt"), key=lambda p: p.name)
    assert len(batches) >= 3
    batches[-1].unlink()
    damaged = batches[0]
    damaged.write_bytes(damaged.read_bytes()[:40])
    with caplog.at_level("WARNING", logger="mllmcal.eval"):
        again = run_eval(cfg)
    _close(again["summary"], report["summary"])
    assert f"discarding damaged cache file {damaged}" in caplog.text
    assert not damaged.exists() and not list((out / "cache").glob(".*.tmp"))


def test_cache_follows_the_data_and_the_weights(data_dir, tmp_path):
    words = ["What colour is shape ?", *COLOURS, *map(str, range(20))]
    model = build_tiny_checkpoint(tmp_path / "m", words, multimodal=False, seed=4)
    # eight options, so that every letter the random model may say is an option
    options = [*COLOURS, "1", "2", "3", "4"]
    items = [{"id": f"t{i}", "question": f"What colour is shape {i} ?", "options": options,
              "answer": "A"} for i in range(8)]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "test.jsonl").write_text("\n".join(map(json.dumps, items)))
    cfg = _cfg(tmp_path / "d", [model], tmp_path / "out", calib=None, dev=None, build_idk=False,
               idk_variants=(), test=str(tmp_path / "d" / "test.jsonl"))
    first = run_eval(cfg)["models"][0]["modalities"]["text"]["test"]
    # same ids, other answers: the accuracy must be the new data's, not the cached one
    preds = [r["pred"] for p in (tmp_path / "out" / "cache").glob("test_text_*.pt")
             for r in torch.load(p)["records"]]
    common = max(set(preds), key=preds.count)
    assert common is not None and common != "A" or first["accuracy"] > 0
    for it in items:
        it["answer"] = common if common != "A" else "B"
    (tmp_path / "d" / "test.jsonl").write_text("\n".join(map(json.dumps, items)))
    fresh = run_eval(replace(cfg, out=str(tmp_path / "fresh")))["models"][0]["modalities"]["text"]["test"]
    reused = run_eval(cfg)["models"][0]["modalities"]["text"]["test"]
    assert reused["accuracy"] == fresh["accuracy"] != first["accuracy"]
    # other weights at the same path: scored again, not read from the cache
    build_tiny_checkpoint(tmp_path / "m", words, multimodal=False, seed=5)
    fresh = run_eval(replace(cfg, out=str(tmp_path / "fresh2")))["models"][0]["modalities"]["text"]["test"]
    reused = run_eval(cfg)["models"][0]["modalities"]["text"]["test"]
    _close(reused, fresh)
    assert reused["mean_confidence"] != pytest.approx(first["mean_confidence"], abs=1e-6)


def _worker(rank, world, port, cfg_kwargs, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MLLMCAL_DIST_BACKEND="gloo")
    torch.set_num_threads(1)
    report = run_eval(EvalConfig(**cfg_kwargs))
    queue.put((rank, json.dumps(report["models"]), json.dumps(report["summary"])))


def test_two_process_gloo_run_equals_single_process(data_dir, llava_dir, tmp_path):
    single = run_eval(_cfg(data_dir, [llava_dir], tmp_path / "single", temperature_method="onepass"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = {**_cfg(data_dir, [llava_dir], tmp_path / "dist", temperature_method="onepass").__dict__}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, kw, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # item shards were scored by different processes
    shards = sorted({p.name.split(".")[1] for p in (tmp_path / "dist" / "cache").glob("test_image_*.pt")})
    assert shards == ["rank0of2", "rank1of2"]
    # each rank fitted on its own calib shard; the gathered states gave the single run's T
    calib_shards = sorted({p.name.split(".")[1] for p in (tmp_path / "dist" / "cache").glob("calib_*.pt")})
    assert calib_shards == ["rank0of2", "rank1of2"]
    _assert_no_rows_cached(tmp_path / "dist" / "cache")
    for _, models, summary in results:
        _close(json.loads(summary), single["summary"])
        _close(json.loads(models), single["models"])
    assert (tmp_path / "dist" / "report.json").is_file()


def test_protocol_paper_sets_the_papers_settings(data_dir, causal_dir, tmp_path):
    cfg = _cfg(data_dir, [causal_dir], tmp_path / "out", protocol="paper", n_bins=5,
               max_new_tokens=3, temperature_method="onepass", method="option-softmax",
               dev=None, build_idk=False, idk_variants=(), limit=4)
    report = run_eval(cfg)
    used = report["config"]
    assert (used["method"], used["max_new_tokens"], used["n_bins"], used["temperature_method"]) \
        == ("letter", 20, 10, "grid")
    t = report["models"][0]["modalities"]["text"]["test"]
    assert t["n_bins"] == 10 and t["n_items"] == 4
    assert isinstance(report["models"][0]["modalities"]["text"]["temperature_at_bound"], bool)
    with pytest.raises(ValueError, match="unknown protocol"):
        run_eval(_cfg(data_dir, [causal_dir], tmp_path / "o2", protocol="nope"))
    # settings named in keep stay as given
    kept = run_eval(replace(cfg, out=str(tmp_path / "o3"), keep=("n_bins",)))["config"]
    assert (kept["n_bins"], kept["max_new_tokens"], kept["method"]) == (5, 20, "letter")
    with pytest.raises(ValueError, match="keep names unknown settings"):
        run_eval(replace(cfg, keep=("nbins",)))


def _assert_no_rows_cached(cache):
    """Cache files hold records and, on the calib split, an O(K) accumulator state: no tensor."""
    files = list(cache.glob("*.pt"))
    assert files
    for p in files:
        blob = torch.load(p, weights_only=True)
        assert set(blob) == {"records", "fit"}
        stack = [blob]
        while stack:
            x = stack.pop()
            assert not isinstance(x, torch.Tensor), p
            stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, list) else ())
    calib = [torch.load(p, weights_only=True)["fit"] for p in cache.glob("calib_*.pt")]
    assert calib and all(f is not None for f in calib)


def _answer_rows(em, items, modality, batch_size):
    """The kept-rows way the eval fitted T before the one-pass accumulator: every answer row stacked."""
    batches = list(score_items(em, items, with_image=modality == "image", batch_size=batch_size))
    rows = torch.cat([b.rows for b in batches if b.rows is not None])
    labels = torch.cat([b.labels for b in batches if b.rows is not None])
    return rows, labels, [r for b in batches for r in b.records]


def _calib_with_an_interior_optimum(data_dir, em, modality, out):
    """The calib split relabelled so the model is right on two items in three: on random
    labels the tiny model's NLL falls all the way to T = infinity, which pins nothing."""
    items = load_items(data_dir / "calib.json").items
    _, _, recs = _answer_rows(em, items, modality, 4)
    pred = {r["id"]: r["pred"] for r in recs}
    raw = json.loads((data_dir / "calib.json").read_text())
    for i, it in enumerate(raw):
        p = pred[it["id"]] if pred[it["id"]] in ("A", "B", "C", "D") else "A"
        it["conversations"][1]["value"] = p if i % 3 else "ABCD"[("ABCD".index(p) + 1) % 4]
    path = out / "calib.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("method", ["grid", "onepass"])
def test_calib_split_fits_without_rows_the_temperature_of_the_stored_rows(
        data_dir, llava_dir, tmp_path, method):
    em = load_model(str(llava_dir))
    calib = _calib_with_an_interior_optimum(data_dir, em, "image", tmp_path)
    res = fit_calib_temperature(str(llava_dir), str(calib), str(tmp_path / "out"),
                                images=str(data_dir / "images"), modality="image",
                                temperature_method=method, batch_size=4)
    rows, labels, _ = _answer_rows(em, load_items(calib, data_dir / "images").items, "image", 4)
    assert res["n_rows"] == rows.shape[0] > 0 and res["n_items"] == 12
    exact = mllmcal.fit_temperature(rows, labels, method="newton")
    assert 0.05 < exact < 5  # an interior optimum, away from both ends of the grid
    if method == "grid":  # the paper's grid, one pass: the very grid point of the stored rows
        assert res["temperature"] == mllmcal.fit_temperature(rows, labels, method="grid")
        assert res["temperature"] == pytest.approx(exact, abs=0.005 + 1e-9)
    else:  # the one-pass refined fit: the accumulator's documented 0.5% of Newton's optimum
        assert res["temperature"] == pytest.approx(exact, rel=5e-3)
    _assert_no_rows_cached(tmp_path / "out" / "cache")


def test_calib_split_interrupted_and_resumed_fits_the_identical_temperature(
        data_dir, causal_dir, tmp_path, monkeypatch):
    calib = str(_calib_with_an_interior_optimum(data_dir, load_model(str(causal_dir)), "text",
                                                tmp_path))
    images = str(data_dir / "images")
    whole = fit_calib_temperature(str(causal_dir), calib, str(tmp_path / "whole"), images=images,
                                  batch_size=4)
    real = runner.score_items
    scored = []

    def killed_after_one_batch(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise KeyboardInterrupt  # as Ctrl-C while the second batch is scored
            yield batch

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            scored.extend(r["id"] for r in batch.records)
            yield batch

    monkeypatch.setattr(runner, "score_items", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        fit_calib_temperature(str(causal_dir), calib, str(tmp_path / "cut"), images=images,
                              batch_size=4)
    assert len(list((tmp_path / "cut" / "cache").glob("calib_*.pt"))) == 1
    monkeypatch.setattr(runner, "score_items", counting)
    resumed = fit_calib_temperature(str(causal_dir), calib, str(tmp_path / "cut"), images=images,
                                    batch_size=4)
    assert len(scored) == 12 - 4  # the first batch came from the cache
    assert resumed == whole and 0.01 < whole["temperature"] < 100
    # read back from the cache alone: nothing scored, the same T again
    scored.clear()
    again = fit_calib_temperature(str(causal_dir), calib, str(tmp_path / "cut"), images=images,
                                  batch_size=4)
    assert scored == [] and again == whole
    # one item edited: its whole batch is scored again (a batch state cannot drop an item),
    # the other batches come from the cache, and T is that of a fresh run on the new data
    raw = json.loads(Path(calib).read_text())
    turn = raw[5]["conversations"][0]
    turn["value"] = turn["value"].replace("shape 5 ?", "shape 7 ?")
    Path(calib).write_text(json.dumps(raw))
    scored.clear()
    edited = fit_calib_temperature(str(causal_dir), calib, str(tmp_path / "cut"), images=images,
                                   batch_size=4)
    assert sorted(scored) == [f"calib-{i}" for i in range(4, 8)]
    fresh = fit_calib_temperature(str(causal_dir), calib, str(tmp_path / "fresh"), images=images,
                                  batch_size=4)
    assert edited == fresh


def test_checkpoint_identity_sees_weights_swapped_with_their_old_time(tmp_path):
    """The cache key changes with the config and with weight bytes, even when a weight file
    keeps its size and modification time (cp -p of other weights); a copy of the same
    checkpoint elsewhere, times kept, has the same key."""
    import shutil

    from mllmcal.eval.cache import WEIGHT_SAMPLE_BYTES, WEIGHT_SAMPLES, checkpoint_identity

    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text('{"a": 1}')
    size = 3 * WEIGHT_SAMPLES * WEIGHT_SAMPLE_BYTES + 12345  # sampled, not read whole
    g = torch.Generator().manual_seed(0)
    blob = bytearray(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8).numpy().tobytes())
    w = ck / "model.safetensors"
    w.write_bytes(bytes(blob))
    small = ck / "adapter.bin"
    small.write_bytes(b"\x01" * 100)  # below the sample size: read whole
    base = checkpoint_identity(ck)
    assert checkpoint_identity(ck) == base

    copy = tmp_path / "copy"
    shutil.copytree(ck, copy, copy_function=shutil.copy2)
    assert checkpoint_identity(copy) == base

    def swapped(path, data):
        st = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_mtime_ns == st.st_mtime_ns and path.stat().st_size == st.st_size

    for where in (0, size - 1, (size - WEIGHT_SAMPLE_BYTES) // (WEIGHT_SAMPLES - 1) + 7):
        other = bytearray(blob)
        other[where] ^= 0xFF
        swapped(copy / "model.safetensors", bytes(other))
        assert checkpoint_identity(copy) != base, where
    swapped(copy / "model.safetensors", bytes(blob))
    assert checkpoint_identity(copy) == base
    swapped(copy / "adapter.bin", b"\x02" * 100)
    assert checkpoint_identity(copy) != base
    swapped(copy / "adapter.bin", b"\x01" * 100)
    (copy / "config.json").write_text('{"a": 2}')
    assert checkpoint_identity(copy) != base


def test_a_temperature_at_the_end_of_its_range_is_flagged_in_the_report(
        data_dir, causal_dir, tmp_path, monkeypatch):
    """The fit's at-bound flag reaches report.json and report.md (the flag itself is
    tested in test_calibration_onepass)."""
    calls = []

    def fake_fit_on_calib(ev, em, mod, calib):
        t, n, _, records = real_fit_on_calib(ev, em, mod, calib)
        calls.append(t)
        return 9.99, n, True, records

    real_fit_on_calib = runner._fit_on_calib
    monkeypatch.setattr(runner, "_fit_on_calib", fake_fit_on_calib)
    cfg = _cfg(data_dir, [causal_dir], tmp_path / "out", dev=None, build_idk=False,
               idk_variants=(), limit=4)
    report = run_eval(cfg)
    entry = report["models"][0]["modalities"]["text"]
    assert calls and entry["temperature"] == 9.99 and entry["temperature_at_bound"] is True
    md = (tmp_path / "out" / "report.md").read_text()
    assert "9.990 (end of the search range)" in md


def test_temperature_method_newton_is_the_deprecated_name_of_onepass(tmp_path):
    """The eval's "newton" never ran Newton (it is the one-pass refined fit): the old
    spelling still works, with a DeprecationWarning, and means "onepass"."""
    with pytest.warns(DeprecationWarning, match="onepass"):
        cfg = EvalConfig(models=["m"], test="t.json", out=str(tmp_path),
                         temperature_method="newton")
    assert cfg.temperature_method == "onepass"
    cfg.validate()
    with pytest.warns(DeprecationWarning):
        old = runner.new_fit_accumulator("newton")
    new = runner.new_fit_accumulator("onepass")
    assert old.to_dict() == new.to_dict()
    with pytest.raises(ValueError, match="temperature method"):
        runner.canonical_temperature_method("bisection")


def test_an_out_folder_inside_the_checkpoint_does_not_change_its_identity(data_dir, tmp_path):
    """The eval's report, plots and cache inside the checkpoint folder (or anything else
    kept beside the files loading reads) leave the identity alone: a rerun reuses the
    cache and the cache does not grow."""
    from mllmcal.eval.cache import checkpoint_identity

    words = ["What colour is shape ?", *COLOURS, *map(str, range(20))]
    ck = build_tiny_checkpoint(tmp_path / "ck", words, multimodal=False, seed=6)
    base = checkpoint_identity(ck)
    for out in (ck / "eval", ck):
        cfg = _cfg(data_dir, [ck], out, dev=None, build_idk=False, idk_variants=(), limit=4)
        first = run_eval(cfg)
        files = sorted(p.name for p in (out / "cache").glob("*.pt"))
        assert checkpoint_identity(ck) == base
        again = run_eval(cfg)
        assert sorted(p.name for p in (out / "cache").glob("*.pt")) == files
        _close(again["summary"], first["summary"])
    (ck / "logs").mkdir()
    (ck / "logs" / "run.json").write_text("{}")
    assert checkpoint_identity(ck) == base
    # what loading reads still counts, named chat templates included
    (ck / "additional_chat_templates").mkdir()
    (ck / "additional_chat_templates" / "tool.jinja").write_text("{{ x }}")
    assert checkpoint_identity(ck) != base


def test_item_digest_covers_every_image_and_the_answerable_flag(tmp_path):
    from mllmcal.eval.cache import item_digest
    from mllmcal.eval.data import Item

    for k, c in enumerate(((1, 2, 3), (4, 5, 6), (7, 8, 9))):
        Image.new("RGB", (8, 8), c).save(tmp_path / f"{k}.png")
    p = [str(tmp_path / f"{k}.png") for k in range(3)]
    base = Item("x", "Which? <image 2>", ("a", "b", "I don't know"), "A", images=(p[0], p[1]))
    d = item_digest(base)
    assert item_digest(base.with_(images=(p[0], p[2]))) != d  # the second image counts
    assert item_digest(base.with_(images=(p[0],))) != d
    assert item_digest(base.with_(unanswerable=True)) != d
    assert item_digest(base.with_(images=(p[0], p[1]))) == d


@pytest.mark.parametrize("method", ["letter", "option-softmax"])
def test_records_carry_each_options_probability(data_dir, llava_dir, method):
    """option-softmax: the softmax over the item's letters; letter: the full softmax of the
    answer step summed over each letter's tokens. The confidence is unchanged by them."""
    em = load_model(str(llava_dir))
    items = load_items(data_dir / "test.json").items[:6]
    items = [items[0].with_(options=items[0].options[:2], answer="A"), *items[1:]]
    rows = {}
    recs = []
    for b in score_items(em, items, method=method, batch_size=3):
        recs += b.records
        rows.update({i: b.rows[k] for k, i in enumerate(b.row_ids)})
    assert len(recs) == len(items)
    for it, r in zip(items, recs, strict=True):
        if r["pred"] is None:
            assert r["option_probs"] is None
            continue
        p = torch.tensor(r["option_probs"], dtype=torch.float64)
        assert p.shape == (len(it.options),)
        k = "ABCDEFGH".index(r["pred"])
        if method == "option-softmax":
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
            assert int(p.argmax()) == k and float(p[k]) == pytest.approx(r["confidence"], rel=1e-5)
        else:
            full = torch.softmax(rows[it.id].double(), dim=0)
            lo = em.letter_of_token.cpu()
            want = [float(full[lo == j].sum()) for j in range(len(it.options))]
            assert r["option_probs"] == pytest.approx(want, rel=1e-9, abs=1e-12)
            # the chosen token is one spelling of its letter
            assert float(p[k]) >= r["confidence"] - 1e-6


def test_report_has_category_rows_conformal_sets_and_selective_answering(causal_dir, tmp_path):
    words = ["a", "b", "c", "d"]
    rng = torch.Generator().manual_seed(3)
    (tmp_path / "d").mkdir()
    for split, n in (("test", 16), ("calib", 20)):
        rows = [{"id": f"{split}{i}", "question": f"What colour is shape {i} ?",
                 "options": COLOURS, "answer": "ABCD"[int(torch.randint(0, 4, (1,), generator=rng))],
                 "category": ["colour", "shape"][i % 2], "l2_category": words[i % 4]}
                for i in range(n)]
        (tmp_path / "d" / f"{split}.jsonl").write_text("\n".join(map(json.dumps, rows)))
    cfg = _cfg(tmp_path / "d", [causal_dir], tmp_path / "out", test=str(tmp_path / "d" / "test.jsonl"),
               calib=str(tmp_path / "d" / "calib.jsonl"), dev=None, build_idk=False,
               idk_variants=(), plots=True, alpha=0.2, target_risk=0.5,
               method="option-softmax")
    report = run_eval(cfg)
    m = report["models"][0]
    r = m["modalities"]["text"]
    cats = r["by_category"]
    assert set(cats) == {"category", "l2-category"}
    assert {k: v["n"] for k, v in cats["category"].items()} == {"colour": 8, "shape": 8}
    assert sum(v["n"] for v in cats["l2-category"].values()) == 16
    acc = sum(v["accuracy"] * v["n"] for v in cats["category"].values()) / 16
    assert acc == pytest.approx(r["test"]["accuracy"])
    cp = r["conformal"]
    assert cp["alpha"] == 0.2 and cp["n_calib"] == 20 and cp["n_test"] == 16
    for score in ("lac", "aps"):
        assert 0.0 <= cp[score]["coverage"] <= 1.0 and cp[score]["mean_set_size"] >= 1.0
        assert set(cp[score]["by"]["category"]) == {"colour", "shape"}
    sel = r["selective"]
    assert sel["target_risk"] == 0.5 and sel["calib"]["n"] == 20 and sel["test"]["n"] == 16
    if sel["calib"]["risk"] is not None:
        assert sel["calib"]["risk"] <= 0.5
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Per category (test split)" in md and "| colour |" in md
    assert "## Conformal prediction sets" in md and "| LAC | all |" in md
    assert "| APS | category: shape |" in md
    assert "## Selective answering" in md and "(target 0.5000)" in md
    assert r["risk_coverage_plot"] in m["plots"]
    assert (tmp_path / "out" / r["risk_coverage_plot"]).stat().st_size > 1000
    assert r["risk_coverage_plot"] in md
    # `mllmcal report` re-renders from report.json: the runner's plot stays listed
    from mllmcal.eval.report import report_problem, write_report

    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report_problem(again) is None
    write_report(again, tmp_path / "out")
    assert r["risk_coverage_plot"] in again["models"][0]["plots"]
    assert "## Conformal prediction sets" in (tmp_path / "out" / "report.md").read_text()
    # the numbers are what the conformal module gives on the records
    from mllmcal.calibration.conformal import conformal_summary, selective_answering

    em = load_model(str(causal_dir))
    recs = {}
    for split in ("calib", "test"):
        its = load_items(tmp_path / "d" / f"{split}.jsonl").items
        recs[split] = [rec for b in score_items(em, its, method="option-softmax",
                                                with_image=False) for rec in b.records]
    lab = {s: ["ABCD".index(x["answer"]) for x in recs[s]] for s in recs}
    ref = conformal_summary([x["option_probs"] for x in recs["calib"]], lab["calib"],
                            [x["option_probs"] for x in recs["test"]], lab["test"],
                            [x["correct"] for x in recs["test"]], alpha=0.2)
    for score in ("lac", "aps"):
        for key in ("coverage", "mean_set_size", "uacc"):
            assert cp[score][key] == pytest.approx(ref[score][key], rel=1e-9)
    ref_sel = selective_answering([x["confidence"] for x in recs["calib"]],
                                  [x["correct"] for x in recs["calib"]],
                                  [x["confidence"] for x in recs["test"]],
                                  [x["correct"] for x in recs["test"]], target_risk=0.5)
    _close(sel, ref_sel)
