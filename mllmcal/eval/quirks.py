"""Per-architecture prompt quirks, in one table keyed by the config's ``model_type``, and
the fixed date for chat templates that print today's.

The common path (:mod:`mllmcal.eval.models`) covers every architecture; an entry of
:data:`PROMPT_QUIRKS` names how one deviates from it. Quirks that can be read off the
checkpoint itself (a processor that writes BOS, a template that prints assistant content
as a string) are detected there, for any architecture, and are not listed here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["PROMPT_QUIRKS", "TEMPLATE_DATE", "PromptQuirks", "date_kwargs", "quirks_for"]

#: config attributes that may name an image's start and end marker tokens
_MARKER_ATTRS = (("vision_start_token_id", "vision_end_token_id"),
                 ("image_start_token_id", "image_end_token_id"))


@dataclass(frozen=True)
class PromptQuirks:
    """How an architecture's prompt deviates from the common path.

    Attributes:
        processor_layout: the processor lays out image tokens and BOS itself
            (``<image>*N <bos> prompt \n``; PaliGemma): the prompt is rendered without
            placeholder and the inputs are assembled by hand (``EvalModel.encode``).
        image_markers: pairs of config attributes that may name the image start/end
            marker tokens a prompt without chat template wraps the image token in (the
            first pair the config has is used, when the processor does not write it).
        max_images: the most images one prompt may show (None: as many as the processor
            takes, which ``EvalModel.image_limit_reason`` tries); why each is set: see
            :data:`PROMPT_QUIRKS`.
    """

    processor_layout: bool = False
    image_markers: tuple[tuple[str, str], ...] = _MARKER_ATTRS
    max_images: int | None = None


#: ``model_type`` -> its quirks; a type not listed gets ``PromptQuirks()``.
#: Image markers: see ``EvalModel.image_placeholder`` (Qwen2-VL to Qwen3-VL, GLM-4.1V).
#: One image per prompt: LLaVA-1.5 and LLaVA-NeXT (trained on single-image conversations),
#: PaliGemma (its processor lays out the image tokens itself) and Llama 3.2 Vision (Meta's
#: model card: single-image reasoning); their processors would take several, and the
#: model would then see a layout it never learnt.
PROMPT_QUIRKS: dict[str, PromptQuirks] = {
    "paligemma": PromptQuirks(processor_layout=True, max_images=1),
    "llava": PromptQuirks(max_images=1),
    "llava_next": PromptQuirks(max_images=1),
    "mllama": PromptQuirks(max_images=1),
    "qwen2_vl": PromptQuirks(image_markers=_MARKER_ATTRS[:1]),
    "qwen2_5_vl": PromptQuirks(image_markers=_MARKER_ATTRS[:1]),
    "qwen3_vl": PromptQuirks(image_markers=_MARKER_ATTRS[:1]),
    "glm4v": PromptQuirks(image_markers=_MARKER_ATTRS[1:]),
}


def quirks_for(model_type: str | None) -> PromptQuirks:
    """The table's entry for ``model_type``, or the common path's ``PromptQuirks()``."""
    return PROMPT_QUIRKS.get(model_type or "", PromptQuirks())


#: The date templates that print "today" are rendered with (Llama 3.x's "Today Date: ...",
#: here its own fallback), so a prompt does not depend on the day of the run.
TEMPLATE_DATE = "26 Jul 2024"


_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(['"])([^'"]*)\1\s*\)""")


def date_kwargs(template: Any) -> dict[str, Any]:
    """``apply_chat_template`` arguments that pin a template's date to :data:`TEMPLATE_DATE`.

    Meta's Llama 3.1-3.3 templates (Llama 3.2 Vision's among them) print ``date_string``,
    which defaults to ``strftime_now("%d %b %Y")``: the day of the run; others (Mistral
    3's) call ``strftime_now`` directly. ``date_string`` is passed where the template
    reads it, and every ``strftime_now("<format>")`` call is replaced by the fixed date in
    that format, in a copy of the template passed as ``chat_template``. (A callable passed
    as a template variable would do on transformers 5.17, but 5.2x turns template
    variables into plain data, so the call would fail.) Templates given as a dict of
    named templates are left as they are.
    """
    import datetime

    if not isinstance(template, str):
        return {}
    out: dict[str, Any] = {}
    if "date_string" in template:
        out["date_string"] = TEMPLATE_DATE
    if "strftime_now" in template:
        day = datetime.datetime.strptime(TEMPLATE_DATE, "%d %b %Y")
        fixed = _STRFTIME_CALL.sub(lambda m: '"' + day.strftime(m.group(2)) + '"', template)
        if fixed != template:
            out["chat_template"] = fixed
    return out
