"""Answer confidence during greedy generation: the paper's ``letter`` method and two others.

* ``letter`` (the paper's): decode greedily for up to ``max_new_tokens``; the confidence
  is the full-vocabulary probability, at temperature T, of the FIRST generated token that
  decodes to one of the item's option letters (a 4-option item is not answered by "E"). Greedy decoding picks the argmax, which does not depend
  on T, so that probability is the row's top-label confidence ``token_stats(...).confidence``
  at every T. Items whose generation never shows a letter are counted, not scored.
* ``option-softmax``: a softmax restricted to the option letters at the answer position
  (the first generated step), over the canonical letter tokens of the item's options.
* ``verbalized``: the model is asked for a 0-100 confidence; the generated text is parsed
  and parse failures are counted.

The in-loop work is the ``transformers`` integration's, used as any user would use it
(one implementation): a :class:`~mllmcal.integrations.transformers.CalibratedLogitsProcessor`
(observe-only, T = 1) computes each step's statistics with one fused op and keeps that
step's ``z`` in its own buffer; :class:`~mllmcal.integrations.transformers.StopAtAnswer`
reads the chosen token after each step, records the first option-letter token's
log-probability and step, keeps that step's row (``keep_rows``) and finishes the row, so
``generate`` stops once every row has answered or ended. Per item exactly ONE logits row
leaves the loop, the row at its answer position (``[B, V]`` for ``letter``, ``[B, 8]``
for ``option-softmax``), for temperature scaling; nothing like ``output_scores=True``
(``max_new_tokens·V`` values per item) is kept, and the runner stores none
(:mod:`mllmcal.eval.runner`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import mllmcal

from ..prompting import DEFAULT_ANSWER_PREFIX, OPTION_LETTERS
from .data import Item
from .models import EvalModel

__all__ = ["METHODS", "ScoredBatch", "score_items", "split_supported", "VERBALIZED_INSTRUCTION",
           "parse_verbalized"]

_log = logging.getLogger("mllmcal.eval")

METHODS = ("letter", "option-softmax", "verbalized")
VERBALIZED_INSTRUCTION = (
    "Please provide the option letter and your confidence from 0 to 100 that it is correct, "
    "as: letter) confidence"
)
_NUMBER_RE = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)\s*%?")


@dataclass
class ScoredBatch:
    """Per-item results of one batch.

    ``records`` are JSON-able dicts (``id``, ``answer``, ``pred`` letter or None,
    ``correct``, ``confidence`` at T=1 or None, ``answerable``, ``idk``, ``text``,
    ``category``, ``l2_category``, and ``option_probs``: the item's probability of each of
    its options at T = 1, a list of ``len(options)`` floats, or None without an answer
    step; see :func:`_letter_option_probs`).
    ``rows`` is the fp32 ``[b, W]`` answer-position logits (``z`` at T = 1) of the items
    that have one (``row_ids`` lists them; ``letter``: the items that answered), on the
    scores' device, with int64 ``labels[b]`` the index of the answer within a row (on the
    CPU); None for ``verbalized``.
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


def _check_args(method: str, batch_size: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _shows_image(em: EvalModel, item: Item, with_image: bool) -> bool:
    return with_image and em.multimodal and item.image is not None and not item.withhold_image


def _item_images(em: EvalModel, item: Item) -> Any:
    """What the processor gets for ``item``: its one image, or all of them in prompt order."""
    if len(item.images) > 1:
        return [_load_image(item.images[k]) for k in em.image_order(item)]
    return _load_image(item.image)


def split_supported(em: EvalModel, items: Sequence[Item], with_image: bool = True
                    ) -> tuple[list[Item], list[tuple[Item, str]]]:
    """``items`` the model can take in this modality, and ``(item, reason)`` for each it
    cannot (more images than it takes: :meth:`EvalModel.image_limit_reason`), each said in
    a warning that names the model and the item. Nothing is cut to fewer images."""
    kept, skipped = [], []
    for it in items:
        n = len(em.image_order(it)) if len(it.images) > 1 else 1
        why = em.image_limit_reason(n) if _shows_image(em, it, with_image) else None
        if why is None:
            kept.append(it)
            continue
        msg = f"model {em.name!r} cannot take item {it.id}: it shows {n} images and {why}"
        _log.warning("%s; skipped", msg)
        skipped.append((it, msg))
    return kept, skipped


@torch.inference_mode()
def _score_group(em: EvalModel, items: list[Item], method: str, answer_prefix: str,
                 with_image: bool, hint: str | None, max_new_tokens: int) -> ScoredBatch:
    instruction = VERBALIZED_INSTRUCTION if method == "verbalized" else None
    prompts = [em.render(it, answer_prefix, with_image=with_image, hint=hint,
                         instruction=instruction) for it in items]
    images = [_item_images(em, it) for it in items] if with_image else None
    inputs = em.encode(prompts, images)
    answer_ids = em.answer_token_ids(answer_prefix)  # the table of the prefix actually used
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from ..integrations.transformers import CalibratedLogitsProcessor, StopAtAnswer

    # observe-only at T = 1: the greedy tokens are the model's; verbalized reads text only
    proc = CalibratedLogitsProcessor(temperature=1.0)
    gen_kwargs: dict[str, Any] = dict(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
        logits_processor=LogitsProcessorList([] if method == "verbalized" else [proc]),
        return_dict_in_generate=True,
        pad_token_id=em.tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
    )
    stop = None
    if method == "option-softmax":
        gen_kwargs["max_new_tokens"] = 1  # only the answer position is needed
    elif method == "letter":
        # Per row, the letters of ITS options: "E" is no answer to a 4-option item.
        lo = em.letter_of_token
        n_opt = torch.tensor([len(it.options) for it in items], device=lo.device)
        answer_mask = (lo[None, :] >= 0) & (lo[None, :] < n_opt[:, None])
        stop = StopAtAnswer(proc, answer_mask, eos_token_id=em.eos_token_ids, keep_rows=True)
        gen_kwargs["stopping_criteria"] = StoppingCriteriaList([stop])
    out = em.model.generate(**inputs, **gen_kwargs)
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
    texts = em.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    if method == "option-softmax":
        # the answer position is the first (only) step: its z = scores at T = 1
        z = proc.latest_scaled_scores()
        ids = torch.tensor([max(i, 0) for i in answer_ids], device=z.device)
        return option_softmax_batch(items, z.index_select(1, ids).float().cpu(), answer_ids,
                                    texts)
    if method == "verbalized":
        return verbalized_batch(items, texts)
    records, row_ids, rows, labels = [], [], None, None
    assert stop is not None
    answer_rows = stop.rows  # [B, V] z at T = 1 of each row's answer step
    letter_of = em.letter_of_token.to(answer_rows.device)  # the scores' device
    # A row whose answer step had no finite maximum (NaN/+inf logits) has a NaN
    # log-probability: counted as unanswered, as an invalid row never enters a histogram.
    found_d = stop.found & torch.isfinite(stop.logprob)
    letter_d = torch.where(found_d, letter_of[stop.token.clamp(min=0)], -1)
    found, letter, conf = found_d.cpu(), letter_d.cpu(), stop.confidence.cpu()
    step = stop.step.cpu()
    ans = torch.tensor([it.answer_index for it in items], device=answer_rows.device)
    # label for the NLL: the answer letter's spelling the model likes best in that row
    variants = letter_of[None, :] == ans[:, None]
    masked = torch.where(variants, answer_rows.float(), float("-inf"))
    label_tok = masked.argmax(dim=1).cpu()
    keep_idx = [i for i in range(len(items)) if bool(found[i])]
    probs = _letter_option_probs(answer_rows, letter_of, keep_idx, items)
    if keep_idx:
        sel = torch.tensor(keep_idx, device=answer_rows.device)
        rows = answer_rows.index_select(0, sel).float()
        labels = label_tok[keep_idx]
        row_ids = [items[i].id for i in keep_idx]
    for i, it in enumerate(items):
        li = int(letter[i])
        pred = OPTION_LETTERS[li] if bool(found[i]) else None
        records.append(_record(it, pred, float(conf[i]) if pred else None, texts[i],
                               step=int(step[i]), option_probs=probs.get(i)))
    return ScoredBatch(records, row_ids, rows, labels)


def option_softmax_batch(items: Sequence[Item], logits: torch.Tensor, answer_ids: Sequence[int],
                         texts: Sequence[str]) -> ScoredBatch:
    """The ``option-softmax`` batch of either engine from the answer position's fp32 logits
    ``[b, 8]`` of the option letters' tokens (CPU; ``answer_ids[j] < 0``: letter ``j`` has
    no token). Letters past an item's options, or without a token, get probability 0."""
    n_opt = torch.tensor([len(it.options) for it in items])
    logits[torch.arange(logits.shape[1])[None, :] >= n_opt[:, None]] = float("-inf")
    logits[:, torch.tensor([c < 0 for c in answer_ids])] = float("-inf")
    s = mllmcal.token_stats(logits)
    soft = torch.softmax(logits.double(), dim=1)  # over the item's letters
    records = []
    for i, it in enumerate(items):
        ok = bool(s.valid[i])
        pred = OPTION_LETTERS[int(s.prediction[i])] if ok else None
        records.append(_record(it, pred, float(s.confidence[i]) if ok else None, texts[i],
                               option_probs=soft[i, :len(it.options)].tolist() if ok else None))
    return ScoredBatch(records, [it.id for it in items], logits,
                       torch.tensor([it.answer_index for it in items]))


def verbalized_batch(items: Sequence[Item], texts: Sequence[str]) -> ScoredBatch:
    """The ``verbalized`` batch of either engine from the generated ``texts``."""
    records = []
    for it, text in zip(items, texts, strict=True):
        letter, conf = parse_verbalized(text, it.letters)
        rec = _record(it, letter if conf is not None else None, conf, text)
        rec["parse_failure"] = letter is None or conf is None
        records.append(rec)
    return ScoredBatch(records, [], None, None)


def _letter_option_probs(rows: torch.Tensor, letter_of: torch.Tensor, keep: list[int],
                         items: Sequence[Item]) -> dict[int, list[float]]:
    """The letter method's option probabilities: per answered row ``i`` (``keep``), the
    full-vocabulary softmax (T = 1) of its answer-step row summed over the tokens of each
    of the item's letters (every spelling: ``letter_of_token == j``, ``j < n_options``).

    They do not sum to 1 (the rest of the vocabulary keeps its mass); conformal prediction
    renormalises them over the options. ``rows`` ``[B, V]`` on the scores' device,
    ``letter_of`` ``[V]`` int64 there. Returns ``{i: [n_options floats]}``.
    """
    if not keep:
        return {}
    sel = torch.tensor(keep, device=rows.device)
    p = torch.softmax(rows.index_select(0, sel).double(), dim=1)  # [k, V]
    letter = letter_of.clamp(min=0)
    per_letter = torch.zeros(len(keep), len(OPTION_LETTERS), dtype=torch.float64,
                             device=rows.device)
    per_letter.index_add_(1, letter, torch.where(letter_of[None, :] >= 0, p, 0.0))
    per_letter = per_letter.cpu()
    return {i: per_letter[k, :len(items[i].options)].tolist() for k, i in enumerate(keep)}


def _record(item: Item, pred: str | None, conf: float | None, text: str, step: int = 0,
            option_probs: list[float] | None = None) -> dict:
    idk = item.idk_letter
    return {
        "id": item.id, "answer": item.answer, "pred": pred,
        "correct": pred is not None and pred == item.answer,
        "confidence": conf, "answerable": item.answerable,
        "idk": pred is not None and pred == idk, "text": text[:200], "step": step,
        "idk_mode": item.meta.get("idk_mode") or item.meta.get("idk_kind"),
        "category": item.category, "l2_category": item.l2_category,
        "option_probs": option_probs,
    }


def score_items(em: EvalModel, items: Sequence[Item], method: str = "letter",
                answer_prefix: str = DEFAULT_ANSWER_PREFIX, with_image: bool = True,
                hint: str | None = None, batch_size: int = 8,
                max_new_tokens: int = 20) -> Iterator[ScoredBatch]:
    """Score ``items`` in batches; yields one :class:`ScoredBatch` per batch.

    Items that show an image and items that do not are batched separately (a processor
    batch is all-image or all-text), and items with several images by their count.
    ``with_image=False`` is the text-only modality. Items with more images than the model
    takes are skipped with a warning (:func:`split_supported`) and get no record.
    """
    _check_args(method, batch_size)
    items, _ = split_supported(em, items, with_image)
    # (shows images, how many): one-image items batch as they always did, then the rest
    groups: dict[tuple[bool, int], list[Item]] = {(True, 1): [], (False, 0): []}
    for it in items:
        shown = _shows_image(em, it, with_image)
        n = (len(em.image_order(it)) if len(it.images) > 1 else 1) if shown else 0
        groups.setdefault((shown, n), []).append(it)
    for (shown, _), group in sorted(groups.items(), key=lambda g: (not g[0][0], g[0][1])):
        for start in range(0, len(group), batch_size):
            yield _score_group(em, group[start:start + batch_size], method, answer_prefix,
                               shown, hint, max_new_tokens)
