"""Unanswerable ("I don't know") variants of a multiple-choice set, and the IDK metrics.

Three constructions (Chen et al., COLING 2025, section on IDK):

* ``mismatched_image``: the question is shown with another item's image;
* ``option_removed``: the correct option is removed and ``I don't know`` offered instead;
* ``image_withheld``: an image-dependent question is asked without its image.

Every variant offers ``I don't know`` as an option and has it as the answer. Each source
item also yields an answerable control that offers ``I don't know`` next to the correct
option, so that the false-IDK rate is measured on the same questions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..prompting import ABSTENTION_HINTS, IDK_OPTION_TEXT, OPTION_LETTERS
from .data import Item

__all__ = ["IDK_MODES", "ABSTENTION_HINTS", "build_idk_set", "idk_metrics"]

IDK_MODES = ("mismatched_image", "option_removed", "image_withheld")


def _with_idk_option(options: Sequence[str]) -> tuple[str, ...]:
    if len(options) >= len(OPTION_LETTERS):
        raise ValueError(f"cannot add an IDK option to an item with {len(options)} options")
    return (*options, IDK_OPTION_TEXT)


def build_idk_set(items: Sequence[Item], seed: int = 0,
                  modes: Sequence[str] = IDK_MODES) -> list[Item]:
    """Answerable controls plus one unanswerable variant per source item.

    Modes are assigned round-robin over the items that support them (the image modes
    need exactly one image; ``mismatched_image`` needs another item with a different
    image). Items that already offer ``I don't know``, however spelled, are left out (they
    are IDK items already).
    Deterministic for a given ``seed``.

    Returns:
        ``2 * len(usable items)`` items: ids ``<id>/answerable`` and ``<id>/idk-<mode>``.
    """
    bad = [m for m in modes if m not in IDK_MODES]
    if bad or not modes:
        raise ValueError(f"IDK modes must be a non-empty subset of {IDK_MODES}, got {list(modes)}")
    rng = random.Random(seed)
    usable = [it for it in items if it.idk_letter is None and len(it.options) < len(OPTION_LETTERS)]
    images = sorted({it.image for it in usable if len(it.images) == 1})
    out: list[Item] = []
    for k, it in enumerate(usable):
        options = _with_idk_option(it.options)
        idk_letter = OPTION_LETTERS[len(options) - 1]
        out.append(it.with_(id=f"{it.id}/answerable", options=options,
                            meta={**it.meta, "idk_mode": None}))
        candidates = [m for m in modes if m == "option_removed"
                      or (len(it.images) == 1 and (m == "image_withheld" or len(images) > 1))]
        if not candidates:
            continue
        mode = candidates[k % len(candidates)]
        meta = {**it.meta, "idk_mode": mode, "source_id": it.id}
        changes: dict = {"options": options, "answer": idk_letter}
        if mode == "option_removed":
            opts = _with_idk_option([o for i, o in enumerate(it.options) if i != it.answer_index])
            changes = {"options": opts, "answer": OPTION_LETTERS[len(opts) - 1]}
        elif mode == "mismatched_image":
            changes["image"] = rng.choice([p for p in images if p != it.image])
        else:
            changes["withhold_image"] = True
        out.append(it.with_(id=f"{it.id}/idk-{mode}", meta=meta, **changes))
    return out


def idk_metrics(records: Sequence[dict]) -> dict[str, float | int | None]:
    """IDK rate on unanswerable items, false-IDK rate on answerable ones, answered accuracy.

    ``records`` are scoring records (``answerable``, ``idk``, ``pred``, ``correct``,
    ``confidence``). "Answered" means an answerable item whose prediction is a letter other
    than ``I don't know``; the caller adds its ECE under ``answered_ece``.
    """
    unans = [r for r in records if not r["answerable"]]
    ans = [r for r in records if r["answerable"]]
    answered = [r for r in ans if r["pred"] is not None and not r["idk"]]

    def rate(rs: list[dict], key: str) -> float | None:
        return sum(bool(r[key]) for r in rs) / len(rs) if rs else None

    return {
        "n_unanswerable": len(unans), "n_answerable": len(ans), "n_answered": len(answered),
        "idk_rate": rate(unans, "idk"), "false_idk_rate": rate(ans, "idk"),
        "answered_accuracy": rate(answered, "correct"),
        "by_mode": {
            mode: rate([r for r in unans if r.get("idk_mode") == mode], "idk")
            for mode in sorted({r.get("idk_mode") for r in unans if r.get("idk_mode")})
        },
    }
