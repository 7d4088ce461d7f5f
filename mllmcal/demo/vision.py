"""Stage 1 of the demo recipe: the vision tower and projector learn to read patches as words."""

from __future__ import annotations

from typing import Any

import numpy as np

from .shapes import GRID, OBJECT_COLORS, SHAPES

__all__ = ["pretrain_vision"]


def _patch_labels(items: list[dict[str, Any]]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per-patch targets for the vision pre-training, from the scene specs.

    The patch grid equals the scene's cell grid (``PATCH_SIZE == CELL``) and every object
    stays inside its cell, so patch ``row * GRID + col`` shows the object in that cell or
    nothing. Returns ``(image paths [M], shape ids int64 [M, GRID**2], colour ids int64
    [M, GRID**2])`` over the distinct images; an empty patch gets ``len(SHAPES)`` and
    ``len(OBJECT_COLORS)``. A hard colour item's label is its named colour (the nearer one).
    """
    colors = list(OBJECT_COLORS)
    seen: dict[str, int] = {}
    shapes_l, colors_l = [], []
    for it in items:
        if "scene" not in it or "image" not in it or it["image"] in seen:
            continue
        s = np.full(GRID * GRID, len(SHAPES), dtype=np.int64)
        c = np.full(GRID * GRID, len(colors), dtype=np.int64)
        for obj in it["scene"]:
            k = obj["cell"][0] * GRID + obj["cell"][1]
            s[k], c[k] = SHAPES.index(obj["shape"]), colors.index(obj["color"])
        seen[it["image"]] = len(shapes_l)
        shapes_l.append(s)
        colors_l.append(c)
    return list(seen), np.stack(shapes_l), np.stack(colors_l)


def pretrain_vision(
    model, tokenizer, pixels, items: list[dict[str, Any]], steps: int, seed: int = 0,
    batch_size: int = 128, lr: float = 3e-3,
) -> dict[str, float]:
    """Stage 1: a vision tower and projector whose patch features read as words.

    LLaVA starts from a pre-trained vision encoder and first trains its projector so that
    image features land in the word-embedding space (feature alignment); the demo has
    neither, so it does both in a few seconds. Every patch that holds an object is pushed,
    through the projector and the (frozen, tied) word embeddings, towards the words of its
    shape, its colour and its place (cross-entropy against a target of 1/4 on each of, say,
    ``circle``, ``red``, ``top`` and ``left``). The language model then sees an object as
    something close to the embeddings of the words the question and the options are made
    of; the place words keep the patch position that a count or a quadrant needs. Without this the
    shape inside a 12 px patch is what the full model learns most slowly: it reaches the
    answer through five layers of language model and was still at chance after the demo's
    budget.

    Only the tower and the projector are updated. Features are the ones LLaVA reads:
    ``hidden_states[-1]`` without CLS (``vision_feature_select_strategy="default"``).

    Args:
        model: a ``LlavaForConditionalGeneration`` from :func:`~mllmcal.demo.model.init_demo_model`.
        tokenizer: its tokenizer (the shape, colour and place words must be in it).
        pixels: ``{image path: [3, H, W] float32}`` as :func:`mllmcal.demo.train._pixel_cache` returns.
        items: training records with ``scene`` specs; items without an image are ignored.
        steps: AdamW steps (constant rate ``lr``).
        seed, batch_size, lr: batch sampling and AdamW settings.

    Returns ``{"steps", "shape_accuracy", "color_accuracy"}``: on object patches
    of the last batches, how often the shape word beats the other shape words and the
    colour word the other colour words.
    """
    import torch

    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    paths, shape_y, color_y = _patch_labels(items)
    nan = float("nan")
    if not paths or steps <= 0:
        return {"steps": 0, "shape_accuracy": nan, "color_accuracy": nan}
    shape_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SHAPES)))
    color_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(OBJECT_COLORS)))
    where_ids = torch.tensor(tokenizer.convert_tokens_to_ids(["top", "bottom", "left", "right"]))
    if any((t == tokenizer.unk_token_id).any() for t in (shape_ids, color_ids, where_ids)):
        raise ValueError("the demo vocabulary lacks a shape, colour or position word")
    x_all = torch.stack([pixels[p] for p in paths])
    sy, cy = torch.from_numpy(shape_y), torch.from_numpy(color_y)
    emb = model.get_input_embeddings().weight.detach()  # frozen here; tied to the LM head
    gen = torch.Generator().manual_seed(seed)
    params = [*tower.parameters(), *projector.parameters()]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tower.train()
    projector.train()
    hits_s: list[float] = []
    hits_c: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(paths), (min(batch_size, len(paths)),), generator=gen)
        obj = sy[idx] < len(SHAPES)
        feats = tower(x_all[idx], output_hidden_states=True).hidden_states[-1][:, 1:]
        logp = (projector(feats[obj]) @ emb.T).log_softmax(-1)
        ys, yc = sy[idx][obj], cy[idx][obj]
        rows = torch.arange(len(ys))
        patch = torch.arange(GRID * GRID).expand(len(idx), -1)[obj]
        yv = where_ids[(patch // GRID >= GRID // 2).long()]  # top / bottom
        yh = where_ids[2 + (patch % GRID >= GRID // 2).long()]  # left / right
        loss = -0.25 * (
            logp[rows, shape_ids[ys]] + logp[rows, color_ids[yc]] + logp[rows, yv] + logp[rows, yh]
        ).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        with torch.no_grad():
            hits_s.append(float((logp[:, shape_ids].argmax(-1) == ys).float().mean()))
            hits_c.append(float((logp[:, color_ids].argmax(-1) == yc).float().mean()))
    return {
        "steps": steps,
        "shape_accuracy": float(np.mean(hits_s[-20:])),
        "color_accuracy": float(np.mean(hits_c[-20:])),
    }
