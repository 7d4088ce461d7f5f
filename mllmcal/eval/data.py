"""Multiple-choice VQA items: loading LLaVA-style JSON and flat JSONL, with honest skipping.

Two input formats are accepted.

* LLaVA-style JSON (what the paper's code reads): a list of
  ``{"id", "image", "conversations": [{"from": "human", "value": question}, {"from": "gpt",
  "value": letter}]}``. The human turn carries the options as lines ``(A) text``
  (see :mod:`mllmcal.eval.prompting`); an ``<image>`` placeholder in it is ignored.
* JSONL, one object per line: ``{"id", "question", "options", "answer", "image"}``, where
  ``options`` is a list of strings (or a ``{letter: text}`` mapping) and ``answer`` is a
  letter, ``"(B)"``, an option index or the option text.

A file that is not valid JSON stops the run with :class:`DataError` naming the file and
line. A malformed item, or one whose image cannot be read, is skipped with a warning that
names its id, and is listed in :attr:`LoadResult.skipped` so that the report counts it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..prompting import IDK_OPTION_TEXT, OPTION_LETTERS, format_question, parse_options

__all__ = ["DataError", "Item", "LoadResult", "load_items", "find_split", "check_image"]

_log = logging.getLogger("mllmcal.eval")


class DataError(ValueError):
    """An input file that cannot be read at all (not JSON, wrong top-level shape)."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    ``options`` are the option texts in letter order; ``answer`` is the correct letter.
    ``image`` is a resolved path or None. ``withhold_image`` marks an IDK variant whose
    image must not be shown even in the image+text modality. ``meta`` keeps free-form
    extras (e.g. the IDK construction that produced the item).
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: str
    image: str | None = None
    withhold_image: bool = False
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def question_with_options(self) -> str:
        return format_question(self.question, list(self.options))

    @property
    def letters(self) -> str:
        return OPTION_LETTERS[: len(self.options)]

    @property
    def answer_index(self) -> int:
        return OPTION_LETTERS.index(self.answer)

    @property
    def answerable(self) -> bool:
        """False when the correct option is "I don't know" (an IDK item)."""
        return self.options[self.answer_index] != IDK_OPTION_TEXT

    @property
    def idk_letter(self) -> str | None:
        for letter, text in zip(OPTION_LETTERS, self.options, strict=False):
            if text == IDK_OPTION_TEXT:
                return letter
        return None

    def with_(self, **changes: Any) -> Item:
        return replace(self, **changes)


@dataclass
class LoadResult:
    """Items that loaded, and ``(id, reason)`` for every item that was skipped."""

    items: list[Item]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: str = ""

    def __len__(self) -> int:
        return len(self.items)


# --------------------------------------------------------------------------- parsing


class _Malformed(ValueError):
    pass


def _read_records(path: Path) -> list[tuple[int, Any]]:
    """``(line, object)`` pairs; raises DataError with file and line on invalid JSON."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read data file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    if path.suffix.lower() == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
                ) from None
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})"
        ) from None
    if isinstance(data, dict):
        # a single object, or a wrapper such as {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if ("conversations" not in data and len(lists) == 1) else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return [(0, obj) for obj in data]


def _answer_letter(raw: Any, options: Sequence[str]) -> str:
    letters = OPTION_LETTERS[: len(options)]
    if isinstance(raw, bool):
        raise _Malformed(f"answer must be a letter, got {raw!r}")
    if isinstance(raw, int):
        if 0 <= raw < len(options):
            return letters[raw]
        raise _Malformed(f"answer index {raw} is out of range for {len(options)} options")
    if not isinstance(raw, str) or not raw.strip():
        raise _Malformed(f"answer must be a non-empty string, got {raw!r}")
    s = raw.strip()
    if s in options:
        return letters[list(options).index(s)]
    s = s.lstrip("(").strip()
    if s and s[0] in letters and (len(s) == 1 or not s[1].isalnum()):
        return s[0]
    raise _Malformed(f"answer {raw!r} is not one of the option letters {letters}")


def _check_options(options: Sequence[Any]) -> tuple[str, ...]:
    if len(options) < 2:
        raise _Malformed(f"needs at least 2 options, got {len(options)}")
    if len(options) > len(OPTION_LETTERS):
        raise _Malformed(f"at most {len(OPTION_LETTERS)} options are supported, got {len(options)}")
    if not all(isinstance(o, str) and o.strip() for o in options):
        raise _Malformed("every option must be a non-empty string")
    return tuple(o.strip() for o in options)


def _parse_llava(obj: dict) -> tuple[str, tuple[str, ...], str]:
    conv = obj.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        raise _Malformed("'conversations' must be a list with a human and a gpt turn")
    human = next((t for t in conv if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t for t in conv if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if human is None or gpt is None:
        raise _Malformed("'conversations' needs one turn from 'human' and one from 'gpt'")
    if not isinstance(human.get("value"), str):
        raise _Malformed("the human turn has no text 'value'")
    stem, opt_map = parse_options(human["value"])
    letters = "".join(opt_map)
    if not letters or OPTION_LETTERS[: len(letters)] != letters:
        raise _Malformed("the question must list its options as lines '(A) ...', '(B) ...'")
    if not stem:
        raise _Malformed("the question text is empty")
    options = _check_options(list(opt_map.values()))
    return stem, options, _answer_letter(gpt.get("value"), options)


def _parse_flat(obj: dict) -> tuple[str, tuple[str, ...], str]:
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise _Malformed("missing or empty 'question'")
    raw = obj.get("options")
    if isinstance(raw, dict):
        keys = sorted(raw)
        if "".join(keys) != OPTION_LETTERS[: len(keys)]:
            raise _Malformed(f"option keys must be consecutive letters from A, got {keys}")
        raw = [raw[k] for k in keys]
    if raw is None:
        stem, opt_map = parse_options(q)  # options may be embedded in the question
        q, raw = stem, list(opt_map.values())
    if not isinstance(raw, list):
        raise _Malformed("'options' must be a list of strings or a {letter: text} mapping")
    options = _check_options(raw)
    if "answer" not in obj:
        raise _Malformed("missing 'answer'")
    return q.strip(), options, _answer_letter(obj["answer"], options)


def check_image(path: str) -> None:
    """Raise OSError if ``path`` is not a readable image (checks the file's integrity)."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


def _resolve_image(name: Any, images_dir: Path, data_dir: Path) -> str:
    """``images_dir/name``; names such as ``images/x.png`` written relative to the data
    file's directory are found there too."""
    if not isinstance(name, str) or not name.strip():
        raise _Malformed(f"'image' must be a file name, got {name!r}")
    p = Path(name)
    if p.is_absolute():
        return str(p)
    candidates = [images_dir / p, data_dir / p]
    return str(next((c for c in candidates if c.is_file()), candidates[0]))


def load_items(
    path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
    verify_images: bool = True,
) -> LoadResult:
    """Load a LLaVA-style ``.json`` or a flat ``.jsonl`` file of multiple-choice items.

    Args:
        path: the data file; ``.jsonl`` is read line by line, anything else as one JSON
            document (a list of items).
        images_dir: directory that relative ``image`` names are resolved against; defaults
            to ``<data file's dir>/images`` if that exists, else the data file's dir.
        verify_images: open every image once (PIL ``verify``) so that unreadable ones are
            skipped now, with their id, rather than failing mid-run.

    Returns:
        :class:`LoadResult` with the items in file order and every skipped ``(id, reason)``.

    Raises:
        DataError: the file is missing, not UTF-8, or not valid JSON (message has file:line).
    """
    path = Path(path)
    if images_dir is None:
        images_dir = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    images_dir = Path(images_dir)
    result = LoadResult(items=[], path=str(path))
    seen: set[str] = set()
    for index, (lineno, obj) in enumerate(_read_records(path)):
        where = f"{path.name}:{lineno}" if lineno else f"{path.name}[{index}]"
        item_id = str(obj.get("id", obj.get("question_id", where))) if isinstance(obj, dict) else where
        try:
            if not isinstance(obj, dict):
                raise _Malformed(f"expected a JSON object, got {type(obj).__name__}")
            if item_id in seen:
                raise _Malformed("duplicate id")
            if "conversations" in obj:
                q, options, answer = _parse_llava(obj)
            else:
                q, options, answer = _parse_flat(obj)
            image = None
            if obj.get("image") is not None:
                image = _resolve_image(obj["image"], images_dir, path.parent)
                if verify_images:
                    try:
                        check_image(image)
                    except Exception as exc:  # PIL raises many types for broken files
                        raise _Malformed(f"unreadable image {image}: {exc}") from None
            meta = {k: v for k, v in obj.items()
                    if k not in ("id", "image", "conversations", "question", "options", "answer")}
        except _Malformed as exc:
            _log.warning("skipping item %s (%s): %s", item_id, where, exc)
            result.skipped.append((item_id, str(exc)))
            continue
        seen.add(item_id)
        result.items.append(Item(item_id, q, options, answer, image, meta=meta))
    return result


def find_split(data_dir: str | os.PathLike, split: str) -> Path | None:
    """``<data_dir>/<split>.json`` or ``.jsonl`` (first that exists), else None."""
    for ext in (".json", ".jsonl"):
        p = Path(data_dir) / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def shard(items: Iterable[Item], rank: int, world_size: int) -> list[Item]:
    """Every ``world_size``-th item starting at ``rank`` (balanced, order-preserving)."""
    return list(items)[rank::world_size]
