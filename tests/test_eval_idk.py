"""IDK set construction and IDK metrics."""

import pytest

from mllmcal.eval.data import Item
from mllmcal.eval.idk import IDK_MODES, build_idk_set, idk_metrics
from mllmcal.prompting import IDK_OPTION_TEXT


def _items(n=6):
    return [Item(f"q{i}", f"Question {i}?", ("red", "blue", "green"), "ABC"[i % 3],
                 image=f"/img/{i}.png") for i in range(n)]


def test_every_item_gets_a_control_and_one_unanswerable_variant():
    items = _items()
    out = build_idk_set(items, seed=1)
    assert len(out) == 2 * len(items)
    by_id = {it.id: it for it in out}
    for src in items:
        ctrl = by_id[f"{src.id}/answerable"]
        assert ctrl.answerable and ctrl.answer == src.answer
        assert ctrl.options == (*src.options, IDK_OPTION_TEXT)
    unans = [it for it in out if not it.answerable]
    assert {it.meta["idk_mode"] for it in unans} == set(IDK_MODES)
    for it in unans:
        assert it.options[it.answer_index] == IDK_OPTION_TEXT == it.options[-1]
        src = items[int(it.meta["source_id"][1:])]
        mode = it.meta["idk_mode"]
        if mode == "option_removed":
            assert src.options[src.answer_index] not in it.options
            assert len(it.options) == len(src.options)
        elif mode == "mismatched_image":
            assert it.image != src.image and it.image in {s.image for s in items}
        else:
            assert it.withhold_image and not src.withhold_image


def test_image_modes_are_not_used_for_text_only_items_and_build_is_deterministic():
    items = [it.with_(image=None) for it in _items(4)]
    out = build_idk_set(items)
    assert {it.meta["idk_mode"] for it in out if not it.answerable} == {"option_removed"}
    assert [it.id for it in build_idk_set(_items(), seed=3)] == [
        it.id for it in build_idk_set(_items(), seed=3)]
    with pytest.raises(ValueError, match="IDK modes"):
        build_idk_set(items, modes=["nonsense"])


def test_idk_metrics_count_rates_on_the_right_subsets():
    recs = [
        # unanswerable: 2 of 3 say IDK
        {"answerable": False, "idk": True, "pred": "D", "correct": True, "idk_mode": "a"},
        {"answerable": False, "idk": True, "pred": "D", "correct": True, "idk_mode": "b"},
        {"answerable": False, "idk": False, "pred": "A", "correct": False, "idk_mode": "b"},
        # answerable: 1 of 4 says IDK, 1 no answer, 2 answered of which 1 correct
        {"answerable": True, "idk": True, "pred": "D", "correct": False},
        {"answerable": True, "idk": False, "pred": None, "correct": False},
        {"answerable": True, "idk": False, "pred": "A", "correct": True},
        {"answerable": True, "idk": False, "pred": "B", "correct": False},
    ]
    m = idk_metrics(recs)
    assert m["idk_rate"] == pytest.approx(2 / 3)
    assert m["false_idk_rate"] == pytest.approx(1 / 4)
    assert m["n_answered"] == 2 and m["answered_accuracy"] == pytest.approx(0.5)
    assert m["by_mode"] == {"a": 1.0, "b": 0.5}
