"""Teacher-forced next-token calibration of a ``transformers`` model over a corpus
(:func:`score_tokens`, :func:`iter_score_tokens`)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from ...ops import check_scalar_temperature
from .._feedback import new_calibration_state

__all__ = ["score_tokens", "iter_score_tokens"]


def _text_config(model: torch.nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _fused_head(model: torch.nn.Module, head: Any, hidden: torch.Tensor, state: Any
                ) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """``(weight [V, H], bias or None, logit scale)`` when the logits are exactly
    ``scale * (hidden @ weight.T + bias)`` and ``state`` is a ``CalibrationState``, else
    None (the caller then materialises logits in chunks)."""
    from ...calibration import CalibrationState

    cfg = _text_config(model)
    scale = getattr(cfg, "logit_scale", None)
    scale = 1.0 if scale is None else float(scale)
    weight = getattr(head, "weight", None)
    bias = getattr(head, "bias", None)
    if (not isinstance(state, CalibrationState) or type(head) is not torch.nn.Linear
            or getattr(cfg, "final_logit_softcapping", None) is not None  # tanh: not linear
            or not (scale > 0 and math.isfinite(scale))
            or not isinstance(weight, torch.Tensor) or weight.dtype != hidden.dtype
            or weight.device != hidden.device
            or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or (bias is not None and bias.device != hidden.device)):
        return None
    return weight, bias, scale


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
    fused: bool = True,
    **model_kwargs: Any,
):
    """Teacher-forced next-token calibration of ``model`` on a batch, into a CalibrationState.

    Position ``i`` predicts token ``i + 1``: the target of position ``i`` is
    ``labels[:, i + 1]`` (the Hugging Face convention, labels aligned with ``input_ids``).
    Without ``labels``, the targets are ``input_ids`` where ``attention_mask`` is 1 and
    the token is not an image placeholder (``config.image_token_id`` /
    ``image_token_index``). Targets equal to ``ignore_index`` are skipped.

    The model body runs once and gives the last hidden state ``[B, L, H]``. Then, by route:

    * **fused** (the default, when ``state`` is a ``CalibrationState``, the output embedding
      is a plain ``nn.Linear`` on the hidden state's device and dtype, and the model applies
      no ``final_logit_softcapping``): :func:`mllmcal.linear_token_stats` on the hidden
      state and the head's weight and bias, filling the state's histogram directly. No
      logits tensor exists beyond one fp32 vocabulary tile (``chunk_size`` is unused). A
      ``logit_scale`` s is folded into the temperature (statistics of ``s·x / T`` are those
      of ``x / (T / s)``). The tiles' logits are fp32, so for a bf16/fp16 model the
      statistics are of ``hidden.float() @ weight.float().T``: more exact than the model's
      own half-precision logits, hence not bit-equal to them.
    * **chunked logits** (otherwise, or ``fused=False``): the hidden state goes through the
      output embedding ``chunk_size`` positions at a time, and each ``[B, chunk, V]`` block
      (in the model's dtype, after the known transforms ``logit_scale`` and
      ``final_logit_softcapping``, the latter a tanh the fused route cannot apply) goes to
      ``state.update_logits``; no ``[B, L, V]`` tensor exists at once.

    Models without a separate base model / output embedding fall back to one full forward
    (``chunk_size`` ignored).

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
        fused: allow the fused route (``False`` forces the chunked-logits route).

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
        state.update_logits(logits, target, temperature=temperature, ignore_index=ignore_index)
        return state

    hidden = base(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
    ).last_hidden_state
    route = _fused_head(model, head, hidden, state) if fused else None
    if route is not None:
        weight, bias, scale = route
        t_eff = check_scalar_temperature(temperature / scale)
        state.update_hidden(hidden, weight, target, t_eff, bias=bias, ignore_index=ignore_index)
        return state
    cfg = _text_config(model)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else cfg.vocab_size
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // max(1, b * vocab))
    # Post-lm_head transforms some causal LMs apply in forward: calling lm_head here, so must we.
    cap, scale = getattr(cfg, "final_logit_softcapping", None), getattr(cfg, "logit_scale", None)
    for p0 in range(0, length, int(chunk_size)):
        p1 = min(length, p0 + int(chunk_size))
        tgt = target[:, p0:p1]
        logits = head(hidden[:, p0:p1])
        if scale is not None and scale != 1.0:
            logits = logits * scale
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        state.update_logits(logits, tgt, temperature=temperature, ignore_index=ignore_index)
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
