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
    with pytest.raises(DataError, match=r"data file .*nope\.json: cannot read"):
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


@pytest.mark.parametrize("question", [
    "What colour is it?\n(A) red\n(B) blue\n(C) green",
    "What colour is it?\nA. red\nB. blue\nC. green",
    "What colour is it?\nA) red\nB) blue\nC) green",
    "What colour is it? (A) red (B) blue (C) green",
    "What colour is it? A. red B. blue C. green",
    "What colour is it? A) red B) blue C) green",
])
def test_option_spellings_on_lines_and_inline(tmp_path, question):
    rows = [{"id": "llava", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": "C"}]},
            {"id": "flat", "question": question, "answer": "(B)"}]
    (tmp_path / "x.json").write_text(json.dumps(rows))
    res = load_items(tmp_path / "x.json")
    assert res.skipped == []
    for it, answer in zip(res.items, "CB", strict=True):
        assert it.question == "What colour is it?"
        assert it.options == ("red", "blue", "green") and it.answer == answer


def test_answers_match_letters_first_and_ambiguous_or_unmatched_answers_skip(tmp_path, caplog):
    rows = [
        {"id": "letter-first", "question": "Q?", "options": ["C", "A", "B"], "answer": "A"},
        {"id": "letter-and-text", "question": "Q?", "options": ["x", "y"], "answer": "B) y"},
        {"id": "text", "question": "Q?", "options": ["cat", "dog"], "answer": "Dog"},
        {"id": "contradiction", "question": "Q?", "options": ["x", "y"], "answer": "(A) y"},
        {"id": "two-texts", "question": "Q?", "options": ["x", "x", "y"], "answer": "x"},
        {"id": "no-match", "question": "Q?", "options": ["x", "y"], "answer": "z"},
        {"id": "nine", "question": "Q?", "options": list("123456789"), "answer": "A"},
        {"id": "one-inline", "question": "Q? (A) x", "answer": "A"},
    ]
    (tmp_path / "x.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with caplog.at_level(logging.WARNING, logger="mllmcal.eval"):
        res = load_items(tmp_path / "x.jsonl")
    assert [(it.id, it.answer) for it in res.items] == [
        ("letter-first", "A"), ("letter-and-text", "B"), ("text", "B")]
    why = dict(res.skipped)
    assert "ambiguous" in why["contradiction"] and "ambiguous" in why["two-texts"]
    assert "matches none" in why["no-match"]
    assert "at most 8 options" in why["nine"]
    assert "no options listed" in why["one-inline"]
    assert all(i in caplog.text for i in why)


def _png_bytes(color):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (9, 9), color).save(buf, format="PNG")
    return buf.getvalue()


def test_hugging_face_save_to_disk_with_image_bytes_and_column_flags(tmp_path, monkeypatch):
    import datasets

    from mllmcal.eval.data import Columns, find_split

    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    rows = {"qid": ["a", "b", "c"], "prompt": ["Colour?", "Shape?", "Size?"],
            "choices": [["red", "blue"], ["round", "square", "flat"], ["big", "small"]],
            "label": [1, 2, 1],  # option indices, as benchmarks store them
            "picture": [_png_bytes((200, 0, 0)), _png_bytes((0, 200, 0)), None]}
    feats = datasets.Features({"qid": datasets.Value("string"), "prompt": datasets.Value("string"),
                               "choices": datasets.Sequence(datasets.Value("string")),
                               "label": datasets.Value("int64"), "picture": datasets.Image()})
    rows["picture"] = [{"bytes": b, "path": None} if b else None for b in rows["picture"]]
    datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "data" / "test"))
    assert find_split(tmp_path / "data", "test") == tmp_path / "data" / "test"
    cols = Columns(question="prompt", options="choices", answer="label", image="picture", id="qid")
    res = load_items(tmp_path / "data" / "test", columns=cols)
    assert res.skipped == []
    a, b, c = res.items
    assert [(it.id, it.question, it.answer) for it in res.items] == [
        ("a", "Colour?", "B"), ("b", "Shape?", "C"), ("c", "Size?", "B")]
    with Image.open(b.image) as im:
        assert im.getpixel((0, 0)) == (0, 200, 0)
    assert c.image is None and str(tmp_path / "cache") in a.image


def test_parquet_with_image_paths_and_per_letter_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "0.png")
    table = pa.table({"index": [0, 1], "question": ["Which?", "Other?"],
                      "A": ["x", "p"], "B": ["y", "q"], "C": ["z", None], "D": [None, None],
                      "answer": ["C", "B"], "image": ["0.png", None]})
    pq.write_table(table, tmp_path / "test.parquet")
    res = load_items(tmp_path / "test.parquet")
    assert res.skipped == []
    assert [(it.id, it.options, it.answer) for it in res.items] == [
        ("0", ("x", "y", "z"), "C"), ("1", ("p", "q"), "B")]
    assert res.items[0].image == str(tmp_path / "images" / "0.png")


# ----------------------------------------------------------- results that were silently wrong


def test_misnamed_image_field_fails_at_load_naming_the_field(tmp_path, caplog):
    _png(tmp_path / "a.png")
    rows = [{"id": i, "question": "Colour?", "options": ["red", "blue"], "answer": "A",
             "image_path": "a.png"} for i in range(3)]
    (tmp_path / "x.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(DataError, match=r"image_path.*--image-column image_path"):
        load_items(tmp_path / "x.jsonl")
    from mllmcal.eval.data import Columns

    res = load_items(tmp_path / "x.jsonl", columns=Columns(image="image_path"))
    assert all(it.image == str(tmp_path / "a.png") for it in res.items)
    # a split with no image anywhere is legal (text-only), but said so
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": 1, "question": "Q?", "options": ["a", "b"],
                                                  "answer": "A"}))
    with caplog.at_level(logging.WARNING, logger="mllmcal.eval"):
        assert len(load_items(tmp_path / "t.jsonl")) == 1
    assert "no item has an image" in caplog.text


@pytest.mark.parametrize("idk", ["I don\u2019t know", "I don't know.", "i don't know",
                                 "I do not know", "I don't know"])
def test_idk_option_is_recognised_however_spelled(tmp_path, idk):
    from mllmcal.eval.idk import build_idk_set

    rows = [{"id": "u", "question": "Q?", "options": ["red", "blue", idk], "answer": "C"},
            {"id": "a", "question": "Q?", "options": ["red", "blue", idk], "answer": "A"}]
    (tmp_path / "x.jsonl").write_text("\n".join(map(json.dumps, rows)))
    u, a = load_items(tmp_path / "x.jsonl").items
    assert not u.answerable and a.answerable and u.idk_letter == a.idk_letter == "C"
    assert build_idk_set([u, a]) == []  # IDK items already: not turned into IDK variants


def test_the_datas_answerable_field_is_honoured(tmp_path):
    rows = [{"id": "marked", "question": "Q?", "options": ["red", "blue", "I don't know"],
             "answer": "A", "answerable": False},
            {"id": "no-idk-option", "question": "Q?", "options": ["red", "blue"], "answer": "A",
             "answerable": False},
            {"id": "contradiction", "question": "Q?", "options": ["red", "I don't know"],
             "answer": "B", "answerable": True},
            {"id": "plain", "question": "Q?", "options": ["red", "I don't know"], "answer": "A",
             "answerable": True}]
    (tmp_path / "x.jsonl").write_text("\n".join(map(json.dumps, rows)))
    res = load_items(tmp_path / "x.jsonl")
    assert [(it.id, it.answerable) for it in res.items] == [("marked", False), ("plain", True)]
    why = dict(res.skipped)
    assert "no option says" in why["no-idk-option"] and "is true" in why["contradiction"]


def test_integer_answer_that_is_both_an_index_and_an_option_text_is_skipped(tmp_path):
    rows = [{"id": "both", "question": "Q?", "options": ["1", "2", "3", "4"], "answer": 3},
            {"id": "same", "question": "Q?", "options": ["0", "1", "2"], "answer": 1},
            {"id": "text-only", "question": "Q?", "options": ["5", "6"], "answer": 5},
            {"id": "index", "question": "Q?", "options": ["x", "y"], "answer": 1}]
    (tmp_path / "x.jsonl").write_text("\n".join(map(json.dumps, rows)))
    res = load_items(tmp_path / "x.jsonl")
    assert [(it.id, it.answer) for it in res.items] == [("same", "B"), ("text-only", "A"),
                                                        ("index", "B")]
    assert "ambiguous" in dict(res.skipped)["both"]


def test_llava_trailing_instruction_is_not_part_of_the_last_option(tmp_path):
    human = ("<image>\nWhat color is the triangle?\n(A) red\n(B) green\n(C) blue\n(D) yellow\n"
             "(E) purple\n(F) orange\nAnswer with the option's letter from the given choices "
             "directly.")
    (tmp_path / "x.json").write_text(json.dumps([{"id": "q", "conversations": [
        {"from": "human", "value": human}, {"from": "gpt", "value": "F"}]}]))
    (it,) = load_items(tmp_path / "x.json").items
    assert it.options[-1] == "orange" and it.question == "What color is the triangle?"
    assert it.question_with_options.endswith("(F) orange")


def test_inline_options_with_initials_split_at_the_option_markers(tmp_path):
    rows = [{"id": "paren", "question": "Who wrote it? A) Mrs. A. Smith B) Mr. B. Jones",
             "answer": "B"},
            {"id": "brackets", "question": "Who wrote it? (A) Mrs. A. Smith (B) Mr. B. Jones",
             "answer": "A"}]
    (tmp_path / "x.jsonl").write_text("\n".join(map(json.dumps, rows)))
    for it in load_items(tmp_path / "x.jsonl").items:
        assert it.question == "Who wrote it?"
        assert it.options == ("Mrs. A. Smith", "Mr. B. Jones")


def test_16_bit_grayscale_png_reaches_the_model_scaled_to_8_bit(tmp_path, monkeypatch):
    import numpy as np

    from mllmcal.eval.confidence import _load_image

    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    wide = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert im.mode in ("I;16", "I")
    (tmp_path / "x.json").write_text(json.dumps([_llava(0, "g.png")]))
    (it,) = load_items(tmp_path / "x.json", images_dir=tmp_path).items
    shown = np.asarray(_load_image(it.image))  # what the processor is given
    assert shown.shape == (1, 3, 3) and shown[0, :, 0].tolist() == [0, 128, 255]
    assert (shown[..., 0] == shown[..., 2]).all()


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_too_deeply_is_a_data_error_naming_the_file(tmp_path, suffix):
    # the parser's RecursionError, read through mllmcal.eval._jsonio, names the file
    p = tmp_path / f"deep{suffix}"
    p.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"deep\{suffix}(:1)?: JSON nested too deeply"):
        load_items(p)
