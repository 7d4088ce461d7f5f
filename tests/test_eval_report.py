"""report.json -> report.md and plots: unique plot files per model, histograms rebuilt from
the bins (never one sample per prediction), and malformed reports as clear errors."""

import json
import subprocess
import sys
import textwrap

import pytest

from mllmcal.cli import main
from mllmcal.eval.report import calibration_metrics, write_report


def _records(seed: int, n: int = 40) -> list[dict]:
    out = []
    for i in range(n):
        c = ((i * 37 + seed * 11) % 97) / 97 * 0.7 + 0.25
        out.append({"pred": "A", "confidence": c, "correct": (i + seed) % 3 != 0})
    return out


def _model(name: str, seed: int) -> dict:
    test = calibration_metrics(_records(seed))
    after = calibration_metrics([{**r, "confidence": r["confidence"] ** 2}
                                 for r in _records(seed)])
    return {"name": name, "path": f"/ck/{name}", "multimodal": False, "idk": {},
            "prompt_optimization": None,
            "modalities": {"text": {"test": test, "test_after_temperature": after,
                                    "temperature": 1.5, "temperature_at_bound": False}}}


def _report(*models: dict) -> dict:
    return {"schema_version": 1, "summary": {"model": models[0]["name"], "modality": "text"},
            "models": list(models), "failed": [], "data": {}}


def test_models_whose_names_differ_only_in_punctuation_get_their_own_plots(tmp_path):
    names = ["llava 1.5", "llava_1.5", "llava-1.5", "demo"]
    report = _report(*(_model(n, seed) for seed, n in enumerate(names)))
    write_report(report, tmp_path)
    plots = report["plots"]
    assert len(plots) == len(set(plots)) == 3 * len(names)
    assert {p.lower() for p in plots} == set(map(str.lower, plots))  # case-insensitive FS
    # each model's files are its own drawings
    by_model = [m["plots"] for m in report["models"]]
    assert [len(p) for p in by_model] == [3] * len(names)
    blobs = [(tmp_path / p[0]).read_bytes() for p in by_model]
    assert len(set(blobs)) == len(names)
    # a name that is already a file name keeps its old, readable file name
    assert "reliability_demo_text.png" in by_model[3]
    # report.md shows each model's own plots under its name
    md = (tmp_path / "report.md").read_text()
    for m in report["models"]:
        section = md.split(f"### {m['name']}\n", 1)[1].split("###", 1)[0]
        for p in m["plots"]:
            assert f"]({p})" in section
        others = [p for mm in report["models"] if mm is not m for p in mm["plots"]]
        assert not any(f"]({p})" in section for p in others)
    # stable: the same report gives the same names
    again = _report(*(_model(n, seed) for seed, n in enumerate(names)))
    write_report(again, tmp_path / "again")
    assert again["plots"] == plots


def test_the_histogram_is_rebuilt_from_the_bins_exactly(tmp_path):
    import torch

    import mllmcal
    from mllmcal.eval.report import _state

    records = _records(0, 200)
    metrics = calibration_metrics(records, n_bins=10)
    s = _state(metrics)
    direct = mllmcal.CalibrationState(10)
    direct.update(torch.tensor([r["confidence"] for r in records], dtype=torch.float32),
                  torch.tensor([r["correct"] for r in records]))
    # the same state as the predictions': per-bin sums equal to the last 2**-32 unit
    assert s.to_dict()["count"] == direct.to_dict()["count"]
    assert s.to_dict()["sum_correct"] == direct.to_dict()["sum_correct"]
    for a, b in zip(s.to_dict()["sum_confidence_fixed"], direct.to_dict()["sum_confidence_fixed"],
                    strict=True):
        assert abs(a - b) <= 1
    assert s.ece() == pytest.approx(direct.ece(), abs=1e-9)


_HUGE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    # a per-sample expansion of these reports needs far more than this
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    from mllmcal.cli import main
    rcs = [main(["report", d]) for d in sys.argv[1:]]
    print(json.dumps(rcs))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux's")
def test_huge_bin_counts_and_n_bins_neither_expand_nor_get_killed(tmp_path):
    big = _report(_model("m", 0))
    t = big["models"][0]["modalities"]["text"]["test"]
    i = next(k for k, c in enumerate(t["bins"]["count"]) if c)
    t["bins"]["count"][i] = 10**12  # one bin with a trillion predictions: plotted from bins
    t["n_scored"] = sum(t["bins"]["count"])
    wide = _report(_model("m", 0))
    wide["models"][0]["modalities"]["text"]["test"]["n_bins"] = 10**9  # lists keep 10 bins
    dirs = []
    for name, rep in (("big", big), ("wide", wide)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(rep))
        dirs.append(str(tmp_path / name))
    r = subprocess.run([sys.executable, "-c", _HUGE, *dirs], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == [0, 2]
    assert (tmp_path / "big" / "reliability_m_text.png").stat().st_size > 1000
    assert "n_bins" in r.stderr and "10 bins" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("field, value, where", [
    ("test_after_temperature", [1, 2], "test_after_temperature"),
    ("test_after_temperature", "x", "test_after_temperature"),
    ("idk", [1], "idk"),
    ("bins", {"count": [1], "confidence": [0.5]}, "bins"),
    ("n_bins", "10", "n_bins"),
])
def test_malformed_fields_are_named(tmp_path, capsys, field, value, where):
    rep = _report(_model("m", 0))
    m = rep["models"][0]
    if field == "idk":
        m["idk"] = value
    elif field == "test_after_temperature":
        m["modalities"]["text"][field] = value
    else:
        m["modalities"]["text"]["test"][field] = value
    (tmp_path / "report.json").write_text(json.dumps(rep))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert where in err and "mllmcal report" in err


def test_deeply_nested_report_json_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "report.json").write_text("[" * 200_000 + "]" * 200_000)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "report.json" in err and "nested too deeply" in err


def test_conformal_selective_and_category_sections_render_and_are_validated(tmp_path, capsys):
    from mllmcal.calibration.conformal import conformal_summary, selective_answering

    m = _model("m", 0)
    r = m["modalities"]["text"]
    probs = [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]] * 5
    labels = [0, 1, 1, 0] * 5
    r["conformal"] = conformal_summary(probs, labels, probs, labels,
                                       [True, True, False, True] * 5, alpha=0.2,
                                       groups={"category": ["x", "y"] * 10})
    r["selective"] = selective_answering([0.9, 0.2], [True, False], [0.95, 0.1], [True, True],
                                         target_risk=0.0)
    r["by_category"] = {"category": {"x": {"n": 10, "accuracy": 0.5, "ece": 0.1,
                                           "ece_after_temperature": None}}}
    r["skipped_items"] = [["test", "q7", "model 'm' cannot take item q7: ..."]]
    m2 = _model("n", 1)
    m2["modalities"]["text"]["conformal"] = {"alpha": 0.1, "error": "no calib item has option probabilities"}
    m2["modalities"]["text"]["selective"] = selective_answering([0.9], [False], [0.5], [True])
    write_report(_report(m, m2), tmp_path, plots=False)
    md = (tmp_path / "report.md").read_text()
    assert "| m | text | LAC | all | 0.2000 |" in md and "| m | text | APS | category: y |" in md
    assert "| n | text | – | all | 0.1000 | no calib item has option probabilities |" in md
    assert "- m / text: threshold 0.9000; test coverage 0.5000, risk 0.0000 (target 0.0000)" in md
    assert "- n / text: threshold none (answers nothing)" in md
    assert "| m | text | category | x | 10 | 0.5000 | 0.1000 | – |" in md
    assert "- m / text, test: `q7`: model 'm' cannot take item q7" in md
    for bad in ({"conformal": [1]}, {"skipped_items": ["q7"]}):
        rep = _report(_model("m", 0))
        rep["models"][0]["modalities"]["text"].update(bad)
        (tmp_path / "report.json").write_text(json.dumps(rep))
        assert main(["report", str(tmp_path)]) == 2
        assert "not an mllmcal report" in capsys.readouterr().err
