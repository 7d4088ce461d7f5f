"""The demo recipe and checkpoint format: determinism, the prompt contract with the
evaluator, Auto-class round trip, generation, the data cache."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mllmcal.demo import build_dataset, demo_data_dir
from mllmcal.demo import train as demo_train
from mllmcal.demo.model import NUM_IMAGE_TOKENS
from mllmcal.demo.vision import _patch_labels, pretrain_vision
from mllmcal.prompting import ABSTENTION_HINTS, OPTION_LETTERS, build_prompt, chat_messages

SIZES = {"train": 150, "calib": 10, "dev": 10, "test": 40, "idk": 20}
# A few steps of the real recipe on a small data set: format and determinism, not quality.
SHORT = dataclasses.replace(demo_train.RECIPE, seed=1, sizes=SIZES, steps=6, cycles=2,
                            vision_steps=3, warmup_steps=2, focus_steps=4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-data")
    build_dataset(root, seed=1, sizes=SIZES)
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("demo-model")
    summary = demo_train.train_demo_model(data, model_dir, SHORT, progress=False)
    return model_dir, data, summary


def _load(model_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    return processor, model.eval()


def test_training_writes_checkpoint_recipe_and_summary(trained):
    model_dir, _, summary = trained
    n_steps = SHORT.steps * SHORT.cycles + SHORT.focus_steps
    assert summary["steps"] == n_steps and summary["examples"] == n_steps * SHORT.batch_size
    assert summary["threads"] == SHORT.threads and np.isfinite(summary["final_loss"])
    assert json.loads((model_dir / demo_train.RECIPE_FILE).read_text()) == SHORT.to_dict()
    assert json.loads((model_dir / demo_train.SUMMARY_FILE).read_text())["steps"] == n_steps


def test_the_recipe_run_twice_gives_bit_identical_weights(trained, tmp_path):
    model_dir, data, _ = trained
    demo_train.train_demo_model(data, tmp_path / "again", SHORT, progress=False)
    same = demo_train.compare_weights(tmp_path / "again", model_dir)
    assert same == {"identical_to_shipped": True, "max_abs_diff_to_shipped": 0.0}
    # ...and the comparison is not vacuous: one more step changes the weights.
    longer = dataclasses.replace(SHORT, steps=SHORT.steps + 1)
    demo_train.train_demo_model(data, tmp_path / "longer", longer, progress=False)
    other = demo_train.compare_weights(tmp_path / "longer", model_dir)
    assert other["identical_to_shipped"] is False and other["max_abs_diff_to_shipped"] > 0


def test_a_resumed_run_equals_the_uninterrupted_one(trained, tmp_path):
    """Cycle 0 saved, then cycle 1 resumed from it: bit-identical to the run in one go."""
    model_dir, data, _ = trained
    first = dataclasses.replace(SHORT, cycles=1, focus_steps=0)
    demo_train.train_demo_model(data, tmp_path / "c0", first, progress=False)
    assert demo_train.compare_weights(tmp_path / "c0", model_dir)["identical_to_shipped"] is False
    demo_train.train_demo_model(data, tmp_path / "c1", SHORT, progress=False,
                                resume_from=tmp_path / "c0", start_cycle=1)
    assert demo_train.compare_weights(tmp_path / "c1", model_dir)["identical_to_shipped"] is True
    with pytest.raises(ValueError, match="start_cycle"):
        demo_train.train_demo_model(data, tmp_path / "x", SHORT, resume_from=tmp_path / "c0",
                                    start_cycle=4)
    with pytest.raises(ValueError, match="go together"):
        demo_train.train_demo_model(data, tmp_path / "x", SHORT, start_cycle=1)


def test_the_focus_cycle_resumes_from_the_ordinary_cycles(trained, tmp_path):
    """The shipped model's last step: the ordinary cycles saved (the recipe without its
    focus cycle), the focus cycle resumed from them, bit-identical to the run in one go."""
    model_dir, data, _ = trained
    plain = dataclasses.replace(SHORT, focus_steps=0)
    assert plain.total_cycles == SHORT.cycles and SHORT.total_cycles == SHORT.cycles + 1
    demo_train.train_demo_model(data, tmp_path / "c", plain, progress=False)
    # Not vacuous: the focus cycle moves the weights.
    assert demo_train.compare_weights(tmp_path / "c", model_dir)["identical_to_shipped"] is False
    demo_train.train_demo_model(data, tmp_path / "f", SHORT, progress=False,
                                resume_from=tmp_path / "c", start_cycle=SHORT.cycles)
    assert demo_train.compare_weights(tmp_path / "f", model_dir)["identical_to_shipped"] is True
    # A different mix in the focus cycle gives different weights.
    more = dataclasses.replace(SHORT, focus_control_repeats=SHORT.focus_control_repeats + 3)
    demo_train.train_demo_model(data, tmp_path / "m", more, progress=False,
                                resume_from=tmp_path / "c", start_cycle=SHORT.cycles)
    assert demo_train.compare_weights(tmp_path / "m", model_dir)["identical_to_shipped"] is False


def test_recipe_rejects_bad_settings(data, tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        demo_train.train_demo_model(data, tmp_path, dataclasses.replace(SHORT, batch_size=0))
    with pytest.raises(ValueError, match="focus_control_repeats"):
        dataclasses.replace(SHORT, focus_control_repeats=0).validate()
    with pytest.raises(ValueError, match="plain_idk_fraction"):
        dataclasses.replace(SHORT, plain_idk_fraction=1.5).validate()
    with pytest.raises(FileNotFoundError, match="train.json"):
        demo_train.train_demo_model(tmp_path, tmp_path / "m", SHORT)


def test_lr_schedule_is_a_function_of_the_step_only():
    s = [demo_train._lr_scale(k, 100, 10, 0.02) for k in range(100)]
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(s[9:], s[10:], strict=False))
    assert s[-1] == pytest.approx(0.02, abs=1e-3)


# ----------------------------------------------------------------- the prompt contract


def _prompt_cases(data):
    items = json.loads((data / "idk.json").read_text()) + json.loads((data / "test.json").read_text())[:4]
    for it in items:
        q = it["conversations"][0]["value"]
        for hint in ABSTENTION_HINTS.values():
            for prefix in ("Answer", "The answer might be"):
                for with_image in ({True, False} if "image" in it else {False}):
                    yield it, q, prefix, with_image, hint


def test_chat_template_renders_build_prompt_and_trainer_ids_equal_the_processor(trained, monkeypatch):
    """What the evaluator does (chat template on ``chat_messages``, then the processor with
    special tokens on) is what the model was trained on, token for token, BOS once."""
    model_dir, data, _ = trained
    processor, _ = _load(model_dir, monkeypatch)
    tok = processor.tokenizer
    n = 0
    for it, q, prefix, with_image, hint in _prompt_cases(data):
        rendered = processor.apply_chat_template(
            chat_messages(q, prefix, with_image, hint), tokenize=False, continue_final_message=True)
        assert rendered == build_prompt(q, prefix, with_image, hint)
        assert demo_train.render_prompt(processor, q, prefix, with_image, hint) == rendered
        assert not rendered.startswith(tok.bos_token)
        image = Image.open(data / it["image"]) if with_image else None
        ids = processor(text=rendered, images=image)["input_ids"][0]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        assert demo_train._encode(tok, [rendered])[0] == ids
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert ids.count(processor.image_token_id) == (NUM_IMAGE_TOKENS if with_image else 0)
        n += 1
    assert n > 100


def test_the_letter_is_the_next_token_after_the_answer_opening(trained, monkeypatch):
    model_dir, data, _ = trained
    processor, _ = _load(model_dir, monkeypatch)
    tok = processor.tokenizer
    q = json.loads((data / "test.json").read_text())[0]["conversations"][0]["value"]
    for prefix in ("Answer", "The answer must be"):
        prompt = build_prompt(q, prefix, with_image=False)
        assert prompt.endswith(f"{prefix}: (")
        base = tok(prompt)["input_ids"]
        for letter in OPTION_LETTERS:
            letter_id = tok.convert_tokens_to_ids(letter)
            assert tok(prompt + letter)["input_ids"] == [*base, letter_id]
            assert tok.decode([letter_id]).strip() == letter


def test_hints_and_quotes_are_in_the_vocabulary(trained, monkeypatch):
    processor, _ = _load(trained[0], monkeypatch)
    for hint in filter(None, ABSTENTION_HINTS.values()):
        assert processor.tokenizer.unk_token_id not in processor.tokenizer(hint)["input_ids"]


# ----------------------------------------------------------------- checkpoint behaviour


def test_checkpoint_round_trips_through_auto_classes_and_generates(trained, monkeypatch):
    model_dir, data_dir, _ = trained
    processor, model = _load(model_dir, monkeypatch)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.image_seq_length == NUM_IMAGE_TOKENS
    item = json.loads((data_dir / "test.json").read_text())[0]
    prompt = build_prompt(item["conversations"][0]["value"], "The answer might be")
    inputs = processor(text=prompt, images=Image.open(data_dir / item["image"]), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert 1 <= new.numel() <= 4
    assert all(isinstance(processor.tokenizer.decode([int(t)]), str) for t in new)


def test_batched_left_padded_generation_matches_one_by_one(trained, monkeypatch):
    model_dir, data_dir, _ = trained
    processor, model = _load(model_dir, monkeypatch)
    items = [it for it in json.loads((data_dir / "idk.json").read_text()) if "image" in it][:3]
    prompts = [build_prompt(it["conversations"][0]["value"]) for it in items]
    # Different lengths, so that the batch really is padded.
    prompts[1] = prompts[1].replace("Answer:", "The answer must be:")
    images = [Image.open(data_dir / it["image"]) for it in items]
    batch = processor(text=prompts, images=images, return_tensors="pt", padding=True)
    assert (batch["attention_mask"][:, 0] == 0).any()
    with torch.inference_mode():
        scores = model.generate(**batch, max_new_tokens=1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True).scores[0]
        for i, (p, img) in enumerate(zip(prompts, images, strict=True)):
            one = processor(text=p, images=img, return_tensors="pt")
            single = model.generate(**one, max_new_tokens=1, do_sample=False, output_scores=True,
                                    return_dict_in_generate=True).scores[0][0]
            torch.testing.assert_close(scores[i], single, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- stage 1


def test_patch_labels_follow_the_scene_grid(tmp_path):
    from mllmcal.demo.shapes import GRID, OBJECT_COLORS, SHAPES

    build_dataset(tmp_path, seed=2, sizes={"train": 40, "calib": 0, "dev": 0, "test": 0, "idk": 0})
    items = json.loads((tmp_path / "train.json").read_text())
    paths, shape_y, color_y = _patch_labels(items)
    with_scene = [it for it in items if "scene" in it]
    assert paths == [it["image"] for it in with_scene]
    for it, s, c in zip(with_scene, shape_y, color_y, strict=True):
        expect_s = np.full(GRID * GRID, len(SHAPES))
        expect_c = np.full(GRID * GRID, len(OBJECT_COLORS))
        for obj in it["scene"]:
            k = obj["cell"][0] * GRID + obj["cell"][1]
            expect_s[k] = SHAPES.index(obj["shape"])
            expect_c[k] = list(OBJECT_COLORS).index(obj["color"])
        np.testing.assert_array_equal(s, expect_s)
        np.testing.assert_array_equal(c, expect_c)


def test_vision_pretraining_makes_patches_read_as_their_words(tmp_path):
    """Stage 1 alone: after 150 steps the projected patches name their shape and colour
    (chance is 1/4 and 1/7), and only the vision tower and projector changed."""
    from mllmcal.demo.model import init_demo_model

    build_dataset(tmp_path, seed=4, sizes={"train": 300, "calib": 0, "dev": 0, "test": 0, "idk": 0})
    items = json.loads((tmp_path / "train.json").read_text())
    model, processor = init_demo_model(tmp_path, seed=0)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    pixels = demo_train._pixel_cache(processor, tmp_path, items)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = pretrain_vision(model, processor.tokenizer, pixels, items, steps=150)
    finally:
        torch.set_num_threads(prev)
    assert out["steps"] == 150
    assert out["shape_accuracy"] > 0.6 and out["color_accuracy"] > 0.8, out
    for k, v in model.model.language_model.state_dict().items():
        torch.testing.assert_close(v, lm_before[k], rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------- data cache


def test_demo_data_dir_builds_once_then_reuses(tmp_path, monkeypatch):
    from mllmcal.demo import assets

    calls = []
    real = assets.build_dataset
    monkeypatch.setattr(assets, "build_dataset", lambda *a, **k: calls.append(k) or real(*a, **k))
    sizes = {"calib": 3, "dev": 2, "test": 4, "idk": 3}
    d = demo_data_dir(tmp_path, seed=5, sizes=sizes)
    assert d == tmp_path / f"{assets.DATA_VERSION}-seed5"
    assert (d / "test.json").is_file() and not (d / "train.json").exists()
    assert len(json.loads((d / "test.json").read_text())) == 4
    assert demo_data_dir(tmp_path, seed=5, sizes=sizes) == d and len(calls) == 1
    demo_data_dir(tmp_path, seed=5, sizes={**sizes, "test": 5})  # other sizes: rebuilt
    assert len(calls) == 2 and len(json.loads((d / "test.json").read_text())) == 5


def test_demo_data_dir_redoes_an_interrupted_build(tmp_path, monkeypatch):
    from mllmcal.demo import assets

    entry = tmp_path / f"{assets.DATA_VERSION}-seed0"
    entry.mkdir(parents=True)
    (entry / "half-written.json").write_text("x")
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path))
    d = demo_data_dir(sizes={"calib": 1, "dev": 1, "test": 1, "idk": 1})
    assert d == entry and not (d / "half-written.json").exists() and (d / assets.MARKER).is_file()
    with pytest.raises(ValueError, match="unknown split"):
        demo_data_dir(tmp_path, sizes={"tset": 3})
