"""Procedurally generated shapes VQA: the embedded demo's data set.

Every item is a small scene (coloured shapes on a 4x4 grid of a ``IMAGE_SIZE`` px image) and
one multiple-choice question about colour (6 options), shape (4), count (5) or position (4),
formatted with :func:`mllmcal.prompting.format_question`; the options are the type's
whole answer pool in canonical order. An item is a pure function of
``(seed, split, index)`` (see :func:`make_item`), so any item can be regenerated and its
answer re-derived from its scene spec.

About a quarter of the answerable items are deliberately hard, so that the trained model is
imperfect and its calibration is worth measuring:

* colour: the shape is painted part-way towards a confusable colour that is also an option;
* shape: the shape is drawn a few pixels wide, where a circle and a square look alike;
* count: four or five objects of the asked shape, some of them small;
* position: the object is small and sits next to the centre lines.

Unanswerable items (``"answerable": false``, answer = the ``I don't know`` option) come in
three kinds, named in ``"idk_kind"``: ``option_removed`` (the correct option is dropped), ``mismatched_image`` (the image does not contain the object asked about),
``image_withheld`` (no image at all). The ``idk`` split also holds answerable controls that
offer ``I don't know`` next to the correct option, for the false-IDK rate. Wherever it is
offered, ``I don't know`` is the last option, as :func:`mllmcal.eval.idk.build_idk_set`
adds it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..prompting import IDK_OPTION_TEXT, IMAGE_TOKEN, OPTION_LETTERS, format_question

IMAGE_SIZE = 48
GRID = 4
CELL = IMAGE_SIZE // GRID
BACKGROUND = (24, 24, 24)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 225, 50),
    "purple": (150, 60, 205),
    "orange": (245, 140, 25),
}
# Pairs a viewer can mix up; a hard colour item is painted part-way towards its partner.
CONFUSABLE = {
    "red": "orange",
    "orange": "yellow",
    "yellow": "green",
    "green": "yellow",
    "blue": "purple",
    "purple": "blue",
}
# Shape questions ask about the one white object; white is never a colour answer. With a
# canonical option order a letter means a colour in colour questions and a shape in shape
# questions; a white target keeps colour from voting in shape questions, so the demo model
# needs no within-object switch between "read the colour" and "read the shape".
SHAPE_TARGET_COLOR = "white"
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {**COLORS, SHAPE_TARGET_COLOR: (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
QUESTION_TYPES = ("color", "shape", "count", "position")

SPLITS = ("train", "calib", "dev", "test", "idk")
DEFAULT_SIZES: dict[str, int] = {"train": 2500, "calib": 1000, "dev": 100, "test": 1000, "idk": 200}

NORMAL_SIZE = (8, 10)  # pixel extent of an ordinary shape (inclusive range)
SMALL_SIZE = (3, 4)
HARD_FRACTION = 0.25
# Share of ``train`` items that are IDK-style: unanswerable, or answerable with an IDK option.
TRAIN_IDK_FRACTION = 0.15
# Share of those that are answerable controls (the rest is unanswerable, evenly by kind).
TRAIN_IDK_CONTROL_SHARE = 0.5

Obj = dict[str, Any]


# ----------------------------------------------------------------------------- scenes


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # crc32 rather than hash(): str hashing is salted per process.
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def render_scene(objects: list[Obj], size: int = IMAGE_SIZE) -> Image.Image:
    """Draw a scene spec as an RGB ``size`` x ``size`` PIL image.

    Each object is ``{"shape", "color", "rgb": [r, g, b], "cell": [row, col], "size": px,
    "offset": [dy, dx]}``; it is centred in its grid cell, shifted by ``offset``.
    """
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = size // GRID
    for obj in objects:
        row, col = obj["cell"]
        dy, dx = obj.get("offset", (0, 0))
        cy = row * cell + cell / 2 + dy
        cx = col * cell + cell / 2 + dx
        h = obj["size"] / 2
        rgb = tuple(obj["rgb"])
        box = [cx - h, cy - h, cx + h - 1, cy + h - 1]
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=rgb)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=rgb)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - h), (cx + h - 1, cy + h - 1), (cx - h, cy + h - 1)], fill=rgb)
        elif obj["shape"] == "diamond":
            draw.polygon([(cx, cy - h), (cx + h - 1, cy), (cx, cy + h - 1), (cx - h, cy)], fill=rgb)
        else:
            raise ValueError(f"unknown shape {obj['shape']!r}; expected one of {SHAPES}")
    return img


def quadrant(obj: Obj) -> str:
    """The quadrant name (one of ``QUADRANTS``) of an object's grid cell."""
    row, col = obj["cell"]
    return f"{'top' if row < GRID // 2 else 'bottom'} {'left' if col < GRID // 2 else 'right'}"


def _obj(rng: np.random.Generator, shape: str, color: str, cell: tuple[int, int], small: bool) -> Obj:
    lo, hi = SMALL_SIZE if small else NORMAL_SIZE
    size = int(rng.integers(lo, hi + 1))
    # Ordinary shapes sit centred in their cell, so a shape is one pixel template per size
    # (the patch grid equals the cell grid); small ones wander, which is part of why they
    # are hard.
    slack = max(0, (CELL - size) // 2 - 1) if small else 0
    offset = [int(rng.integers(-slack, slack + 1)), int(rng.integers(-slack, slack + 1))]
    return {
        "shape": shape,
        "color": color,
        "rgb": list(OBJECT_COLORS[color]),
        "cell": [int(cell[0]), int(cell[1])],
        "size": size,
        "offset": offset,
    }


def _n_distractors(rng: np.random.Generator) -> int:
    # Mostly lone objects: finding the one named in the question among several is a
    # content-matching lookup that the demo model learns slowly; some scenes keep it.
    return int(rng.choice(3, p=[0.6, 0.3, 0.1]))


def _free_cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    flat = rng.permutation(GRID * GRID)[:n]
    return [(int(i) // GRID, int(i) % GRID) for i in flat]


def _distractors(
    rng: np.random.Generator, n: int, cells: list[tuple[int, int]], avoid_shapes=(), avoid_colors=()
) -> list[Obj]:
    shapes = [s for s in SHAPES if s not in avoid_shapes]
    colors = [c for c in COLORS if c not in avoid_colors]
    return [
        _obj(rng, str(rng.choice(shapes)), str(rng.choice(colors)), cells[i], small=False)
        for i in range(n)
    ]


def _scene_and_question(rng: np.random.Generator, qtype: str, hard: bool):
    """(objects, question, correct option text, option pool)."""
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")
    shape = str(rng.choice(SHAPES))
    if qtype == "count":
        count = int(rng.integers(4, 6)) if hard else int(rng.integers(1, 4))
        n_other = _n_distractors(rng)
        cells = _free_cells(rng, count + n_other)
        objs = [
            _obj(rng, shape, str(rng.choice(list(COLORS))), cells[i], small=hard and rng.random() < 0.4)
            for i in range(count)
        ]
        objs += _distractors(rng, n_other, cells[count:], avoid_shapes=(shape,))
        pool = [str(k) for k in range(1, 6)]
        return objs, f"How many {PLURALS[shape]} are in the image?", str(count), pool
    color = SHAPE_TARGET_COLOR if qtype == "shape" else str(rng.choice(list(COLORS)))
    n_other = _n_distractors(rng)
    if qtype == "position" and hard:
        # A cell touching both centre lines, pushed towards the centre.
        row, col = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        cells = [(row, col)] + [
            c for c in _free_cells(rng, GRID * GRID) if c != (row, col)
        ][:n_other]
    else:
        cells = _free_cells(rng, 1 + n_other)
    target = _obj(rng, shape, color, cells[0], small=hard and qtype != "color")
    if qtype == "color":
        if hard:
            # Paint 30-45% of the way to the confusable colour (also an option, as every
            # colour is): the right answer is still the nearer name, but only just.
            partner = CONFUSABLE[color]
            t = float(rng.uniform(0.30, 0.45))
            a, b = np.array(COLORS[color]), np.array(COLORS[partner])
            target["rgb"] = [int(round(v)) for v in (1 - t) * a + t * b]
        objs = [target] + _distractors(rng, n_other, cells[1:], avoid_shapes=(shape,))
        return objs, f"What color is the {shape}?", color, list(COLORS)
    if qtype == "position" and hard:
        push = CELL // 2 - SMALL_SIZE[1] // 2 - 1
        target["offset"] = [push if row == 1 else -push, push if col == 1 else -push]
    # Distractors differ in colour, so that the question names one object.
    objs = [target] + _distractors(rng, n_other, cells[1:], avoid_colors=(color,))
    if qtype == "shape":
        return objs, f"What shape is the {color} object?", shape, list(SHAPES)
    return objs, f"Where is the {color} {shape}?", quadrant(target), list(QUADRANTS)


def _mismatched_scene(rng: np.random.Generator, qtype: str, question_objs: list[Obj]) -> list[Obj]:
    """A scene without the object the question asks about (so it cannot be answered)."""
    target = question_objs[0]
    by_shape = qtype in ("color", "count")
    avoid_shapes = (target["shape"],) if by_shape else ()
    avoid_colors = () if by_shape else (target["color"],)
    n = int(rng.integers(1, 4))
    return _distractors(rng, n, _free_cells(rng, n), avoid_shapes, avoid_colors)


# ----------------------------------------------------------------------------- items

IDK_KINDS = ("option_removed", "mismatched_image", "image_withheld")


def make_item(seed: int, split: str, index: int) -> dict[str, Any]:
    """Regenerate item ``index`` of ``split`` for ``seed``; pure function of its arguments.

    Returns the JSON record written by :func:`build_dataset` (LLaVA conversation format plus
    ``answerable``, ``qtype``, ``hard``, ``idk_kind`` and the ``scene`` spec, a list of
    objects for :func:`render_scene`; ``scene`` is absent when the image is withheld).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = _rng(seed, split, index)
    qtype = str(rng.choice(QUESTION_TYPES))
    hard = bool(rng.random() < HARD_FRACTION)

    # idk split: 3/4 unanswerable (evenly over IDK_KINDS), 1/4 answerable controls that offer
    # IDK next to the correct option. train: TRAIN_IDK_FRACTION of its items offer IDK, half
    # of them answerable controls, so that the option's presence alone does not decide.
    idk_kind: str | None = None
    with_idk_option = False
    control_share = 0.25 if split == "idk" else TRAIN_IDK_CONTROL_SHARE
    if split == "idk" or (split == "train" and rng.random() < TRAIN_IDK_FRACTION):
        with_idk_option = True
        u = rng.random()
        if u >= control_share:
            frac = (u - control_share) / (1 - control_share)
            idk_kind = IDK_KINDS[min(int(frac * 3), 2)]
            hard = False  # unanswerable for a reason of its own, not a hard picture

    objs, question, correct, pool = _scene_and_question(rng, qtype, hard)
    # The type's whole answer pool in its canonical order (palette order, counts ascending,
    # ...), as benchmarks with a closed answer set often do. With a shuffled order a model
    # has to find the option line whose text matches what it sees, which the demo model
    # does not learn within its training budget (measured: chance level after 150 s, also
    # with text-only lookup lessons mixed in).
    options = list(pool)
    answerable = idk_kind is None
    scene: list[Obj] | None = objs
    if with_idk_option:
        if idk_kind == "option_removed":
            options = [o for o in options if o != correct]
        # "I don't know" comes last, as mllmcal.eval.idk.build_idk_set adds it.
        options.append(IDK_OPTION_TEXT)
        if idk_kind == "mismatched_image":
            scene = _mismatched_scene(rng, qtype, objs)
        elif idk_kind == "image_withheld":
            scene = None
    answer_text = correct if answerable else IDK_OPTION_TEXT
    letter = OPTION_LETTERS[options.index(answer_text)]

    item_id = f"{split}-{index:05d}"
    human = format_question(question, options)
    record: dict[str, Any] = {"id": item_id}
    if scene is not None:
        record["image"] = f"images/{item_id}.png"
        human = f"{IMAGE_TOKEN}\n{human}"
    record["conversations"] = [
        {"from": "human", "value": human},
        {"from": "gpt", "value": letter},
    ]
    record.update(answerable=answerable, qtype=qtype, hard=hard and answerable, idk_kind=idk_kind)
    if scene is not None:
        record["scene"] = scene
    return record


def merge_sizes(base: Mapping[str, int], sizes: Mapping[str, int] | None) -> dict[str, int]:
    """Items per split: ``base`` updated with ``sizes``, whose splits must be in :data:`SPLITS`."""
    merged = dict(base)
    for split, n in (sizes or {}).items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} in sizes; expected one of {SPLITS}")
        merged[split] = n
    return merged


def build_dataset(
    out_dir: str | Path, seed: int = 0, sizes: Mapping[str, int] | None = None
) -> dict[str, Path]:
    """Write the shapes VQA set to ``out_dir``: one LLaVA-style JSON per split plus PNGs.

    Args:
        out_dir: created if missing; receives ``{split}.json`` and ``images/{id}.png``
            (``IMAGE_SIZE`` x ``IMAGE_SIZE`` RGB). Image paths in the JSON are relative to it.
        seed: the whole set is a deterministic function of ``seed`` and ``sizes``.
        sizes: items per split, merged over :data:`DEFAULT_SIZES`; a split given 0 items is
            not written. Splits are ``train``, ``calib``, ``dev``, ``test``, ``idk``.

    Returns:
        ``{split: path of its JSON file}`` for every split written.
    """
    merged = merge_sizes(DEFAULT_SIZES, sizes)
    for split, n in merged.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"sizes[{split!r}] must be a non-negative int, got {n!r}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in SPLITS:
        if merged[split] == 0:
            continue
        items = [make_item(seed, split, i) for i in range(merged[split])]
        for item in items:
            if "scene" in item:
                render_scene(item["scene"]).save(out / item["image"], optimize=False)
        path = out / f"{split}.json"
        path.write_text(json.dumps(items, indent=1))
        paths[split] = path
    return paths
