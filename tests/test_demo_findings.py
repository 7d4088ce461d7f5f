"""The findings paragraph of a demo report: each finding's check and its numbers."""

from __future__ import annotations

import copy

from mllmcal.demo.findings import findings, findings_markdown


def _metrics(acc, ece, conf=None, n=1000):
    return {"accuracy": acc, "ece": ece, "mean_confidence": conf, "n_items": n}


REPORT = {"models": [{
    "modalities": {
        "image": {"test": _metrics(0.8, 0.12, 0.9), "test_after_temperature": _metrics(0.8, 0.05),
                  "temperature": 1.5},
        "text": {"test": _metrics(0.2, 0.06), "test_after_temperature": None, "temperature": 1.1},
    },
    "idk": {
        "plain": {"idk_rate": 0.05, "false_idk_rate": 0.0, "n_unanswerable": 150, "n_answerable": 50},
        "invite": {"idk_rate": 0.8, "false_idk_rate": 0.1, "n_unanswerable": 150, "n_answerable": 50},
        "strict": {"idk_rate": 0.85, "false_idk_rate": 0.12},
    },
    "prompt_optimization": {
        "seed_prompt": "Answer", "best_prompt": "My answer is",
        "dev": {"Answer": {"accuracy": 0.76, "ece": 0.16}, "My answer is": {"accuracy": 0.76, "ece": 0.1}},
        "test": {"Answer": {"accuracy": 0.8, "ece": 0.12}, "My answer is": {"accuracy": 0.79, "ece": 0.11}},
    },
}]}


def test_every_finding_holds_on_a_report_that_shows_them():
    fs = {f["name"]: f for f in findings(REPORT)}
    assert list(fs) == ["accuracy", "over-confidence", "image matters", "I don't know",
                        "prompt optimisation"]
    assert all(f["holds"] is True for f in fs.values()), fs
    assert "80.0%" in fs["accuracy"]["text"] and "T = 1.50" in fs["over-confidence"]["text"]
    assert "42% of before" in fs["over-confidence"]["text"]
    md = findings_markdown(REPORT)
    assert md.startswith("## What the demo shows") and md.count("holds") == 5


def test_each_check_fails_when_its_number_says_so():
    cases = [
        (("image", "test", "accuracy"), 0.7, "accuracy"),
        (("image", "test_after_temperature", "ece"), 0.07, "over-confidence"),
        (("text", "test", "accuracy"), 0.7, "image matters"),
    ]
    for (mod, part, key), value, name in cases:
        r = copy.deepcopy(REPORT)
        r["models"][0]["modalities"][mod][part][key] = value
        assert {f["name"]: f["holds"] for f in findings(r)}[name] is False, name
    r = copy.deepcopy(REPORT)
    r["models"][0]["idk"]["invite"]["false_idk_rate"] = 0.3
    assert {f["name"]: f["holds"] for f in findings(r)}["I don't know"] is False
    r = copy.deepcopy(REPORT)
    r["models"][0]["prompt_optimization"]["best_prompt"] = "Answer"
    assert {f["name"]: f["holds"] for f in findings(r)}["prompt optimisation"] is False


def test_missing_parts_are_not_measured_rather_than_failed():
    r = copy.deepcopy(REPORT)
    m = r["models"][0]
    m["idk"], m["prompt_optimization"] = {}, None
    m["modalities"]["image"]["temperature"] = None
    del m["modalities"]["text"]
    fs = {f["name"]: f["holds"] for f in findings(r)}
    assert fs == {"accuracy": True, "over-confidence": None}
    assert "not measured" in findings_markdown(r)
