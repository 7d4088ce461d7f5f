"""What a demo report shows, in words: the paper's findings checked on the report's numbers.

:func:`findings` reads a ``report.json`` dict (the schema of :mod:`mllmcal.eval.report`,
used read-only: this module imports nothing from ``mllmcal.eval``) and returns one entry
per finding of Chen et al. (COLING 2025) that the demo is built to show, each with the
numbers behind it and whether it holds; :func:`findings_markdown` is the paragraph
``mllmcal demo`` appends to ``report.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["findings", "findings_markdown"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"name", "holds", "text"}]`` for the first model of ``report``.

    ``holds`` is None when the report lacks the part a finding needs (a run with
    ``--no-idk``, no text-only modality, no prompt optimisation, no calib split).
    """
    m = report["models"][0]
    mods = m["modalities"]
    main = "image" if "image" in mods else next(iter(mods))
    r = mods[main]
    t, ta, temp = r["test"], r.get("test_after_temperature") or {}, r.get("temperature")
    acc, ece, ece_t = t.get("accuracy"), t.get("ece"), ta.get("ece")
    conf = t.get("mean_confidence")
    out = [{
        "name": "accuracy",
        "holds": acc is not None and acc >= 0.75,
        "text": f"With the image, the model answers {_pct(acc)} of the {t.get('n_items')} "
                "answerable test questions correctly.",
    }]
    over = None if ece is None or temp is None or ece_t is None else (
        ece >= 0.06 and temp > 1.2 and ece_t <= 0.5 * ece)
    out.append({
        "name": "over-confidence",
        "holds": over,
        "text": f"It is over-confident, as fine-tuned MLLMs are: mean confidence "
                f"{_pct(conf)} against {_pct(acc)} accuracy, ECE {_num(ece)}. Temperature "
                f"scaling fitted on the calib split finds T = {_num(temp, 2)} (> 1: the "
                f"logits are too sharp) and brings test ECE down to {_num(ece_t)}"
                + (f" ({ece_t / ece:.0%} of before)." if ece and ece_t is not None else "."),
    })
    if "text" in mods and main != "text":
        tt = mods["text"]["test"].get("accuracy")
        out.append({
            "name": "image matters",
            "holds": None if tt is None or acc is None else acc - tt >= 0.25,
            "text": f"Text only, the same questions get {_pct(tt)} right: the options alone "
                    "carry only priors, so the answers come from the image.",
        })
    idk = m.get("idk") or {}
    if "plain" in idk and "invite" in idk:
        p, i = idk["plain"], idk["invite"]
        holds = None
        if p.get("idk_rate") is not None and i.get("idk_rate") is not None:
            holds = (p["idk_rate"] <= 0.2 and i["idk_rate"] >= p["idk_rate"] + 0.3
                     and (i.get("false_idk_rate") or 0.0) <= 0.15)
        strict = idk.get("strict", {}).get("idk_rate")
        out.append({
            "name": "I don't know",
            "holds": holds,
            "text": f"Offered \"I don't know\" on {p.get('n_unanswerable')} unanswerable "
                    f"questions, the plain prompt picks it {_pct(p.get('idk_rate'))} of the "
                    "time and otherwise answers anyway; inviting abstention in the prompt "
                    f"raises that to {_pct(i.get('idk_rate'))}"
                    + (f" ({_pct(strict)} with the strict hint)" if strict is not None else "")
                    + f", while only {_pct(i.get('false_idk_rate'))} of the "
                    f"{i.get('n_answerable')} answerable controls get a false \"I don't know\".",
        })
    po = m.get("prompt_optimization")
    if po:
        seed, best = po["seed_prompt"], po["best_prompt"]
        ds, db = po["dev"][seed], po["dev"][best]
        better = db["accuracy"] > ds["accuracy"] or (db["ece"] is not None and ds["ece"] is not None
                                                     and db["ece"] < ds["ece"])
        ts, tb = po["test"].get(seed, {}), po["test"].get(best, {})
        out.append({
            "name": "prompt optimisation",
            "holds": better,
            "text": f"Prompt optimisation rewrites the answer prefix \"{seed}\" (dev accuracy "
                    f"{_pct(ds['accuracy'])}, ECE {_num(ds['ece'])}) to \"{best}\" (dev "
                    f"accuracy {_pct(db['accuracy'])}, ECE {_num(db['ece'])}); on the test "
                    f"split: accuracy {_pct(ts.get('accuracy'))} → {_pct(tb.get('accuracy'))}, "
                    f"ECE {_num(ts.get('ece'))} → {_num(tb.get('ece'))}.",
        })
    return out


def findings_markdown(report: dict[str, Any]) -> str:
    """The findings as a markdown section: one paragraph, then a check per finding."""
    fs = findings(report)
    mark = {True: "holds", False: "DOES NOT HOLD", None: "not measured"}
    lines = ["## What the demo shows", "", " ".join(f["text"] for f in fs), ""]
    lines += [f"- {f['name']}: {mark[f['holds']]}" for f in fs]
    return "\n".join(lines) + "\n"
