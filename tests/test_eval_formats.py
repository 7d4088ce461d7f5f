"""Benchmark files as VLMEvalKit and lmms-eval ship them, built from their documented columns
with real PNG/JPEG bytes; and the demo's test split in every layout reads as its LLaVA JSON."""

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllmcal.eval.data import DataError, find_split, load_items
from mllmcal.eval.formats import detect_format

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

_N_DEMO = 80  # items of the demo's test split written in each layout (fast, all option counts)


def _img_bytes(color, fmt="PNG", size=(10, 8)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data):
    return base64.b64encode(data).decode()


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _write_tsv(path, rows, columns):
    lines = ["\t".join(columns)]
    for r in rows:
        lines.append("\t".join("" if r.get(c) is None else str(r[c]) for c in columns))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _struct(data):
    return {"bytes": data, "path": None}


# ------------------------------------------------------------------- demo split, every layout


def _demo_items():
    from mllmcal.demo import demo_data_dir

    d = demo_data_dir()
    rows = json.loads((d / "test.json").read_text())[:_N_DEMO]
    sub = d / "test.json"
    ref = load_items(sub).items[:_N_DEMO]
    assert len(ref) == _N_DEMO and [r["id"] for r in rows] == [it.id for it in ref]
    return ref


def _write_layouts(tmp, ref):
    """The demo items in every toolkit layout; returns {name: (path, format or None)}."""
    import datasets

    letters = "ABCDEFGH"
    n_opt = max(len(it.options) for it in ref)
    raw = [open(it.image, "rb").read() for it in ref]
    out = {}

    tsv_cols = ["index", "image", "image_path", "question", "hint", *letters[:n_opt], "answer",
                "category", "l2-category", "split"]
    tsv_rows = [{"index": it.id, "image": _b64(b), "image_path": f"{it.id}.png",
                 "question": it.question, "hint": "", "answer": it.answer, "category": "shapes",
                 "l2-category": "demo", "split": "dev",
                 **dict(zip(letters, it.options, strict=False))} for it, b in zip(ref, raw, strict=True)]
    _write_tsv(tmp / "vlmevalkit.tsv", tsv_rows, tsv_cols)
    out["vlmevalkit"] = tmp / "vlmevalkit.tsv"

    mmb = {c: [r.get(c) for r in tsv_rows] for c in tsv_cols if c not in ("image", "l2-category")}
    mmb["image"] = [_struct(b) for b in raw]
    mmb["L2-category"] = [r["l2-category"] for r in tsv_rows]
    mmb["hint"] = [None] * len(ref)
    pq.write_table(pa.table(mmb), tmp / "mmbench.parquet")
    out["mmbench"] = tmp / "mmbench.parquet"

    idx = [it.answer_index for it in ref]
    sqa = {"image": [_struct(b) for b in raw], "question": [it.question for it in ref],
           "choices": [list(it.options) for it in ref], "answer": idx, "hint": [""] * len(ref)}
    pq.write_table(pa.table(sqa), tmp / "scienceqa.parquet")
    out["scienceqa"] = tmp / "scienceqa.parquet"

    seed = {"question_id": [it.id for it in ref], "question": [it.question for it in ref],
            "answer": [it.answer for it in ref], "data_type": ["image"] * len(ref),
            "image": [[{"bytes": b, "path": None}] for b in raw]}
    for k, c in enumerate("abcdefgh"[:n_opt]):
        seed[f"choice_{c}"] = [it.options[k] if k < len(it.options) else None for it in ref]
    feats = datasets.Features({
        **{k: datasets.Value("string") for k in seed if k != "image"},
        "image": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(seed, features=feats).save_to_disk(str(tmp / "seedbench"))
    out["seedbench"] = tmp / "seedbench"

    mmmu = {"id": [it.id for it in ref], "question": [it.question for it in ref],
            "options": [str(list(it.options)) for it in ref], "answer": [it.answer for it in ref],
            "question_type": ["multiple-choice"] * len(ref),
            "image_1": [_struct(b) for b in raw], "image_2": [None] * len(ref)}
    feats = datasets.Features({**{k: datasets.Value("string") for k in mmmu
                                  if not k.startswith("image_")},
                               "image_1": datasets.Image(), "image_2": datasets.Image()})
    datasets.Dataset.from_dict(mmmu, features=feats).to_parquet(str(tmp / "mmmu.parquet"))
    out["mmmu"] = tmp / "mmmu.parquet"

    ai2d = {"question": [it.question for it in ref], "options": [list(it.options) for it in ref],
            "answer": [str(i) for i in idx], "image": [_struct(b) for b in raw]}
    feats = datasets.Features({"question": datasets.Value("string"),
                               "options": datasets.Sequence(datasets.Value("string")),
                               "answer": datasets.Value("string"), "image": datasets.Image()})
    datasets.Dataset.from_dict(ai2d, features=feats).save_to_disk(str(tmp / "ai2d"))
    out["ai2d"] = tmp / "ai2d"

    (tmp / "demo.jsonl").write_text("\n".join(json.dumps(
        {"id": it.id, "question": it.question, "options": list(it.options), "answer": it.answer,
         "image": it.image}) for it in ref))
    return out


def test_demo_split_in_every_layout_loads_as_its_llava_json(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    ref = _demo_items()
    files = _write_layouts(tmp_path, ref)
    for name, path in files.items():
        for fmt in (None, name):  # recognised from the columns, and forced
            res = load_items(path, format=fmt)
            assert res.skipped == [], (name, res.skipped[:3])
            got = res.items
            assert [(it.question, it.options, it.answer) for it in got] == \
                [(it.question, it.options, it.answer) for it in ref], name
            for a, b in zip(got, ref, strict=True):
                assert a.images and len(a.images) == 1, name
                assert np.array_equal(_pixels(a.image), _pixels(b.image)), (name, a.id)
    tsv = load_items(files["vlmevalkit"]).items
    assert [it.id for it in tsv] == [it.id for it in ref]
    assert {(it.category, it.l2_category) for it in tsv} == {("shapes", "demo")}
    assert {it.l2_category for it in load_items(files["mmbench"]).items} == {"demo"}


# ------------------------------------------------------------------- each layout's own features


def test_vlmevalkit_tsv_hint_nan_options_lists_and_index_references(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    red, green = _img_bytes((220, 10, 10)), _img_bytes((10, 200, 10), "JPEG")
    cols = ["index", "image", "image_path", "question", "hint", "A", "B", "C", "D", "answer",
            "category", "l2-category", "split"]
    rows = [
        {"index": 0, "image": _b64(red), "question": "Colour?", "hint": "Look closely.",
         "A": "red", "B": "green", "C": "nan", "D": "", "answer": "A",
         "category": "attribute", "l2-category": "perception", "split": "dev"},
        {"index": 1, "image": "0", "question": "Same picture?", "hint": "nan", "A": "yes",
         "B": "no", "answer": "A", "category": "relation"},
        {"index": 2, "image": str([_b64(red), _b64(green)]), "image_path": "['2a.png', '2b.jpg']",
         "question": "Which is red?", "A": "first", "B": "second", "answer": "A"},
        {"index": 3, "image": "not base64 %%%" * 10, "question": "Q?", "A": "x", "B": "y",
         "answer": "B"},
    ]
    _write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows, cols)
    assert detect_format(cols) == "vlmevalkit"
    res = load_items(tmp_path / "MMBench_DEV_EN.tsv")
    a, b, c = res.items
    assert a.question == "Hint: Look closely.\nColour?" and a.options == ("red", "green")
    assert (a.category, a.l2_category, a.meta["hint"]) == ("attribute", "perception", "Look closely.")
    assert b.question == "Same picture?" and b.image == a.image  # reused from row 0
    assert len(c.images) == 2 and _pixels(c.images[0])[0, 0].tolist() == [220, 10, 10]
    assert abs(int(_pixels(c.images[1])[0, 0, 1]) - 200) < 8  # the JPEG, decoded as it is
    assert c.interleave() == [0, 1, c.question_with_options]  # images first, as VLMEvalKit
    assert [i for i, _ in res.skipped] == ["3"] and "base64" in res.skipped[0][1]


def test_tsv_without_image_reads_image_path_and_unknown_columns_fail(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp_path / "images" / "p.png")
    _write_tsv(tmp_path / "test.tsv", [{"index": 7, "image_path": "p.png", "question": "Q?",
                                        "A": "x", "B": "y", "answer": "B"}],
               ["index", "image_path", "question", "A", "B", "answer"])
    assert find_split(tmp_path, "test") == tmp_path / "test.tsv"
    (it,) = load_items(tmp_path / "test.tsv").items
    assert it.image == str(tmp_path / "images" / "p.png") and it.answer == "B"
    _write_tsv(tmp_path / "other.tsv", [{"q": "Q?"}], ["q"])
    with pytest.raises(DataError, match="match no known layout"):
        load_items(tmp_path / "other.tsv")
    with pytest.raises(DataError, match="unknown format"):
        load_items(tmp_path / "test.tsv", format="banana")


def test_scienceqa_null_image_is_text_only_and_hint_precedes_question(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    table = pa.table({
        "image": [_struct(_img_bytes((0, 0, 255))), None],
        "question": ["Which animal?", "Which is a noun?"],
        "choices": [["cat", "dog", "fish"], ["run", "table"]],
        "answer": [2, 1], "hint": ["A pet that swims.", ""],
        "task": ["closed choice"] * 2, "category": ["Animals", "Grammar"]})
    pq.write_table(table, tmp_path / "test.parquet")
    a, b = load_items(tmp_path / "test.parquet").items
    assert a.question == "Hint: A pet that swims.\nWhich animal?" and a.answer == "C"
    assert a.image is not None and b.image is None and b.images == ()
    assert (b.question, b.answer, b.category) == ("Which is a noun?", "B", "Grammar")


def test_seedbench_frames_are_kept_in_order(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    frames = [_img_bytes((k * 60, 0, 0)) for k in range(3)]
    data = {"question_id": ["v1"], "question": ["What happens?"], "answer": ["D"],
            "choice_a": ["a"], "choice_b": ["b"], "choice_c": ["c"], "choice_d": ["d"],
            "question_type_id": [10], "image": [[{"bytes": f, "path": None} for f in frames]]}
    feats = datasets.Features({**{k: datasets.Value("string") for k in data
                                  if k not in ("image", "question_type_id")},
                               "question_type_id": datasets.Value("int64"),
                               "image": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(data, features=feats).to_parquet(str(tmp_path / "seed.parquet"))
    (it,) = load_items(tmp_path / "seed.parquet").items
    assert it.id == "v1" and it.answer == "D" and len(it.images) == 3
    assert [_pixels(p)[0, 0, 0] for p in it.images] == [0, 60, 120]


def test_mmmu_placeholders_interleave_and_open_or_broken_items_skip(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    one, two = _img_bytes((9, 9, 9)), _img_bytes((99, 99, 99), "JPEG")
    table = pa.table({
        "id": ["validation_Art_1", "validation_Art_2", "validation_Art_3"],
        "question": ["Compare <image 1> with <image 2>. Which is darker?", "Name it.",
                     "Is <image 3> here?"],
        "options": ["['<image 1>', '<image 2>']", "[]", "['yes', 'no']"],
        "answer": ["A", "paint", "A"], "question_type": ["multiple-choice", "open",
                                                         "multiple-choice"],
        "image_1": [_struct(one), None, _struct(one)],
        "image_2": [_struct(two), None, None], "image_3": [None, None, None],
        "subfield": ["Art", "Art", "Art"]})
    pq.write_table(table, tmp_path / "mmmu.parquet")
    res = load_items(tmp_path / "mmmu.parquet")
    (it,) = res.items
    assert it.options == ("<image 1>", "<image 2>") and len(it.images) == 2
    parts = it.interleave()
    assert parts[0] == "Compare " and parts[1] == 0 and parts[3] == 1
    assert [p for p in parts if isinstance(p, int)] == [0, 1, 0, 1]  # question, then options
    why = dict(res.skipped)
    assert "open question" in why["validation_Art_2"]
    assert "<image 3>" in why["validation_Art_3"]


def test_ai2d_answer_index_as_digits_or_integer(tmp_path, monkeypatch):
    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    img = _struct(_img_bytes((5, 5, 5)))
    table = pa.table({"question": ["Which stage?", "Which label?"],
                      "options": [["egg", "larva", "adult"], ["1", "2", "3", "4"]],
                      "answer": ["1", "3"], "image": [img, img]})
    pq.write_table(table, tmp_path / "ai2d.parquet")
    a, b = load_items(tmp_path / "ai2d.parquet").items
    # the layout defines the answer as an index: "3" is D even where an option reads "3"
    assert (a.answer, b.answer) == ("B", "D")


def test_save_to_disk_is_read_with_pyarrow_alone_when_datasets_is_missing(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import sys

    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    feats = datasets.Features({"question": datasets.Value("string"),
                               "options": datasets.Sequence(datasets.Value("string")),
                               "answer": datasets.Value("int64"), "image": datasets.Image()})
    datasets.Dataset.from_dict({"question": ["Q?"], "options": [["x", "y"]], "answer": [1],
                                "image": [_struct(_img_bytes((7, 8, 9)))]},
                               features=feats).save_to_disk(str(tmp_path / "ai2d"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    (it,) = load_items(tmp_path / "ai2d").items
    assert it.answer == "B" and _pixels(it.image)[0, 0].tolist() == [7, 8, 9]


def test_a_generic_table_with_an_options_column_keeps_its_letter_answers(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "question": ["Q?", "R?"],
                             "options": [["x", "y"], ["p", "q", "r"]], "answer": ["B", "r"]}),
                   tmp_path / "test.parquet")
    assert [it.answer for it in load_items(tmp_path / "test.parquet").items] == ["B", "C"]


def test_demo_model_scores_every_layout_exactly_as_its_llava_json(tmp_path, monkeypatch):
    """End to end: the demo model's accuracy, ECE, Brier and AUROC on the demo's test items
    written in each toolkit layout equal those on the LLaVA JSON itself, exactly."""
    pytest.importorskip("datasets")
    from mllmcal.demo import demo_data_dir, demo_model_dir
    from mllmcal.eval.config import EvalConfig
    from mllmcal.eval.runner import run_eval

    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    ref = _demo_items()[:40]
    files = _write_layouts(tmp_path, ref)
    d = demo_data_dir()
    rows = json.loads((d / "test.json").read_text())[:40]
    (tmp_path / "llava.json").write_text(json.dumps(rows))

    def run(test: Path, name: str, fmt: str | None) -> dict:
        rep = run_eval(EvalConfig(
            models=[str(demo_model_dir())], test=str(test), calib=str(d / "calib.json"),
            images=str(d), out=str(tmp_path / name), method="letter", batch_size=8,
            split_limits={"calib": 40}, build_idk=False, idk_variants=(), progress=False,
            plots=False, modalities=("image",), format=fmt))
        return rep["models"][0]["modalities"]["image"]["test"]

    base = run(tmp_path / "llava.json", "llava", None)
    assert base["n_items"] == base["n_scored"] == 40 and 0 < base["accuracy"] < 1
    for name in ("vlmevalkit", "mmbench", "scienceqa", "seedbench", "mmmu", "ai2d"):
        got = run(files[name], name, name)
        for key in ("accuracy", "ece", "brier", "auroc", "n_items", "n_scored"):
            assert got[key] == base[key], (name, key, got[key], base[key])
