"""Teacher-forced next-token calibration of a ``transformers`` model over a corpus.

:func:`score_tokens` runs the model body once and sends its last hidden state through
the output embedding a few positions at a time, so no ``[B, L, V]`` logits tensor exists
at once; each ``[B, chunk, V]`` block goes to ``CalibrationState.update_logits`` (one fused
``token_stats`` pass with the histogram update).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ...ops import check_scalar_temperature
from .._feedback import new_calibration_state

__all__ = ["score_tokens", "iter_score_tokens"]


def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _final_logit_transform(model: torch.nn.Module):
    """Post-``lm_head`` transforms some causal LMs apply in ``forward``; the chunked path
    calls ``lm_head`` itself, so it must apply them too."""
    cfg = _text_config(model)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)

    def f(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None and scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return f


@torch.no_grad()
def score_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    state: Any = None,
    chunk_size: int | None = None,
    *,
    temperature: float = 1.0,
    n_bins: int = 15,
    ignore_index: int = -100,
    **model_kwargs: Any,
):
    """Teacher-forced next-token calibration of ``model`` on a batch, into a CalibrationState.

    Position ``i`` predicts token ``i + 1``: the target of position ``i`` is
    ``labels[:, i + 1]`` (the Hugging Face convention, labels aligned with ``input_ids``).
    Without ``labels``, the targets are ``input_ids`` where ``attention_mask`` is 1 and
    the token is not an image placeholder (``config.image_token_id`` /
    ``image_token_index``). Targets equal to ``ignore_index`` are skipped.

    The model body runs once. Its last hidden state ``[B, L, H]`` is then sent through the
    output embedding ``chunk_size`` positions at a time, and each ``[B, chunk, V]`` block
    (in the model's dtype) goes to ``state.update_logits``. No ``[B, L, V]`` logits tensor
    exists at once, in fp32 or otherwise. Known post-``lm_head`` transforms
    (``logit_scale``, ``final_logit_softcapping``) are applied. Models without a separate
    base model / output embedding fall back to one full forward (``chunk_size`` ignored).

    Args:
        model: a causal LM or a LLaVA-style model (``pixel_values`` etc. go in
            ``model_kwargs``), in eval mode.
        input_ids: int64 ``[B, L]``.
        attention_mask: ``[B, L]`` 0/1, optional.
        labels: int64 ``[B, L]`` aligned with ``input_ids``, optional.
        state: a ``CalibrationState`` to add to. By default a new one with ``n_bins``
            bins on the model's device.
        chunk_size: positions per ``lm_head`` block. By default it is chosen so that a
            block has about 2**24 logits.
        temperature: ``T > 0`` applied to the logits before the statistics.

    Returns:
        The ``CalibrationState`` (``state`` itself when given).
    """
    temperature = check_scalar_temperature(temperature)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    b, length = input_ids.shape
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and tuple(t.shape) != (b, length):
            raise ValueError(f"{name} must have the shape of input_ids {(b, length)}, got {tuple(t.shape)}")
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = input_ids.device
    if state is None:
        state = new_calibration_state(n_bins, device)

    if labels is None:
        target = input_ids.clone()
        if attention_mask is not None:
            target[attention_mask == 0] = ignore_index
        for cfg in (model.config, _text_config(model)):
            for attr in ("image_token_id", "image_token_index", "video_token_id"):
                tid = getattr(cfg, attr, None)
                if isinstance(tid, int):
                    target[input_ids == tid] = ignore_index
    else:
        target = labels.to(device=device, dtype=torch.long)
    # Shift: position i is scored against token i + 1; the last position has no target.
    target = torch.cat(
        [target[:, 1:], torch.full((b, 1), ignore_index, dtype=torch.long, device=device)], dim=1
    )
    if length == 0:
        return state

    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits
        state.update_logits(logits, target, temperature=temperature)
        return state

    hidden = base(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
    ).last_hidden_state
    vocab = head.weight.shape[0] if hasattr(head, "weight") else _text_config(model).vocab_size
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // max(1, b * vocab))
    transform = _final_logit_transform(model)
    for p0 in range(0, length, int(chunk_size)):
        p1 = min(length, p0 + int(chunk_size))
        tgt = target[:, p0:p1]
        logits = transform(head(hidden[:, p0:p1]))
        state.update_logits(logits, tgt, temperature=temperature)
        del logits
    return state


def iter_score_tokens(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], state: Any = None, **kwargs: Any
):
    """Run :func:`score_tokens` over an iterable of batches (dicts with ``input_ids`` and
    optionally ``attention_mask``, ``labels``, ``pixel_values``...), into one state."""
    for batch in batches:
        batch = dict(batch)
        state = score_tokens(model, batch.pop("input_ids"), state=state, **batch, **kwargs)
    return state
