"""Multiple-choice VQA items: loading LLaVA JSON, JSONL and local Hugging Face datasets,
with honest skipping.

These inputs are accepted.

* LLaVA-style JSON (what the paper's code reads): a list of
  ``{"id", "image", "conversations": [{"from": "human", "value": question}, {"from": "gpt",
  "value": letter}]}``. The human turn carries the options (:func:`split_options`); an
  ``<image>`` placeholder in it is ignored.
* JSONL, one object per line: ``{"id", "question", "options", "answer", "image"}``, where
  ``options`` is a list of strings (or a ``{letter: text}`` mapping) and ``answer`` is a
  letter, ``"(B)"``, an option index or the option text.
* A local Hugging Face dataset: a ``save_to_disk`` folder, a ``.parquet`` file or a folder
  of them, as MCQ benchmarks are distributed, its columns mapped by :class:`Columns`.
  Images may be bytes (an ``Image`` feature or raw bytes) or paths
  (:func:`~mllmcal.eval.images.materialize_image`).
* The toolkits' own files: a VLMEvalKit ``.tsv`` and the lmms-eval layouts
  (:mod:`mllmcal.eval.formats`: hints, categories, several images).

In every format, options written into question text are read by :func:`split_options`, and
every item must have 2 to 8 options (one rule for all formats). Answers are matched as
letters first (``B``, ``(B)``, ``B.``, ``B) blue``), then as an option index, then as option
text; an answer that matches no option, or more than one, skips the item with a message.

An ``"answerable": false`` field marks an IDK item (it must offer "I don't know", spelled
any way :func:`is_idk_option` accepts). A malformed item, or one whose image cannot be read,
is skipped with a warning that names its id, and is listed in :attr:`LoadResult.skipped` so
that the report counts it; what stops the run is listed under :func:`load_items`' Raises.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..prompting import IMAGE_TOKEN, OPTION_LETTERS, format_question
from . import _jsonio
from . import formats as _formats
from .formats import interleave as _interleave
from .formats import is_hf_dataset
from .images import check_image, eight_bit, image_like_fields, materialize_image

__all__ = ["Columns", "DataError", "is_hf_dataset", "is_idk_option", "Item", "LoadResult",
           "load_items", "find_split", "check_image", "split_options"]

_log = logging.getLogger("mllmcal.eval")


class DataError(ValueError):
    """An input file that cannot be read at all (not JSON, wrong top-level shape)."""


_IDK_CANONICAL = "i do not know"


def is_idk_option(text: str) -> bool:
    """Whether an option says "I don't know", however it is spelled.

    Case, curly apostrophes, "do not" for "don't", surrounding whitespace and a trailing
    full stop or exclamation mark do not matter: ``"i don’t know."`` is one.
    """
    t = " ".join(text.replace("\u2019", "'").replace("\u2018", "'").replace("\u02bc", "'")
                 .lower().split()).rstrip(".!").strip()
    return t.replace("don't", "do not").replace("dont", "do not") == _IDK_CANONICAL


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    ``options`` are the option texts in letter order; ``answer`` is the correct letter.
    ``image`` is a resolved path or None; ``images`` holds every image of the item in order
    (``images[k - 1]`` is the one an ``<image k>`` placeholder in the question or options
    names; see :meth:`interleave`), so ``image == images[0]`` whenever there is one.
    ``withhold_image`` marks an IDK variant whose image must not be shown even in the
    image+text modality. ``unanswerable`` is the data's own ``"answerable": false``.
    ``category`` and ``l2_category`` are the benchmark's categories (MMBench's
    ``category`` / ``l2-category``), or None. ``meta`` keeps free-form extras (e.g. the IDK
    construction that produced the item).
    """

    id: str
    question: str
    options: tuple[str, ...]
    answer: str
    image: str | None = None
    withhold_image: bool = False
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    images: tuple[str, ...] = ()
    category: str | None = None
    l2_category: str | None = None
    unanswerable: bool = False

    def __post_init__(self) -> None:
        # ``image`` and ``images`` stay one fact: an item may be built through either
        images = tuple(self.images)
        if self.image is None and images:
            object.__setattr__(self, "image", images[0])
        elif self.image is not None and not images:
            images = (self.image,)
        elif self.image is not None and images[0] != self.image:
            raise ValueError(f"item {self.id}: image {self.image!r} is not the first of its "
                             f"images {images}")
        object.__setattr__(self, "images", images)

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
        """False when the data marks the item unanswerable or the correct option is
        "I don't know" (an IDK item)."""
        return not self.unanswerable and not is_idk_option(self.options[self.answer_index])

    @property
    def idk_letter(self) -> str | None:
        for letter, text in zip(OPTION_LETTERS, self.options, strict=False):
            if is_idk_option(text):
                return letter
        return None

    def interleave(self, text: str | None = None) -> list[str | int]:
        """``text`` (default :attr:`question_with_options`) as text parts and 0-based
        indices into :attr:`images`, each image where its ``<image k>`` placeholder stands;
        images no placeholder names come first. For a prompt builder that takes several
        images; a model that takes fewer than ``len(images)`` must skip the item."""
        return _interleave(self.question_with_options if text is None else text,
                          len(self.images))

    def with_(self, **changes: Any) -> Item:
        """A copy with ``changes``; a new ``image`` replaces a single image (or adds one)."""
        if "image" in changes and "images" not in changes:
            if len(self.images) > 1:
                raise ValueError(f"item {self.id} has {len(self.images)} images; "
                                 "replace 'images', not 'image'")
            changes["images"] = () if changes["image"] is None else (changes["image"],)
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
        text = _jsonio.read_text(path)
    except _jsonio.JSONInputError as exc:
        raise DataError(f"data file {exc}") from None
    if path.suffix.lower() == ".jsonl":
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:  # the line's own number, not the 1 of a one-line document
                out.append((lineno, _jsonio.loads(line, f"{path}:{lineno}")))
            except _jsonio.JSONInputError as exc:
                raise DataError(str(exc).replace(f"{path}:{lineno}:1:", f"{path}:{lineno}:")) \
                    from None
        return out
    try:
        data = _jsonio.loads(text, path)
    except _jsonio.JSONInputError as exc:  # invalid or too deeply nested: names the file
        raise DataError(str(exc)) from None
    if isinstance(data, dict):
        # a single object, or a wrapper such as {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if ("conversations" not in data and len(lists) == 1) else [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(data).__name__}")
    return [(0, obj) for obj in data]


_LETTER_ONLY = re.compile(r"^\(?\s*([A-Ha-h])\s*\)?\s*[.:)]?$")
_LETTER_AND_TEXT = re.compile(r"^\(?([A-H])(?:\)|\.|:|\)\.?)\s+(.+)$", re.S)


def _answer_letter(raw: Any, options: Sequence[str]) -> str:
    """The answer's letter; letters first, then an index, then the option text.

    Raises _Malformed when the answer matches no option or is ambiguous.
    """
    letters = OPTION_LETTERS[: len(options)]
    if isinstance(raw, bool):
        raise _Malformed(f"answer must be a letter, got {raw!r}")
    if isinstance(raw, int):
        # an integer may be an index or an option's text ("1".."4"): one reading, or skip
        readings = {letters[k] for k, o in enumerate(options) if o.strip() == str(raw)}
        if 0 <= raw < len(options):
            readings.add(letters[raw])
        if len(readings) == 1:
            return readings.pop()
        if readings:
            raise _Malformed(f"answer {raw!r} is ambiguous: it is the index of option "
                             f"{letters[raw]} and the text of another "
                             f"(options {', '.join(sorted(readings))})")
        raise _Malformed(f"answer index {raw} is out of range for {len(options)} options")
    if not isinstance(raw, str) or not raw.strip():
        raise _Malformed(f"answer must be a non-empty string, got {raw!r}")
    s = raw.strip()
    m = _LETTER_ONLY.match(s)
    # a lone lower-case letter is a letter only where no option is spelled that way
    if m and (s[0].isupper() or s.lstrip("(").strip()[0].isupper()
              or not any(o.lower() == s.lower() for o in options)):
        letter = m.group(1).upper()
        if letter in letters:
            return letter
        raise _Malformed(f"answer {raw!r} is not one of the option letters {letters}")
    m = _LETTER_AND_TEXT.match(s)
    if m and m.group(1) in letters:
        letter, text = m.group(1), m.group(2).strip()
        if text.lower() == options[letters.index(letter)].lower():
            return letter
        raise _Malformed(f"answer {raw!r} is ambiguous: option {letter} is "
                         f"{options[letters.index(letter)]!r}")
    hits = [k for k, o in enumerate(options) if o.strip().lower() == s.lower()]
    if len(hits) == 1:
        return letters[hits[0]]
    if len(hits) > 1:
        raise _Malformed(f"answer {raw!r} is ambiguous: it is the text of options "
                         f"{', '.join(letters[k] for k in hits)}")
    raise _Malformed(f"answer {raw!r} matches none of the option letters {letters} or texts")


# in order of how rarely the spelling occurs in ordinary text: "A." also ends initials
# and abbreviations ("Mrs. A. Smith"), so it loses ties against the others
_OPTION_MARKERS = {
    "(A)": r"\(([A-H])\)",
    "A)": r"(?<![(\w])([A-H])\)",
    "A.": r"(?<![\w.])([A-H])\.",
}


def split_options(text: str) -> tuple[str, list[str]]:
    """Question stem and option texts from text that lists options.

    Options may be spelled ``(A) x``, ``A) x`` or ``A. x``, each on its own line or inline
    (``Which? (A) red (B) blue``). The markers must run A, B, C, ... in one spelling and
    start on a word boundary; the longest such run wins, runs of markers that open lines
    before inline ones, and among equally long inline runs ``(A)`` before ``A)`` before
    ``A.``. The last option ends at its line's end: a line after it (LLaVA's "Answer with
    the option's letter ..." instruction) is not part of it and is dropped, as the eval
    writes its own instruction. Returns ``(text, [])`` when fewer than two options are found.
    """
    text = text.replace(IMAGE_TOKEN, "").strip()
    best: list[re.Match] = []
    best_score = (False, 0, 0, -1)
    for rank, pattern in enumerate(reversed(_OPTION_MARKERS.values())):
        marks = list(re.finditer(rf"(?:^|(?<=\s)){pattern}\s", text))
        at_line_start = [m for m in marks if m.start() == 0 or text[m.start() - 1] == "\n"]
        # markers that open lines win over inline ones ("A. Dr. B. Who" stays one option);
        # among equally long inline runs the last wins (options follow the question)
        for on_lines, pool in ((True, at_line_start), (False, marks)):
            for start in (m for m in pool if m.group(1) == "A"):
                chain = [start]
                for m in pool:
                    nxt = OPTION_LETTERS.index(chain[-1].group(1)) + 1
                    if nxt < len(OPTION_LETTERS) and m.start() > chain[-1].start() \
                            and m.group(1) == OPTION_LETTERS[nxt]:
                        chain.append(m)
                score = (on_lines and len(chain) >= 2, len(chain), rank, start.start())
                if score > best_score:
                    best, best_score = chain, score
    if len(best) < 2:
        return text, []
    stem = text[: best[0].start()].strip()
    bounds = [m.end() for m in best]
    last_line_end = text.find("\n", best[-1].end())
    ends = [m.start() for m in best[1:]] + [len(text) if last_line_end < 0 else last_line_end]
    return stem, [text[a:b].strip() for a, b in zip(bounds, ends, strict=True)]


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
    stem, opts = split_options(human["value"])
    if not opts:
        raise _Malformed("the question must list its options, e.g. '(A) ...', 'A. ...', 'A) ...'")
    if not stem:
        raise _Malformed("the question text is empty")
    options = _check_options(opts)
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
        q, raw = split_options(q)  # options may be written into the question
        if not raw:
            raise _Malformed("no 'options' and no options listed in the question")
    if not isinstance(raw, list):
        raise _Malformed("'options' must be a list of strings or a {letter: text} mapping")
    options = _check_options(raw)
    if "answer" not in obj:
        raise _Malformed("missing 'answer'")
    return q.strip(), options, _answer_letter(obj["answer"], options)


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


@dataclass(frozen=True)
class Columns:
    """Which record fields hold what (``--question-column`` etc.); ``None``: the default
    names (``question``; ``options``, else ``choices``, else per-letter ``A``, ``B``, ...,
    else options written into the question; ``answer``; ``image``; ``id``, else
    ``question_id``, else ``index``)."""

    question: str | None = None
    options: str | None = None
    answer: str | None = None
    image: str | None = None
    id: str | None = None

    def apply(self, rec: dict) -> dict:
        """``rec`` with the mapped fields under the names the parsers read."""
        out = dict(rec)
        for target in ("question", "options", "answer", "image", "id"):
            source = getattr(self, target)
            if source is not None:
                if source not in rec:
                    raise _Malformed(f"no column {source!r} (--{target}-column); columns: "
                                     f"{sorted(rec)}")
                out[target] = rec[source]
        if "options" not in out and self.options is None:
            if "choices" in rec:
                out["options"] = rec["choices"]
            elif "A" in rec and "B" in rec:  # MMBench: one column per letter, None when unused
                out["options"] = [rec[k] for k in OPTION_LETTERS
                                  if isinstance(rec.get(k), str) and rec[k].strip()]
        if "id" not in out and self.id is None and "index" in rec:
            out["id"] = rec["index"]
        return out


_META_TYPES = (str, int, float, bool, type(None))


#: ``format=`` values: the toolkit layouts, and the two generic readers by their names
FORMAT_NAMES = ("auto", "llava", "jsonl", *_formats.FORMATS)


def _read_any(path: Path, hf: bool) -> list[tuple[int, Any]]:
    if hf:
        try:
            return [(0, row) for row in _formats.read_hf(path)]
        except _formats.TableError as exc:
            raise DataError(str(exc)) from None
    if path.suffix.lower() == ".tsv":
        try:  # line numbers of the header's successors, as an editor shows them
            return [(k + 2, row) for k, row in enumerate(_formats.read_tsv(path))]
        except OSError as exc:
            raise DataError(f"{path}: cannot read data file: {exc.strerror or exc}") from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{path}: not a UTF-8 tab-separated table ({exc})") from None
    return _read_records(path)


def _layout(path: Path, records: list[tuple[int, Any]], format: str | None,
            columns: Columns) -> str | None:
    """The toolkit layout to read ``records`` with, or None for the generic readers."""
    if format is not None and format not in FORMAT_NAMES:
        raise DataError(f"unknown format {format!r}; known: {', '.join(FORMAT_NAMES)}")
    if format in _formats.FORMATS:
        return format
    first = next((o for _, o in records if isinstance(o, dict)), {})
    table = path.suffix.lower() == ".tsv" or is_hf_dataset(path)
    # column flags name the fields themselves: they ask for the generic reader
    if format in (None, "auto") and table and columns == Columns():
        found = _formats.detect_format(list(first))
        if found is None and path.suffix.lower() == ".tsv":
            raise DataError(f"{path}: the columns {sorted(first)} match no known layout "
                            f"(pass --format NAME, in Python format=NAME, one of {', '.join(_formats.FORMATS)})")
        return found
    return None


def load_items(
    path: str | os.PathLike, images_dir: str | os.PathLike | None = None,
    verify_images: bool = True, columns: Columns | None = None, format: str | None = None,
) -> LoadResult:
    """Load multiple-choice items: LLaVA ``.json``, flat ``.jsonl``, a VLMEvalKit ``.tsv``
    or a local HF dataset (toolkit layouts: :mod:`mllmcal.eval.formats`).

    Args:
        path: the data file (``.jsonl`` is read line by line, ``.parquet`` and ``.tsv`` as a
            table, anything else as one JSON document), or a Hugging Face ``save_to_disk``
            folder or a folder of ``.parquet`` files.
        images_dir: directory that relative ``image`` names are resolved against; defaults
            to ``<data file's dir>/images`` if that exists, else the data file's dir.
        verify_images: open every image once (PIL ``verify``) so that unreadable ones are
            skipped now, with their id, rather than failing mid-run.
        columns: field names, for data whose columns are named otherwise.
        format: one of :data:`FORMAT_NAMES`; None or ``"auto"`` recognises a table's
            toolkit layout from its columns (see :func:`mllmcal.eval.formats.detect_format`).

    Returns:
        :class:`LoadResult` with the items in file order and every skipped ``(id, reason)``.
        16-bit grayscale images are replaced by 8-bit RGB copies (:func:`images.eight_bit`).

    Raises:
        DataError: the file is missing, not UTF-8, or not valid JSON (message has file:line),
            a dataset folder cannot be read, the format is unknown, or no item has an image
            while a field the loader does not read holds images (``image_path`` for
            ``image``, say).
    """
    path = Path(path)
    hf = is_hf_dataset(path)
    base = path if (hf and path.is_dir()) else path.parent
    if images_dir is None:
        images_dir = base / "images" if (base / "images").is_dir() else base
    images_dir = Path(images_dir)
    columns = columns or Columns()
    result = LoadResult(items=[], path=str(path))
    seen: set[str] = set()
    records = _read_any(path, hf)
    layout = _layout(path, records, format, columns)
    reader = _formats.make_reader(layout, [o for _, o in records if isinstance(o, dict)]) \
        if layout else None
    unread_image_fields: set[str] = set()
    for index, (lineno, obj) in enumerate(records):
        where = f"{path.name}:{lineno}" if lineno else f"{path.name}[{index}]"
        item_id = where
        try:
            if not isinstance(obj, dict):
                raise _Malformed(f"expected a JSON object, got {type(obj).__name__}")
            # the row's own id, for a row that the reader rejects
            item_id = str(next((obj[k] for k in ("id", "question_id", "index")
                                if obj.get(k) not in (None, "")), where))
            obj = reader(obj) if reader else columns.apply(obj)
            item_id = str(obj.get("id", obj.get("question_id", where)))
            if item_id in seen:
                raise _Malformed("duplicate id")
            if "conversations" in obj:
                q, options, answer = _parse_llava(obj)
            else:
                q, options, answer = _parse_flat(obj)
            raw = obj.get("images") if reader else obj.get("image")
            images = tuple(_load_image(v, base, images_dir, verify_images)
                           for v in (raw if reader else [raw]) if v is not None)
            if not images:
                unread_image_fields.update(image_like_fields(obj))
            try:
                _interleave(format_question(q, list(options)), len(images))
            except ValueError as exc:
                raise _Malformed(str(exc)) from None
            unanswerable = _unanswerable(obj.get("answerable"), options, answer)
            meta = {k: v for k, v in obj.items()
                    if k not in ("id", "image", "conversations", "question", "options", "answer")
                    and isinstance(k, str) and isinstance(v, _META_TYPES)}
        except (_Malformed, _formats.RowError) as exc:
            _log.warning("skipping item %s (%s): %s", item_id, where, exc)
            result.skipped.append((item_id, str(exc)))
            continue
        seen.add(item_id)
        result.items.append(Item(item_id, q, options, answer, meta=meta, images=images,
                                 category=_category(meta.get("category")),
                                 l2_category=_category(meta.get("l2_category")),
                                 unanswerable=unanswerable))
    _check_some_image(result, unread_image_fields)
    return result


def _load_image(value: Any, base: Path, images_dir: Path, verify: bool) -> str:
    """A raw image value (bytes, ``{"bytes", "path"}``, file name) as a readable path."""
    try:
        image = _resolve_image(materialize_image(value, base), images_dir, base)
    except ValueError as exc:
        raise _Malformed(str(exc)) from None
    try:
        if verify:
            check_image(image)
        return eight_bit(image)
    except Exception as exc:  # PIL raises many types for broken files
        if not verify:
            return image
        raise _Malformed(f"unreadable image {image}: {exc}") from None


def _category(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _unanswerable(flag: Any, options: Sequence[str], answer: str) -> bool:
    """The data's ``"answerable"`` field, checked against the options."""
    answer_is_idk = is_idk_option(options[OPTION_LETTERS.index(answer)])
    if flag is False:
        if not any(is_idk_option(o) for o in options):
            raise _Malformed("'answerable' is false but no option says \"I don't know\"")
        return True
    if flag is True and answer_is_idk:
        raise _Malformed("'answerable' is true but the answer is the \"I don't know\" option")
    return False


def _check_some_image(result: LoadResult, unread_fields: set[str]) -> None:
    """An image run on a split whose images all went unread would score text only."""
    if not result.items or any(it.images for it in result.items):
        return
    if unread_fields:
        names = ", ".join(sorted(unread_fields))
        raise DataError(f"{result.path}: no item has an image, but the field(s) {names} hold "
                        f"images; the image field is 'image' (or map it: --image-column "
                        f"{sorted(unread_fields)[0]})")
    _log.warning("%s: no item has an image; its image+text results will equal text only",
                 result.path)


def find_split(data_dir: str | os.PathLike, split: str) -> Path | None:
    """The ``split`` of a data directory, else None: ``<split>.json``, ``<split>.jsonl``,
    ``<split>.parquet``, ``<split>.tsv``, or a folder ``<split>/`` holding a Hugging Face
    dataset."""
    d = Path(data_dir)
    for ext in (".json", ".jsonl", ".parquet", ".tsv"):
        p = d / f"{split}{ext}"
        if p.is_file():
            return p
    if is_hf_dataset(d / split):
        return d / split
    return None

