"""The demo's shapes VQA set: determinism, format, and answers re-derived from the scenes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from mllmcal.demo import build_dataset, make_item, render_scene
from mllmcal.demo.shapes import COLORS, PLURALS, SPLITS, quadrant
from mllmcal.prompting import IDK_OPTION_TEXT, IMAGE_TOKEN, parse_options

SIZES = {"train": 120, "calib": 20, "dev": 20, "test": 40, "idk": 60}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    return out, build_dataset(out, seed=3, sizes=SIZES)


def _load(paths):
    return {split: json.loads(p.read_text()) for split, p in paths.items()}


def _true_answer(stem: str, scene: list[dict]) -> str | None:
    """The answer text derived from the scene spec alone; None if the referent is absent."""
    if m := re.fullmatch(r"What color is the (\w+)\?", stem):
        objs = [o for o in scene if o["shape"] == m.group(1)]
        if not objs:
            return None
        assert len(objs) == 1, stem
        rgb = np.array(objs[0]["rgb"], dtype=float)
        # Hard items are painted part-way to another colour: the nearest name is the answer.
        return min(COLORS, key=lambda c: np.linalg.norm(rgb - np.array(COLORS[c])))
    if m := re.fullmatch(r"What shape is the (\w+) object\?", stem):
        objs = [o for o in scene if o["color"] == m.group(1)]
        if not objs:
            return None
        assert len(objs) == 1, stem
        return objs[0]["shape"]
    if m := re.fullmatch(r"How many (\w+) are in the image\?", stem):
        shape = {v: k for k, v in PLURALS.items()}[m.group(1)]
        n = sum(o["shape"] == shape for o in scene)
        return str(n) if n else None
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", stem):
        objs = [o for o in scene if o["color"] == m.group(1) and o["shape"] == m.group(2)]
        if not objs:
            return None
        assert len(objs) == 1, stem
        return quadrant(objs[0])
    raise AssertionError(f"unexpected question stem {stem!r}")


def test_same_seed_gives_identical_files_and_other_seed_differs(dataset, tmp_path):
    out, paths = dataset
    again = build_dataset(tmp_path / "again", seed=3, sizes=SIZES)
    for split in SPLITS:
        assert paths[split].read_bytes() == again[split].read_bytes(), split
    for item in json.loads(paths["test"].read_text())[:10]:
        a = np.asarray(Image.open(out / item["image"]))
        b = np.asarray(Image.open(tmp_path / "again" / item["image"]))
        np.testing.assert_array_equal(a, b)
    other = build_dataset(tmp_path / "other", seed=4, sizes={s: 0 for s in SPLITS} | {"test": 40})
    assert other["test"].read_bytes() != paths["test"].read_bytes()
    assert set(other) == {"test"}


def test_items_regenerate_from_seed_split_and_index(dataset):
    _, paths = dataset
    for split, items in _load(paths).items():
        for i in (0, len(items) - 1):
            assert make_item(3, split, i) == items[i]


def test_json_is_llava_style_and_well_formed(dataset):
    out, paths = dataset
    data = _load(paths)
    assert {s: len(v) for s, v in data.items()} == SIZES
    seen_ids = set()
    for items in data.values():
        for item in items:
            assert item["id"] not in seen_ids
            seen_ids.add(item["id"])
            human, gpt = item["conversations"]
            assert (human["from"], gpt["from"]) == ("human", "gpt")
            if "image" in item:
                assert human["value"].startswith(IMAGE_TOKEN + "\n")
                img = Image.open(out / item["image"])
                assert img.mode == "RGB" and img.size[0] <= 64 and img.size == img.size[::-1]
            else:
                assert IMAGE_TOKEN not in human["value"]
            stem, options = parse_options(human["value"])
            n = {"color": 6, "shape": 4, "count": 5, "position": 4}[item["qtype"]]
            n += IDK_OPTION_TEXT in options.values() and item["idk_kind"] != "option_removed"
            assert list(options) == list("ABCDEFGH"[:n]), item["id"]
            assert len(set(options.values())) == n
            if IDK_OPTION_TEXT in options.values():  # always offered last
                assert options[list(options)[-1]] == IDK_OPTION_TEXT, item["id"]
            assert gpt["value"] in options
            assert isinstance(item["answerable"], bool)


def test_answers_match_the_rendered_scene(dataset):
    out, paths = dataset
    data = _load(paths)
    checked = 0
    for split in ("train", "test", "calib"):
        for item in data[split]:
            if not item["answerable"]:
                continue
            pixels = np.asarray(Image.open(out / item["image"]))
            np.testing.assert_array_equal(pixels, np.asarray(render_scene(item["scene"])))
            stem, options = parse_options(item["conversations"][0]["value"])
            assert options[item["conversations"][1]["value"]] == _true_answer(stem, item["scene"])
            checked += 1
    assert checked > 100


def test_hard_items_exist_in_every_question_type(dataset):
    _, paths = dataset
    items = _load(paths)["train"] + _load(paths)["test"]
    hard_types = {it["qtype"] for it in items if it["hard"]}
    assert hard_types == {"color", "shape", "count", "position"}
    counts = [
        int(parse_options(it["conversations"][0]["value"])[1][it["conversations"][1]["value"]])
        for it in items
        if it["qtype"] == "count" and it["answerable"]
    ]
    assert max(counts) == 5 and min(counts) == 1


def test_idk_items_answer_with_the_idk_option_for_the_right_reason(dataset):
    out, paths = dataset
    data = _load(paths)
    kinds = set()
    for item in data["idk"] + data["train"]:
        stem, options = parse_options(item["conversations"][0]["value"])
        answer = options[item["conversations"][1]["value"]]
        if item["answerable"]:
            if item["idk_kind"] is None and IDK_OPTION_TEXT not in options.values():
                continue
            # Answerable controls offer IDK, but the true answer is there too.
            assert answer != IDK_OPTION_TEXT
            assert answer == _true_answer(stem, item["scene"])
            continue
        kinds.add(item["idk_kind"])
        assert answer == IDK_OPTION_TEXT, item["id"]
        if item["idk_kind"] == "option_removed":
            assert _true_answer(stem, item["scene"]) not in options.values()
        elif item["idk_kind"] == "mismatched_image":
            assert _true_answer(stem, item["scene"]) is None
            pixels = np.asarray(Image.open(out / item["image"]))
            np.testing.assert_array_equal(pixels, np.asarray(render_scene(item["scene"])))
        else:
            assert item["idk_kind"] == "image_withheld"
            assert "image" not in item and "scene" not in item
    assert kinds == {"option_removed", "mismatched_image", "image_withheld"}
    assert any(not it["answerable"] for it in data["train"])
    assert all(it["answerable"] for it in data["test"])


def test_bad_sizes_are_rejected_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        build_dataset(tmp_path, sizes={"valid": 3})
    with pytest.raises(ValueError, match=r"sizes\['test'\]"):
        build_dataset(tmp_path, sizes={"test": -1})
    with pytest.raises(ValueError, match="unknown split"):
        make_item(0, "nope", 0)
