"""The paper's prompt format, shared by the evaluator and the embedded demo model.

Chen et al. (COLING 2025) ask for the option letter directly and open the answer with a
parenthesis, so that the first generated token is the letter::

    {question}
    Please provide the option letter directly.
    Answer: (

``answer_prefix`` ("Answer") is the part that prompt optimisation rewrites ("The answer
might be", "The answer must be", ...). Questions carry their options as lines
``(A) text``; an item's ``image`` placeholder is ``IMAGE_TOKEN`` on its own first line.
"""

from __future__ import annotations

import re

IMAGE_TOKEN = "<image>"
INSTRUCTION = "Please provide the option letter directly."
DEFAULT_ANSWER_PREFIX = "Answer"
IDK_OPTION_TEXT = "I don't know"
OPTION_LETTERS = "ABCDEFGH"
_OPTION_RE = re.compile(r"^\(([A-H])\)\s*(.*)$")


def format_question(question: str, options: list[str]) -> str:
    """``question`` followed by one ``(A) option`` line per option."""
    lines = [question.strip()]
    lines += [f"({OPTION_LETTERS[i]}) {opt}" for i, opt in enumerate(options)]
    return "\n".join(lines)


def parse_options(question_with_options: str) -> tuple[str, dict[str, str]]:
    """Split ``format_question`` text back into the stem and ``{letter: option}``."""
    stem, options = [], {}
    for line in question_with_options.replace(IMAGE_TOKEN, "").strip().splitlines():
        m = _OPTION_RE.match(line.strip())
        if m:
            options[m.group(1)] = m.group(2).strip()
        elif line.strip():
            stem.append(line.strip())
    return "\n".join(stem), options


def build_prompt(
    question_with_options: str, answer_prefix: str = DEFAULT_ANSWER_PREFIX, with_image: bool = True
) -> str:
    """The paper's prompt; with ``with_image`` the text starts with ``IMAGE_TOKEN``."""
    body = question_with_options.replace(IMAGE_TOKEN, "").strip()
    text = f"{body}\n{INSTRUCTION}\n{answer_prefix}: ("
    return f"{IMAGE_TOKEN}\n{text}" if with_image else text
