"""Parsers of the evaluation data: both formats, broken files, malformed items, bad images."""

import json
import logging

import pytest
from PIL import Image

from mllmcal.eval.data import DataError, load_items


def _png(path, color=(200, 10, 10)):
    Image.new("RGB", (12, 12), color).save(path)


def _llava(i, image=None, answer="B"):
    d = {"id": f"q{i}", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?\n(A) red\n(B) blue\n(C) green"},
        {"from": "gpt", "value": answer}]}
    if image:
        d["image"] = image
    return d


def test_llava_json_items_and_images_resolve_against_images_dir(tmp_path):
    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "x.json").write_text(json.dumps([_llava(0, "a.png"), _llava(1, answer="(C)")]))
    res = load_items(tmp_path / "x.json", images_dir=tmp_path / "imgs")
    assert [it.id for it in res.items] == ["q0", "q1"] and res.skipped == []
    a, b = res.items
    assert a.question == "What colour is it?" and a.options == ("red", "blue", "green")
    assert a.answer == "B" and a.image == str(tmp_path / "imgs" / "a.png")
    assert b.answer == "C" and b.image is None


def test_jsonl_accepts_list_dict_index_and_text_answers(tmp_path):
    rows = [
        {"id": 1, "question": "Q1?", "options": ["x", "y"], "answer": "B"},
        {"id": 2, "question": "Q2?", "options": {"A": "x", "B": "y", "C": "z"}, "answer": 2},
        {"id": 3, "question": "Q3?", "options": ["cat", "dog"], "answer": "dog"},
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    res = load_items(tmp_path / "x.jsonl")
    assert [(it.id, it.answer, len(it.options)) for it in res.items] == [
        ("1", "B", 2), ("2", "C", 3), ("3", "B", 2)]


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"id": "a",\n   "question": "x"\n  ,,\n]')
    with pytest.raises(DataError, match=r"broken\.json:4: invalid JSON"):
        load_items(p)


def test_invalid_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "broken.jsonl"
    good = json.dumps({"id": 1, "question": "Q?", "options": ["a", "b"], "answer": "A"})
    p.write_text(f"{good}\n{good.replace('1', '2')}\n{{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl:3: invalid JSON"):
        load_items(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="cannot read data file"):
        load_items(tmp_path / "nope.json")


def test_malformed_items_are_skipped_with_their_id_and_counted(tmp_path, caplog):
    items = [
        _llava(0),
        {"id": "no-conv", "conversations": [{"from": "human", "value": "Q?"}]},
        {"id": "no-options", "conversations": [{"from": "human", "value": "Q?"},
                                                {"from": "gpt", "value": "A"}]},
        _llava(3, answer="F"),
        {"id": "flat-no-answer", "question": "Q?", "options": ["a", "b"]},
        {"id": "one-option", "question": "Q?", "options": ["a"], "answer": "A"},
        "not an object",
        _llava(0),  # duplicate id
    ]
    (tmp_path / "x.json").write_text(json.dumps(items))
    with caplog.at_level(logging.WARNING, logger="mllmcal.eval"):
        res = load_items(tmp_path / "x.json")
    assert [it.id for it in res.items] == ["q0"]
    skipped = dict(res.skipped)
    assert set(skipped) == {"no-conv", "no-options", "q3", "flat-no-answer", "one-option",
                            "x.json[6]", "q0"}
    assert "not one of the option letters" in skipped["q3"]
    assert "duplicate" in skipped["q0"]
    for item_id in skipped:
        assert item_id in caplog.text


def test_unreadable_and_missing_images_are_skipped_with_id(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "x.json").write_text(json.dumps(
        [_llava(0, "ok.png"), _llava(1, "bad.png"), _llava(2, "missing.png")]))
    res = load_items(tmp_path / "x.json", images_dir=tmp_path)
    assert [it.id for it in res.items] == ["q0"]
    assert [i for i, _ in res.skipped] == ["q1", "q2"]
    assert all("unreadable image" in why for _, why in res.skipped)
