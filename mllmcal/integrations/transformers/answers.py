"""A stopping criterion that ends each row at its first answer token.

Multiple-choice evaluation (Chen et al., COLING 2025, https://aclanthology.org/2025.coling-main.208/)
reads the model's confidence at the first generated token that is an option letter.
:class:`StopAtAnswer` runs in ``generate``'s ``stopping_criteria``, which transformers
calls right after each step's token is appended to ``input_ids`` -- while the
:class:`~.processor.CalibratedLogitsProcessor` of the same call still holds that step's
``z = scores / T``. So it can read the answer token's exact log-probability (and, if asked,
keep the whole ``[B, V]`` row for temperature fitting) in the step itself, and finish the
row there; ``generate`` stops once every row has answered or ended.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria

from .processor import CalibratedLogitsProcessor
from .runs import eos_ids

__all__ = ["StopAtAnswer"]


class StopAtAnswer(StoppingCriteria):
    """Finish each row at its first generated answer token, recording that step.

    Use one per ``generate`` call, next to the processor of that call::

        proc = CalibratedLogitsProcessor(temperature=1.0)
        stop = StopAtAnswer(proc, answer_tokens, eos_token_id=eos)
        model.generate(..., logits_processor=[proc], stopping_criteria=[stop])

    Args:
        processor: the :class:`CalibratedLogitsProcessor` in the same call.
        answer_tokens: bool ``[V]`` mask of the answer tokens (every spelling of every option
            letter), or a sequence of their ids; or a bool ``[B, V]`` mask, one row per batch
            row, when rows have different answers (items with different option counts).
            ``V`` may be shorter than the model's vocabulary: ids past it are no answers.
        eos_token_id: id(s) that end a row without an answer.
        keep_rows: keep ``z`` ``[B, V]`` of each row's answer step in :attr:`rows`.

    After ``generate`` (all ``[B]`` on the scores' device): ``found`` (bool), ``step``
    (int64, -1 if none), ``token`` (int64, -1 if none), ``logprob`` (fp32
    ``log softmax(scores / T)[token]`` at that step, NaN if none), :attr:`confidence`
    (its ``exp``) and, with ``keep_rows``, ``rows`` (``[B, V]``; rows without an answer hold
    whatever the last step had).

    Per step it costs a handful of ``[B]`` ops, plus one ``[B, V]`` ``where`` with
    ``keep_rows``; no host synchronisation.
    """

    def __init__(
        self,
        processor: CalibratedLogitsProcessor,
        answer_tokens: torch.Tensor | Sequence[int],
        *,
        eos_token_id: int | Sequence[int] | None = None,
        keep_rows: bool = False,
    ) -> None:
        self.processor = processor
        mask = torch.as_tensor(answer_tokens)
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or mask.dim() > 1:
                raise TypeError("answer_tokens: a bool [V] or [B, V] mask, or a sequence of "
                                f"token ids; got a {mask.dtype} tensor of shape {tuple(mask.shape)}")
            ids = mask.reshape(-1).long()
            if ids.numel() and int(ids.min()) < 0:
                raise ValueError(f"answer_tokens: token ids must be >= 0, got {int(ids.min())}")
            mask = torch.zeros(int(ids.max()) + 1 if ids.numel() else 1, dtype=torch.bool)
            mask[ids] = True
        elif mask.dim() not in (1, 2) or mask.shape[-1] == 0:
            raise ValueError("answer_tokens: a bool mask must be [V] or [B, V] with V >= 1, "
                             f"got shape {tuple(mask.shape)}")
        self.answer_mask = mask
        self.eos = torch.tensor(eos_ids(eos_token_id) or [], dtype=torch.long)
        self.keep_rows = keep_rows
        self.reset()

    def reset(self) -> None:
        """Forget the previous call's rows (done automatically when the batch changes)."""
        self.found = self.step = self.token = self.logprob = self.rows = None
        self._ended = None
        self._n = 0

    @property
    def confidence(self) -> torch.Tensor:
        """``exp(logprob)``: the answer token's probability at its step, NaN if none."""
        return torch.exp(self.logprob)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        tok = input_ids[:, -1]
        b, dev = tok.shape[0], tok.device
        if self.answer_mask.dim() == 2 and self.answer_mask.shape[0] != b:
            raise ValueError(f"StopAtAnswer has a per-row answer mask for {self.answer_mask.shape[0]} "
                             f"rows, but generate runs {b} rows (num_return_sequences or "
                             "another batch?): give one mask row per row")
        if self.found is None or self.found.shape[0] != b:
            self.reset()
            self.found = torch.zeros(b, dtype=torch.bool, device=dev)
            self._ended = torch.zeros(b, dtype=torch.bool, device=dev)
            self.step = torch.full((b,), -1, dtype=torch.long, device=dev)
            self.token = torch.full((b,), -1, dtype=torch.long, device=dev)
            self.logprob = torch.full((b,), float("nan"), dtype=torch.float32, device=dev)
            self.answer_mask = self.answer_mask.to(dev)
            self.eos = self.eos.to(dev)
        z = self.processor.latest_scaled_scores()  # this step's z, before the next call
        lse = self.processor.latest_stats().logsumexp
        v = self.answer_mask.shape[-1]
        in_vocab = (tok >= 0) & (tok < v)
        col = tok.clamp(0, v - 1)
        if self.answer_mask.dim() == 2:  # row r's own mask at its token: one gather
            is_answer = self.answer_mask.gather(1, col[:, None]).squeeze(1) & in_vocab
        else:
            is_answer = self.answer_mask[col] & in_vocab
        new = is_answer & ~self.found & ~self._ended
        lp = z.gather(1, tok.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1).float() - lse
        self.logprob = torch.where(new, lp, self.logprob)
        self.token = torch.where(new, tok, self.token)
        self.step = torch.where(new, torch.full_like(self.step, self._n), self.step)
        if self.keep_rows:
            self.rows = z.clone() if self.rows is None else torch.where(new[:, None], z, self.rows)
        self.found = self.found | new
        if self.eos.numel():
            self._ended = self._ended | torch.isin(tok, self.eos)
        self._n += 1
        return self.found.clone()
