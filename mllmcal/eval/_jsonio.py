"""Reading JSON inputs with errors that name the file: invalid JSON and JSON nested too
deeply for Python's parser (a ``RecursionError`` otherwise) are both :class:`JSONInputError`.

One home for every JSON file the CLI reads (``report.json``; data files when the data
loader reads them through :func:`loads`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["JSONInputError", "loads", "read_json", "read_text"]


class JSONInputError(ValueError):
    """A JSON input that cannot be read; the message names the file (and line)."""


def loads(text: str, source: str | os.PathLike) -> Any:
    """``json.loads(text)``; ``source`` names the input in the error.

    Raises:
        JSONInputError: invalid JSON (``source:line: invalid JSON: ... (column c)``) or
            nesting deeper than the parser's recursion allows.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"{source}:{exc.lineno}: invalid JSON: {exc.msg} "
                             f"(column {exc.colno})") from None
    except RecursionError:
        # the C parser recurses once per nesting level and gives up near the interpreter's
        # recursion limit: no real report or data file nests that deep
        raise JSONInputError(f"{source}: JSON nested too deeply to read (more than about "
                             f"{sys.getrecursionlimit()} levels)") from None


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in the UTF-8 file ``path`` (see :func:`loads`).

    Raises:
        JSONInputError: the file cannot be read, is not UTF-8, or is not readable JSON.
    """
    return loads(read_text(path), path)


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; :class:`JSONInputError` names the file when it cannot
    be read or is not UTF-8."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except OSError as exc:
        raise JSONInputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise JSONInputError(f"{p}: not UTF-8 text ({exc.reason})") from None
