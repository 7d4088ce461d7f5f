"""Benchmark files as the evaluation toolkits ship them: VLMEvalKit TSV, lmms-eval layouts.

Each reader turns one row of its toolkit's table into the flat record that
:func:`mllmcal.eval.data.load_items` reads: ``{"id", "question", "options", "answer",
"images", "category", "l2_category", ...}`` where ``answer`` is a letter, or an index that
the toolkit's layout defines to be one, and ``images`` is a list of raw image values
(encoded bytes, a ``{"bytes", "path"}`` struct or a file name) in ``<image k>`` order.

Layouts (recognised from their columns, see :func:`detect_format`; ``format=NAME`` forces one):

* ``vlmevalkit``: VLMEvalKit's TSV (``index``, ``image`` base64, ``image_path``,
  ``question``, ``hint``, ``A`` ... ``I``, ``answer``, ``category``, ``l2-category``,
  ``split``), and MMBench_EN as lmms-eval ships it (the same columns, ``image`` an image
  struct, ``L2-category``). Empty or NaN options are dropped. ``image`` may be a list (a
  stringified Python list of base64 strings, as VLMEvalKit writes multi-image rows) or a
  short value (at most 64 characters, as VLMEvalKit decides) naming another row's ``index``
  whose image it reuses. Without ``image``, ``image_path`` names the file(s).
* ``scienceqa``: ``image`` (null for a text-only item), ``question``, ``choices`` (a list),
  ``answer`` (an index), ``hint``.
* ``seedbench``: ``choice_a`` ... ``choice_d``, ``answer`` (a letter), ``image`` (a list:
  one picture, or a video's frames).
* ``mmmu``: ``options`` as a stringified list, ``image_1`` ... ``image_7``, ``<image k>``
  placeholders in the question and options; open questions (no options) are skipped.
* ``ai2d``: ``options`` (a list), ``answer`` (an index, stored as an integer or its digits;
  a letter or an option text is matched as in the generic reader).

A non-empty hint goes before the question as VLMEvalKit writes it: ``"Hint: {hint}\\n{question}"``.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..prompting import OPTION_LETTERS

__all__ = ["FORMATS", "RowError", "TableError", "detect_format", "interleave", "is_hf_dataset",
           "make_reader", "placeholders", "read_hf", "read_tsv"]


class RowError(ValueError):
    """One row that cannot become an item (the loader skips it and names it)."""


class TableError(ValueError):
    """A table that cannot be read at all (the loader stops with its message)."""


#: VLMEvalKit reads an ``image`` value this short as another row's ``index``
_REF_MAX_LEN = 64
_PLACEHOLDER = re.compile(r"<image (\d+)>")
#: columns a reader turns into the record's fields (the others stay as extras)
_CONSUMED = re.compile(r"[a-i]|choice_[a-h]|image(_\d+|_path)?|options|choices|question|"
                       r"answer|hint|category|l2[-_]category")


def _missing(value: Any) -> bool:
    """Empty, None or NaN: how pandas-written tables spell an unused cell."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in ("", "nan")


def _text(value: Any) -> str | None:
    return None if _missing(value) else str(value).strip()


def _get(row: dict, *names: str) -> Any:
    """The first of ``names`` present in ``row``, matched without regard to case."""
    lower = {k.lower(): k for k in row if isinstance(k, str)}
    for name in names:
        if name.lower() in lower:
            return row[lower[name.lower()]]
    return None


def _with_hint(question: Any, hint: Any) -> str:
    q = _text(question)
    if q is None:
        raise RowError("missing or empty 'question'")
    h = _text(hint)
    return f"Hint: {h}\n{q}" if h else q


def _index_letter(raw: Any, n_options: int) -> str:
    """The letter of an answer the layout stores as an option index (int or digits)."""
    if isinstance(raw, bool) or not (isinstance(raw, int) or (isinstance(raw, str)
                                                             and raw.strip().isdigit())):
        raise RowError(f"answer must be an option index, got {raw!r}")
    k = int(raw)
    if not 0 <= k < min(n_options, len(OPTION_LETTERS)):
        raise RowError(f"answer index {k} is out of range for {n_options} options")
    return OPTION_LETTERS[k]


def _list_value(value: Any) -> list[Any]:
    """A list cell: a real list, or a stringified Python list as the toolkits write them."""
    if isinstance(value, list | tuple):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise RowError(f"cannot read {value[:40]!r} as a list") from None
        if isinstance(parsed, list | tuple):
            return list(parsed)
    return [value]


def _decode_base64(value: str) -> bytes:
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RowError(f"image is neither base64 nor a file name ({value[:24]!r}...)") from None


def _common(row: dict, question: str, options: Sequence[Any], answer: Any,
            images: list[Any], item_id: Any = None) -> dict:
    """The flat record; the row's other scalar columns stay as extras (meta)."""
    rec = {k: v for k, v in row.items()
           if isinstance(k, str) and not _CONSUMED.fullmatch(k.lower())}
    rec.update(question=question, options=[str(o).strip() for o in options], answer=answer,
               images=images, category=_text(_get(row, "category")),
               l2_category=_text(_get(row, "l2-category", "l2_category")))
    hint = _text(_get(row, "hint"))
    if hint:
        rec["hint"] = hint
    if item_id is not None:
        rec["id"] = item_id
    return rec


# ---------------------------------------------------------------------------- readers


class _VLMEvalKit:
    """VLMEvalKit TSV and lmms-eval's MMBench: per-letter option columns, hint, categories."""

    def __init__(self, rows: Sequence[dict]) -> None:
        # the image of every row by its index, so that short values can borrow another's
        self.by_index = {str(_get(r, "index")): _get(r, "image") for r in rows
                         if not _missing(_get(r, "index"))}

    def _images(self, row: dict) -> list[Any]:
        value = _get(row, "image")
        if not isinstance(value, dict | bytes | bytearray | list) and _missing(value):
            paths = _get(row, "image_path")
            return [] if _missing(paths) else [str(p) for p in _list_value(paths)]
        out = []
        for v in _list_value(value):
            if isinstance(v, str) and len(v.strip()) <= _REF_MAX_LEN and v.strip() in self.by_index \
                    and v.strip() != str(_get(row, "index")):
                target = self.by_index[v.strip()]
                if isinstance(target, str) and len(target.strip()) <= _REF_MAX_LEN:
                    raise RowError(f"image refers to row {v.strip()!r}, whose image is a "
                                   "reference too")
                out.extend(_list_value(target))
            else:
                out.append(v)
        # base64 strings become bytes; short strings are file names
        return [_decode_base64(v) if isinstance(v, str) and len(v.strip()) > _REF_MAX_LEN
                else v for v in out]

    def __call__(self, row: dict) -> dict:
        options = [row[c] for c in "ABCDEFGHI" if not _missing(row.get(c))]
        answer = _text(_get(row, "answer"))
        if answer is None:
            raise RowError("missing 'answer'")
        return _common(row, _with_hint(_get(row, "question"), _get(row, "hint")), options,
                       answer, self._images(row), _get(row, "index"))


def _scienceqa(row: dict) -> dict:
    choices = _get(row, "choices")
    if not isinstance(choices, list | tuple):
        raise RowError(f"'choices' must be a list, got {type(choices).__name__}")
    raw = _get(row, "answer")
    answer = _index_letter(raw, len(choices)) if isinstance(raw, int) else raw
    image = _get(row, "image")
    return _common(row, _with_hint(_get(row, "question"), _get(row, "hint")), choices, answer,
                   [] if image is None else [image])


def _seedbench(row: dict) -> dict:
    options = [row[f"choice_{c}"] for c in "abcdefgh" if not _missing(row.get(f"choice_{c}"))]
    image = _get(row, "image")
    images = [] if image is None else [v for v in _list_value(image) if v is not None]
    return _common(row, _with_hint(_get(row, "question"), _get(row, "hint")), options,
                   _get(row, "answer"), images, _get(row, "question_id", "id"))


def _mmmu(row: dict) -> dict:
    options = _list_value(_get(row, "options"))
    if options in ([], [""]) or all(_missing(o) for o in options):
        raise RowError("an open question (no options): only multiple-choice items are scored")
    images = []
    for k in range(1, 8):
        value = row.get(f"image_{k}")
        if value is None:
            break  # numbered from 1 without gaps: <image k> is images[k - 1]
        images.append(value)
    return _common(row, _with_hint(_get(row, "question"), _get(row, "hint")), options,
                   _get(row, "answer"), images, _get(row, "id"))


def _ai2d(row: dict) -> dict:
    options = _list_value(_get(row, "options"))
    image = _get(row, "image")
    raw = _get(row, "answer")
    # AI2D stores an index; a table merely shaped like it may hold letters or texts
    index = isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit())
    return _common(row, _with_hint(_get(row, "question"), _get(row, "hint")), options,
                   _index_letter(raw, len(options)) if index else raw,
                   [] if image is None else [image], _get(row, "id", "question_id"))


#: name -> factory taking the whole table (for cross-row references), returning a row reader
FORMATS: dict[str, Callable[[Sequence[dict]], Callable[[dict], dict]]] = {
    "vlmevalkit": _VLMEvalKit,
    "mmbench": _VLMEvalKit,
    "scienceqa": lambda rows: _scienceqa,
    "seedbench": lambda rows: _seedbench,
    "mmmu": lambda rows: _mmmu,
    "ai2d": lambda rows: _ai2d,
}


def detect_format(columns: Sequence[str]) -> str | None:
    """The toolkit layout a table's columns identify, or None (the generic reader).

    Rules, first match wins: ``choice_a`` is SEED-Bench; ``options`` with ``image_1`` is
    MMMU, ``options`` alone AI2D; ``choices`` with ``hint`` ScienceQA; ``index``,
    ``question``, ``A``, ``B`` and ``answer`` VLMEvalKit / MMBench.
    """
    cols = {c.lower() for c in columns if isinstance(c, str)}
    if "choice_a" in cols:
        return "seedbench"
    if "options" in cols and "question" in cols:
        return "mmmu" if "image_1" in cols else "ai2d"
    if {"choices", "hint", "question", "answer"} <= cols:
        return "scienceqa"
    if {"index", "question", "answer"} <= cols and {"A", "B"} <= set(columns):
        return "vlmevalkit"
    return None


def make_reader(name: str, rows: Sequence[dict]) -> Callable[[dict], dict]:
    """The row reader of layout ``name`` for this table; raises ValueError for an unknown name."""
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; known: {sorted(FORMATS)}")
    return FORMATS[name](rows)


_HF_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def is_hf_dataset(path: str | os.PathLike) -> bool:
    """A ``save_to_disk`` folder, a ``.parquet`` file or a folder of ``.parquet`` files."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".parquet"
    return p.is_dir() and (any((p / m).is_file() for m in _HF_MARKERS)
                           or any(p.glob("*.parquet")))


def read_hf(path: Path) -> list[dict]:
    """Rows of a local Hugging Face dataset, images as raw ``{"bytes", "path"}`` structs.

    Reads with ``datasets`` when it is installed, else with ``pyarrow`` alone (parquet
    files, or the ``.arrow`` files of a ``save_to_disk`` folder). Raises TableError.
    """
    try:
        import datasets
    except ImportError:
        return _read_arrow(path)
    try:
        if path.is_file() or not any((path / m).is_file() for m in _HF_MARKERS):
            files = [str(path)] if path.is_file() else sorted(map(str, path.glob("*.parquet")))
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types for unreadable folders
        raise TableError(f"{path}: cannot read as a Hugging Face dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise TableError(f"{path}: a dataset with splits {list(ds)}; pass one split's folder "
                         f"(e.g. {path / next(iter(ds))})")
    # the arrow rows hold images as their encoded {"bytes", "path"} structs (also inside
    # lists): decoding to PIL and re-encoding would change them
    return ds.with_format("arrow")[:].to_pylist()


def _read_arrow(path: Path) -> list[dict]:
    """:func:`read_hf` without ``datasets``: an image column is stored as its
    ``{"bytes", "path"}`` struct already, so the plain table is what the readers need."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: reading a Hugging Face dataset needs the package "
                         "'datasets' or 'pyarrow' (pip install datasets)") from None
    try:
        if path.is_file():
            return pq.read_table(path).to_pylist()
        files = sorted(path.glob("*.parquet"))
        if files:
            return [r for f in files for r in pq.read_table(f).to_pylist()]
        if (path / "dataset_dict.json").is_file():
            raise TableError(f"{path}: a dataset with several splits; pass one split's folder")
        rows = []
        for f in sorted(path.glob("*.arrow")):
            with pa.memory_map(str(f)) as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
        return rows
    except (OSError, pa.ArrowException) as exc:
        raise TableError(f"{path}: cannot read as a Hugging Face dataset: {exc}") from None


def read_tsv(path: Path) -> list[dict]:
    """Rows of a tab-separated file with a header line (VLMEvalKit's layout).

    Cells are strings; pandas-style quoting (fields with tabs or newlines in double quotes)
    is understood. Base64 images make cells far longer than :mod:`csv`'s default limit.
    """
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def placeholders(text: str) -> list[int]:
    """The image numbers ``k`` of the ``<image k>`` placeholders in ``text``, in order."""
    return [int(m.group(1)) for m in _PLACEHOLDER.finditer(text)]


def interleave(text: str, n_images: int) -> list[str | int]:
    """``text`` split at its ``<image k>`` placeholders: text parts and 0-based image indices.

    Images that no placeholder names come first, in order (VLMEvalKit puts a row's images
    before its text). Raises ValueError for a placeholder beyond ``n_images``.
    """
    named = placeholders(text)
    bad = [k for k in named if not 1 <= k <= n_images]
    if bad:
        raise ValueError(f"the text refers to <image {bad[0]}> but the item has {n_images} "
                         f"image{'s' if n_images != 1 else ''}")
    parts: list[str | int] = [k for k in range(n_images) if k + 1 not in named]
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        parts.append(int(m.group(1)) - 1)
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts
