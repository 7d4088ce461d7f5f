"""The shipped demo checkpoint: where it is, that it is the recipe's, that ``mllmcal demo``
never trains, and that it shows the paper's findings (headline figures pinned)."""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import pytest

from mllmcal.cli import main
from mllmcal.demo import demo_data_dir, demo_model_dir
from mllmcal.demo import train as demo_train
from mllmcal.demo.evaluate import demo_eval_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]

# The shipped model's headline figures on the first 300 test / 300 calib items and the 200
# IDK items, with margins. Measured (mllmcal demo through the evaluator, and the scorer):
# accuracy 0.790, ECE 0.150, T 1.68, ECE after T 0.077, text-only accuracy 0.25 (0.23 at
# the answer position alone), IDK rate plain 0.015 / invite 0.75-0.77, false IDK under invite 0.175.
# The full demo's numbers are in the README.
ACC_MIN = 0.74
ECE_MIN = 0.10
T_MIN = 1.4
ECE_AFTER_T_MAX_RATIO = 0.65
GAP_MIN = 0.35  # image+text accuracy minus text-only accuracy
PLAIN_IDK_MAX = 0.10
IDK_RAISE_MIN = 0.50  # invite IDK rate minus plain IDK rate
FALSE_IDK_MAX = 0.15  # the findings threshold (the shipped model: 0.111)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One evaluation-data cache for the module (``mllmcal demo`` renders it on first use)."""
    return tmp_path_factory.mktemp("mllmcal-cache")


@pytest.fixture
def no_training(monkeypatch):
    """Any training entry point called fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("mllmcal demo must not train")

    for name in ("train_demo_model", "pretrain_vision", "retrain"):
        monkeypatch.setattr(demo_train, name, boom)


def test_the_checkpoint_ships_in_the_package_and_is_the_recipes():
    d = demo_model_dir()
    assert d == ROOT / "mllmcal" / "demo" / "checkpoint"
    assert json.loads((d / demo_train.RECIPE_FILE).read_text()) == demo_train.RECIPE.to_dict()
    summary = json.loads((d / demo_train.SUMMARY_FILE).read_text())
    assert summary["steps"] == demo_train.RECIPE.total_steps
    assert summary["threads"] == demo_train.RECIPE.threads
    size = sum(p.stat().st_size for p in d.iterdir())
    assert size < 8 * 2**20, f"the shipped checkpoint is {size / 2**20:.1f} MiB"


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_package_data_covers_every_checkpoint_file():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["mllmcal"]
    for p in demo_model_dir().iterdir():
        rel = p.relative_to(ROOT / "mllmcal").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data"


def test_mllmcal_demo_never_trains_and_shows_the_findings(cache, monkeypatch, no_training,
                                                            tmp_path, capsys):
    """A small ``mllmcal demo`` (the real pipeline: generation, the evaluator's fit, IDK
    prompts, APE) on the shipped model, with every training entry point disabled."""
    monkeypatch.setenv("MLLMCAL_CACHE", str(cache))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--no-progress", "--n-test", "300", "--n-calib", "300",
            "--n-dev", "50", "--n-idk", "200", "--ape-rounds", "1", "--ape-k", "2", "--ape-m", "2"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["model"] == "demo" and "model: demo" in capsys.readouterr().out
    m = report["models"][0]
    img, txt = m["modalities"]["image"], m["modalities"]["text"]
    # Headline figures on this fixed subset (the full demo's numbers are in the README).
    assert s["accuracy"] >= ACC_MIN
    assert s["ece"] >= ECE_MIN and s["temperature"] >= T_MIN
    assert s["ece_after_temperature"] <= ECE_AFTER_T_MAX_RATIO * s["ece"]
    assert txt["test"]["accuracy"] <= img["test"]["accuracy"] - GAP_MIN
    plain, invite = m["idk"]["plain"], m["idk"]["invite"]
    assert plain["idk_rate"] <= PLAIN_IDK_MAX
    assert invite["idk_rate"] >= plain["idk_rate"] + IDK_RAISE_MIN
    assert invite["false_idk_rate"] <= FALSE_IDK_MAX


def _answer_position_figures(out: Path, limit: int) -> dict:
    """The paper's headline figures for the shipped checkpoint through the evaluator at the
    answer position only (one generated token), without prompt optimisation or plots: on
    the first ``limit`` items of ``test`` (image and text), T fitted on ``calib`` in one
    pass, and the ``idk`` split under each abstention hint."""
    import torch

    from mllmcal.eval.runner import run_eval

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = run_eval(demo_eval_config(
            str(demo_model_dir()), demo_data_dir(), out, limit=limit, max_new_tokens=1,
            batch_size=64, temperature_method="onepass", progress=False, plots=False))
    finally:
        torch.set_num_threads(prev)
    m = report["models"][0]
    img, txt = m["modalities"]["image"], m["modalities"]["text"]
    return {"accuracy": img["test"]["accuracy"], "ece": img["test"]["ece"],
            "temperature": img["temperature"],
            "ece_after_temperature": (img["test_after_temperature"] or {}).get("ece"),
            "text_only_accuracy": txt["test"]["accuracy"], "idk": m["idk"]}


def test_scorer_figures_on_a_fixed_subset(cache, monkeypatch, no_training, tmp_path):
    """The same findings at the answer position alone (one generated token, no prompt
    optimisation), so that a failure of the test above can be told apart from one in the
    later generation steps or APE."""
    monkeypatch.setenv("MLLMCAL_CACHE", str(cache))
    f = _answer_position_figures(tmp_path / "out", limit=300)
    assert f["accuracy"] >= ACC_MIN
    assert f["ece"] >= ECE_MIN and f["temperature"] >= T_MIN
    assert f["ece_after_temperature"] <= ECE_AFTER_T_MAX_RATIO * f["ece"]
    assert f["text_only_accuracy"] <= f["accuracy"] - GAP_MIN
    assert f["idk"]["plain"]["idk_rate"] <= PLAIN_IDK_MAX
    assert f["idk"]["invite"]["idk_rate"] >= f["idk"]["plain"]["idk_rate"] + IDK_RAISE_MIN
    assert f["idk"]["invite"]["false_idk_rate"] <= FALSE_IDK_MAX


def test_demo_retrain_reruns_the_recipe_and_evaluates_that_model(cache, monkeypatch, tmp_path):
    """``--retrain`` goes through ``retrain`` (stubbed here: the real one takes minutes;
    its determinism is tested in test_demo_model) and evaluates the model it wrote."""
    import shutil

    monkeypatch.setenv("MLLMCAL_CACHE", str(cache))
    calls = []

    def fake_retrain(out_dir, progress=True):
        calls.append(Path(out_dir))
        shutil.copytree(demo_model_dir(), out_dir)
        return {"steps": 0, "train_seconds": 0.0,
                **demo_train.compare_weights(Path(out_dir), demo_model_dir())}

    monkeypatch.setattr(demo_train, "retrain", fake_retrain)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--no-progress", "--retrain", "--n-test", "20",
            "--n-calib", "20", "--n-dev", "10", "--n-idk", "10", "--ape-rounds", "0"]
    assert main(argv) == 0
    assert calls == [out / "retrained-model"]
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["path"] == str(out / "retrained-model")


def test_the_shipped_processor_renders_and_tokenizes_like_the_trainer(cache, monkeypatch):
    """The shipped files carry today's chat template: chat_messages render to build_prompt
    and tokenize (special tokens on, BOS once) to the ids the trainer used."""
    from PIL import Image
    from transformers import AutoProcessor

    from mllmcal.demo.model import CHAT_TEMPLATE
    from mllmcal.prompting import ABSTENTION_HINTS, build_prompt, chat_messages

    monkeypatch.setenv("MLLMCAL_CACHE", str(cache))
    processor = AutoProcessor.from_pretrained(demo_model_dir())
    assert processor.chat_template == CHAT_TEMPLATE
    data = demo_data_dir()
    items = json.loads((data / "idk.json").read_text())[:12]
    for it in items:
        q = it["conversations"][0]["value"]
        with_image = "image" in it
        for hint in ABSTENTION_HINTS.values():
            rendered = processor.apply_chat_template(
                chat_messages(q, "Answer", with_image, hint), tokenize=False,
                continue_final_message=True)
            assert rendered == build_prompt(q, "Answer", with_image, hint)
            image = Image.open(data / it["image"]) if with_image else None
            ids = list(processor(text=rendered, images=image)["input_ids"][0])
            assert demo_train._encode(processor.tokenizer, [rendered])[0] == ids
            assert ids.count(processor.tokenizer.bos_token_id) == 1
