"""The paper's prompt, as chat messages: shared by the evaluator and the embedded demo.

This module is neutral ground: ``mllmcal.eval`` and ``mllmcal.demo`` both import it and
neither imports the other.

Chen et al. (COLING 2025) ask for the option letter directly and open the answer with a
parenthesis, so that the first generated token is the letter::

    {question}
    (A) option
    (B) option
    Please provide the option letter directly.
    Answer: (

``answer_prefix`` ("Answer") is the part that prompt optimisation rewrites ("The answer
might be", "The answer must be", ...). Questions carry their options as lines
``(A) text``. :func:`chat_messages` is the one place the prompt becomes a conversation;
the image and text-only versions of a prompt differ only in the image part.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "ABSTENTION_HINTS",
    "DEFAULT_ANSWER_PREFIX",
    "IDK_OPTION_TEXT",
    "IMAGE_TOKEN",
    "INSTRUCTION",
    "OPTION_LETTERS",
    "answer_opening",
    "build_prompt",
    "chat_messages",
    "format_question",
    "parse_options",
    "user_text",
]

#: The LLaVA placeholder; real processors have their own (``processor.image_token``).
IMAGE_TOKEN = "<image>"
INSTRUCTION = "Please provide the option letter directly."
DEFAULT_ANSWER_PREFIX = "Answer"
IDK_OPTION_TEXT = "I don't know"
OPTION_LETTERS = "ABCDEFGH"
_OPTION_RE = re.compile(r"^\(([A-H])\)\s*(.*)$")

#: Prompt variants for the "I don't know" study: ``None`` is the plain prompt; the others
#: add one sentence after the options that invites abstention.
ABSTENTION_HINTS: dict[str, str | None] = {
    "plain": None,
    "invite": f'If the question cannot be answered, choose "{IDK_OPTION_TEXT}".',
    "strict": f'Answer only if you are sure; otherwise choose "{IDK_OPTION_TEXT}".',
}


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


def user_text(question_with_options: str, hint: str | None = None,
              instruction: str | None = None) -> str:
    """The user turn's text: question and options, the optional hint, the instruction."""
    body = question_with_options.replace(IMAGE_TOKEN, "").strip()
    if hint:
        body = f"{body}\n{hint}"
    return f"{body}\n{INSTRUCTION if instruction is None else instruction}"


def answer_opening(answer_prefix: str = DEFAULT_ANSWER_PREFIX) -> str:
    """The open assistant turn, ``"{answer_prefix}: ("``: the next token is the letter."""
    return f"{answer_prefix}: ("


def chat_messages(question_with_options: str, answer_prefix: str = DEFAULT_ANSWER_PREFIX,
                  with_image: bool = True, hint: str | None = None,
                  instruction: str | None = None) -> list[dict[str, Any]]:
    """The prompt as chat messages with typed content parts.

    Returns ``[user, assistant]``: the user turn is ``[{"type": "image"}]`` (only when
    ``with_image``) followed by ``{"type": "text", "text": user_text(...)}``; the assistant
    turn holds :func:`answer_opening` and is meant to be continued
    (``apply_chat_template(messages, continue_final_message=True)``).
    """
    parts: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
    parts.append({"type": "text", "text": user_text(question_with_options, hint, instruction)})
    return [
        {"role": "user", "content": parts},
        {"role": "assistant", "content": [{"type": "text", "text": answer_opening(answer_prefix)}]},
    ]


def build_prompt(question_with_options: str, answer_prefix: str = DEFAULT_ANSWER_PREFIX,
                 with_image: bool = True, hint: str | None = None,
                 instruction: str | None = None, image_token: str = IMAGE_TOKEN) -> str:
    """The prompt as plain text, for models without a chat template.

    With ``with_image`` it starts with ``image_token`` (pass the processor's own
    placeholder) on its own line.
    """
    text = f"{user_text(question_with_options, hint, instruction)}\n{answer_opening(answer_prefix)}"
    return f"{image_token}\n{text}" if with_image else text
