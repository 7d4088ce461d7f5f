"""Answer confidence during greedy generation: the paper's ``letter`` method and two others.

* ``letter`` (the paper's): decode greedily for up to ``max_new_tokens``; the confidence
  is the full-vocabulary probability, at temperature T, of the FIRST generated token that
  decodes to an option letter. Greedy decoding picks the argmax, which does not depend
  on T, so that probability is the row's top-label confidence ``token_stats(...).confidence``
  at every T. Items whose generation never shows a letter are counted, not scored.
* ``option-softmax``: a softmax restricted to the option letters at the answer position
  (the first generated step), over the canonical letter tokens of the item's options.
* ``verbalized``: the model is asked for a 0-100 confidence; the generated text is parsed
  and parse failures are counted.

Temperature scaling without stored scores: :class:`AnswerTracker` keeps exactly ONE
logits row per item, the row at its answer position (``[B, V]`` for ``letter``, ``[B, 8]``
for ``option-softmax``), moved to host memory as ``row_dtype`` (fp16 by default) when the
batch ends. That costs ``2·V`` bytes per item: 64 KB for a 32k vocabulary, 250 KB for
128k, i.e. 64 MB per 1000 calibration items at V = 32k -- instead of
``max_new_tokens·V·4`` bytes per item for ``output_scores=True``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import mllmcal

from ..prompting import DEFAULT_ANSWER_PREFIX, OPTION_LETTERS
from .data import Item
from .models import EvalModel

__all__ = ["METHODS", "AnswerTracker", "ScoredBatch", "score_items", "VERBALIZED_INSTRUCTION",
           "parse_verbalized"]

METHODS = ("letter", "option-softmax", "verbalized")
VERBALIZED_INSTRUCTION = (
    "Please provide the option letter and your confidence from 0 to 100 that it is correct, "
    "as: letter) confidence"
)
_NUMBER_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)\s*%?")


class AnswerTracker:
    """Logits processor that finds each row's first option-letter token, on the device.

    Per decode step it runs one fused :func:`mllmcal.token_stats` over the ``[B, V]``
    scores and updates ``[B]`` device tensors; it never synchronises with the host and
    allocates no ``[B, V]`` buffer except the single ``answer_rows`` buffer created on
    the first step. Rows that already emitted EOS stop being tracked.

    After generation: ``found[B]`` bool, ``letter[B]`` option index (-1 if none),
    ``confidence[B]`` fp32 probability of that token at T=1, ``step[B]`` its position,
    ``answer_rows`` the ``[B, V]`` scores at that step (``letter``) or the ``[B, L]``
    canonical-letter logits at the first step (``option-softmax``).
    """

    def __init__(self, letter_of_token: torch.Tensor, answer_token_ids: Sequence[int],
                 eos_token_ids: Sequence[int], keep: str = "letter_row") -> None:
        self.letter_of_token = letter_of_token
        self.answer_ids = torch.tensor([max(i, 0) for i in answer_token_ids],
                                       device=letter_of_token.device)
        self.eos = torch.tensor(list(eos_token_ids) or [-1], device=letter_of_token.device)
        self.keep = keep
        self.step_index = 0
        self.found = self.letter = self.confidence = self.step = self.answer_rows = None
        self._done = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        b = scores.shape[0]
        if self.step_index == 0:
            dev = scores.device
            self.found = torch.zeros(b, dtype=torch.bool, device=dev)
            self._done = torch.zeros(b, dtype=torch.bool, device=dev)
            self.letter = torch.full((b,), -1, dtype=torch.int64, device=dev)
            self.confidence = torch.full((b,), float("nan"), dtype=torch.float32, device=dev)
            self.step = torch.full((b,), -1, dtype=torch.int64, device=dev)
            if self.keep == "letter_row":
                self.answer_rows = scores.detach().clone()
            elif self.keep == "option_logits":
                self.answer_rows = scores.detach().index_select(1, self.answer_ids).float()
        else:
            self._done |= torch.isin(input_ids[:, -1], self.eos)
        s = mllmcal.token_stats(scores.detach())
        letter = self.letter_of_token[s.prediction.clamp(min=0)]
        new = (~self.found) & (~self._done) & (letter >= 0) & s.valid
        self.letter = torch.where(new, letter, self.letter)
        self.confidence = torch.where(new, s.confidence, self.confidence)
        self.step = torch.where(new, torch.full_like(self.step, self.step_index), self.step)
        if self.keep == "letter_row" and self.step_index > 0:
            torch.where(new[:, None], scores.detach(), self.answer_rows, out=self.answer_rows)
        self.found |= new
        self.step_index += 1
        return scores


class _StopWhenAnswered:
    """Stopping criterion: a row is finished once its letter has been found."""

    def __init__(self, tracker: AnswerTracker) -> None:
        self.tracker = tracker

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return self.tracker.found.clone()


@dataclass
class ScoredBatch:
    """Per-item results of one batch.

    ``records`` are JSON-able dicts (``id``, ``answer``, ``pred`` letter or None,
    ``correct``, ``confidence`` at T=1 or None, ``answerable``, ``idk``, ``text``).
    ``rows`` is ``[b, W]`` of ``row_dtype`` on the CPU for the items with a kept row
    (``row_ids`` lists them), with ``labels[b]`` the index of the answer within a row;
    None for ``verbalized``.
    """

    records: list[dict]
    row_ids: list[str]
    rows: torch.Tensor | None
    labels: torch.Tensor | None


def parse_verbalized(text: str, letters: str) -> tuple[str | None, float | None]:
    """Letter and confidence in [0, 1] from text such as ``"B) 85"``; None where missing."""
    t = text.strip().lstrip("(").strip()
    letter = t[0] if t and t[0] in letters and (len(t) == 1 or not t[1].isalpha()) else None
    rest = t[1:] if letter else t
    conf = None
    for m in _NUMBER_RE.finditer(rest):
        v = float(m.group(1))
        if 0.0 <= v <= 100.0:
            conf = v / 100.0
            break
    return letter, conf


def _load_image(path: str) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _shows_image(em: EvalModel, item: Item, with_image: bool) -> bool:
    return with_image and em.multimodal and item.image is not None and not item.withhold_image


@torch.inference_mode()
def _score_group(em: EvalModel, items: list[Item], method: str, answer_prefix: str,
                 with_image: bool, hint: str | None, max_new_tokens: int,
                 row_dtype: torch.dtype) -> ScoredBatch:
    instruction = VERBALIZED_INSTRUCTION if method == "verbalized" else None
    prompts = [em.render(it, answer_prefix, with_image=with_image, hint=hint,
                         instruction=instruction) for it in items]
    images = [_load_image(it.image) for it in items] if with_image else None
    inputs = em.encode(prompts, images)
    keep = {"letter": "letter_row", "option-softmax": "option_logits"}.get(method, "none")
    answer_ids = em.answer_token_ids(answer_prefix)  # the table of the prefix actually used
    tracker = AnswerTracker(em.letter_of_token, answer_ids, em.eos_token_ids, keep)
    from transformers import LogitsProcessorList, StoppingCriteriaList

    gen_kwargs: dict[str, Any] = dict(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        logits_processor=LogitsProcessorList([tracker]), return_dict_in_generate=True,
        pad_token_id=em.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
    )
    if method == "option-softmax":
        gen_kwargs["max_new_tokens"] = 1  # only the answer position is needed
    elif method == "letter":
        gen_kwargs["stopping_criteria"] = StoppingCriteriaList([_StopWhenAnswered(tracker)])
    out = em.model.generate(**inputs, **gen_kwargs)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
    texts = em.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    records, row_ids, rows, labels = [], [], None, None
    if method == "letter":
        found = tracker.found.cpu()
        letter = tracker.letter.cpu()
        conf = tracker.confidence.cpu()
        ans = torch.tensor([it.answer_index for it in items], device=em.letter_of_token.device)
        # label for the NLL: the answer letter's spelling the model likes best in that row
        variants = em.letter_of_token[None, :] == ans[:, None]
        masked = torch.where(variants, tracker.answer_rows.float(), float("-inf"))
        label_tok = masked.argmax(dim=1).cpu()
        keep_idx = [i for i in range(len(items)) if bool(found[i])]
        if keep_idx:
            sel = torch.tensor(keep_idx, device=em.letter_of_token.device)
            rows = tracker.answer_rows.index_select(0, sel).to(row_dtype).cpu()
            labels = label_tok[keep_idx]
            row_ids = [items[i].id for i in keep_idx]
        for i, it in enumerate(items):
            li = int(letter[i])
            pred = OPTION_LETTERS[li] if bool(found[i]) else None
            records.append(_record(it, pred, float(conf[i]) if pred else None, texts[i],
                                   step=int(tracker.step[i])))
    elif method == "option-softmax":
        logits = tracker.answer_rows.cpu()
        n_opt = torch.tensor([len(it.options) for it in items])
        logits[torch.arange(logits.shape[1])[None, :] >= n_opt[:, None]] = float("-inf")
        missing = torch.tensor([c < 0 for c in answer_ids])
        logits[:, missing] = float("-inf")
        s = mllmcal.token_stats(logits)
        rows, labels = logits.to(row_dtype), torch.tensor([it.answer_index for it in items])
        row_ids = [it.id for it in items]
        for i, it in enumerate(items):
            ok = bool(s.valid[i])
            pred = OPTION_LETTERS[int(s.prediction[i])] if ok else None
            records.append(_record(it, pred, float(s.confidence[i]) if ok else None, texts[i]))
    else:
        for i, it in enumerate(items):
            letter, conf = parse_verbalized(texts[i], it.letters)
            rec = _record(it, letter if conf is not None else None, conf, texts[i])
            rec["parse_failure"] = letter is None or conf is None
            records.append(rec)
    return ScoredBatch(records, row_ids, rows, labels)


def _record(item: Item, pred: str | None, conf: float | None, text: str, step: int = 0) -> dict:
    idk = item.idk_letter
    return {
        "id": item.id, "answer": item.answer, "pred": pred,
        "correct": pred is not None and pred == item.answer,
        "confidence": conf, "answerable": item.answerable,
        "idk": pred is not None and pred == idk, "text": text[:200], "step": step,
        "idk_mode": item.meta.get("idk_mode") or item.meta.get("idk_kind"),
    }


def score_items(em: EvalModel, items: Sequence[Item], method: str = "letter",
                answer_prefix: str = DEFAULT_ANSWER_PREFIX, with_image: bool = True,
                hint: str | None = None, batch_size: int = 8, max_new_tokens: int = 20,
                row_dtype: torch.dtype = torch.float16) -> Iterator[ScoredBatch]:
    """Score ``items`` in batches; yields one :class:`ScoredBatch` per batch.

    Items that show an image and items that do not are batched separately (a processor
    batch is all-image or all-text). ``with_image=False`` is the text-only modality.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[bool, list[Item]] = {True: [], False: []}
    for it in items:
        groups[_shows_image(em, it, with_image)].append(it)
    for shown, group in groups.items():
        for start in range(0, len(group), batch_size):
            yield _score_group(em, group[start:start + batch_size], method, answer_prefix,
                               shown, hint, max_new_tokens, row_dtype)
