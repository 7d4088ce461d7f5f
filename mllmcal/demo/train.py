"""Training the demo model, scoring it, and the on-disk cache behind :func:`get_demo`.

Two stages share one wall-clock budget, as LLaVA's recipe has them:

1. :func:`pretrain_vision` (``VISION_PRETRAIN_FRACTION`` of the budget): the vision tower
   and projector learn to turn each object patch into something close to the embeddings of
   its shape, colour and place words (feature alignment; the demo has no pre-trained CLIP).
2. Everything, teacher-forced cross-entropy on the answer: the option letter, the closing
   ``)`` and ``</s>``, given ``build_prompt(question, prefix, with_image)`` with ``prefix``
   drawn from :data:`~mllmcal.demo.model.ANSWER_PREFIXES`. A share of answerable items is
   shown without its image (label unchanged), so the text-only scenario sees a model that
   has only priors to go on, and a share is asked open-ended (answer: the option text).

There is no label smoothing and no weight decay, and the training set is small enough to
be seen many times over, so the model ends up over-confident on the hard items it
memorised, as fine-tuned MLLMs are (Chen et al.): what temperature scaling is for.

The schedule is wall-clock based (warm-up, then cosine decay to ``budget_s``), so a slower
machine trains for fewer steps rather than for longer.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..prompting import (
    IDK_OPTION_TEXT,
    IMAGE_TOKEN,
    OPTION_LETTERS,
    build_prompt,
    parse_options,
)
from .model import (
    ANSWER_PREFIXES,
    NUM_IMAGE_TOKENS,
    init_demo_model,
    save_checkpoint,
)
from .shapes import GRID, OBJECT_COLORS, SHAPES, build_dataset

CACHE_VERSION = "demo-v2"  # bump when the data set or the training changes
MARKER = "COMPLETE.json"
# Share of answerable, IDK-free training items shown without their image.
TEXT_ONLY_FRACTION = 0.08
# Share of the same items turned into open-ended questions (answer: the option text). Naming
# what is in the picture is one hop and is learnt fast; it gives the multiple-choice answer
# (match that name against the options, copy the letter) a head start.
OPEN_ENDED_FRACTION = 0.3
# Share of the training budget spent aligning the vision tower and projector (stage 1).
VISION_PRETRAIN_FRACTION = 0.08



def _question(item: dict[str, Any]) -> str:
    return item["conversations"][0]["value"]


def _answer(item: dict[str, Any]) -> str:
    return item["conversations"][1]["value"].strip()


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    # Expanding <image> here equals what LlavaProcessor does (pinned by a test) and avoids
    # re-running the image processor for every batch.
    texts = [p.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS) for p in prompts]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def _pixel_cache(processor, data_dir: Path, items: list[dict[str, Any]]):
    """``{image path: [3, H, W] float32 tensor}`` through the checkpoint's image processor."""
    from PIL import Image

    paths = sorted({it["image"] for it in items if "image" in it})
    cache = {}
    for start in range(0, len(paths), 256):
        chunk = paths[start : start + 256]
        images = [Image.open(data_dir / p).convert("RGB") for p in chunk]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        cache.update(zip(chunk, pixels, strict=True))
    return cache


def _batch(tokenizer, pixels, prompts, images, targets):
    """Right-padded ``input_ids`` with the targets appended, and where to read the loss.

    ``targets`` may differ in length. Returns ``(input_ids [B, L], attention_mask [B, L],
    pixel_values [M, 3, H, W] or None, positions [B, T], target_ids [B, T])``: logits at
    ``positions`` predict ``target_ids``; ``-100`` pads short targets.
    """
    import torch

    prompt_ids = _encode(tokenizer, prompts)
    seqs = [p + t for p, t in zip(prompt_ids, targets, strict=True)]
    length = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(seqs), length), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    n_t = max(len(t) for t in targets)
    target_ids = torch.full((len(seqs), n_t), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        target_ids[i, : len(t)] = torch.tensor(t)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids])
    positions = (starts[:, None] + torch.arange(n_t)[None, :]).clamp(max=length - 1)
    pv = [pixels[img] for img in images if img is not None]
    pixel_values = torch.stack(pv) if pv else None
    return input_ids, mask, pixel_values, positions, target_ids


def score_items(
    model,
    processor,
    data_dir: str | Path,
    items: list[dict[str, Any]],
    answer_prefix: str = ANSWER_PREFIXES[0],
    with_image: bool = True,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Teacher-forced scores of the first answer token for ``items`` (no generation).

    At the position right after ``build_prompt(...)`` (the ``(``), the full-vocabulary
    softmax gives ``confidence`` (max probability, float64 [n]), ``prediction`` (the argmax
    token decoded, str [n]) and ``correct`` (prediction equals the item's letter, bool [n]).
    Under greedy decoding this is the paper's first generated token whenever it is a letter.
    """
    import torch

    data_dir = Path(data_dir)
    tok = processor.tokenizer
    use = [with_image and "image" in it for it in items]
    pixels = _pixel_cache(processor, data_dir, [it for it, u in zip(items, use, strict=True) if u])
    confs, preds = [], []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            chunk_use = use[start : start + batch_size]
            prompts = [
                build_prompt(_question(it), answer_prefix, with_image=u)
                for it, u in zip(chunk, chunk_use, strict=True)
            ]
            images = [it["image"] if u else None for it, u in zip(chunk, chunk_use, strict=True)]
            ids, mask, pv, pos, _ = _batch(tok, pixels, prompts, images, [[0]] * len(chunk))
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
            last = logits[torch.arange(len(chunk)), pos[:, 0]].double()
            probs = last.softmax(-1)
            conf, arg = probs.max(-1)
            confs.append(conf.numpy())
            preds += tok.convert_ids_to_tokens(arg.tolist())
    answers = np.array([_answer(it) for it in items])
    prediction = np.array(preds)
    return {
        "confidence": np.concatenate(confs) if confs else np.zeros(0),
        "prediction": prediction,
        "correct": prediction == answers,
    }


def ece_l1(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 10) -> float:
    """Equal-width ECE (L1) in float64; only for the training summary."""
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - confidence[sel].mean())
    return float(total)


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
    model, tokenizer, pixels, items: list[dict[str, Any]], seconds: float, seed: int = 0,
    batch_size: int = 128, lr: float = 3e-3, max_steps: int | None = None,
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
        model: a ``LlavaForConditionalGeneration`` from :func:`init_demo_model`.
        tokenizer: its tokenizer (the shape, colour and place words must be in it).
        pixels: ``{image path: [3, H, W] float32}`` as :func:`_pixel_cache` returns.
        items: training records with ``scene`` specs; items without an image are ignored.
        seconds: wall-clock budget; ``max_steps`` (if given) stops earlier.
        seed, batch_size, lr: batch sampling and AdamW settings.

    Returns ``{"steps", "seconds", "shape_accuracy", "color_accuracy"}``: on object patches
    of the last batches, how often the shape word beats the other shape words and the
    colour word the other colour words.
    """
    import torch

    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    paths, shape_y, color_y = _patch_labels(items)
    nan = float("nan")
    if not paths or seconds <= 0:
        return {"steps": 0, "seconds": 0.0, "shape_accuracy": nan, "color_accuracy": nan}
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
    start, step = time.monotonic(), 0
    hits_s: list[float] = []
    hits_c: list[float] = []
    while time.monotonic() - start < seconds and (max_steps is None or step < max_steps):
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
        step += 1
        with torch.no_grad():
            hits_s.append(float((logp[:, shape_ids].argmax(-1) == ys).float().mean()))
            hits_c.append(float((logp[:, color_ids].argmax(-1) == yc).float().mean()))
    return {
        "steps": step,
        "seconds": round(time.monotonic() - start, 2),
        "shape_accuracy": float(np.mean(hits_s[-20:])),
        "color_accuracy": float(np.mean(hits_c[-20:])),
    }


class _ThreadChooser:
    """Picks 1 or ``max_threads`` torch threads by timing real training steps.

    On a shared machine, 2 OpenMP threads competing with other processes can be several
    times slower than 1 thread, and the load changes while we train. So a probe (steps
    alternating between the two counts, ``probe_len`` of them) runs after the untimed
    first step and again whenever ``reprobe_s`` seconds have passed since the last
    decision; in between, the count with the lower median step time is used.
    """

    def __init__(self, max_threads: int, probe_len: int = 4, reprobe_s: float = 20.0, clock=time.monotonic):
        self.max_threads = max(1, max_threads)
        self.probe_len, self.reprobe_s, self.clock = probe_len, reprobe_s, clock
        self.choice = self.max_threads
        self.plan: list[int] = []
        self.samples: dict[int, list[float]] = {}
        self.decided_at: float | None = None

    def threads(self, step: int) -> int:
        if self.max_threads == 1 or step == 0:  # step 0 pays one-off costs
            return self.choice
        if not self.plan and (self.decided_at is None or self.clock() - self.decided_at > self.reprobe_s):
            self.plan = [1 if i % 2 == 0 else self.max_threads for i in range(self.probe_len)]
            self.samples = {}
        return self.plan[0] if self.plan else self.choice

    def record(self, step: int, threads: int, seconds: float) -> None:
        if not self.plan or threads != self.plan[0]:
            return
        self.plan.pop(0)
        self.samples.setdefault(threads, []).append(seconds)
        if not self.plan:
            med = {n: float(np.median(t)) for n, t in self.samples.items()}
            self.choice = min(med, key=med.get)
            self.decided_at = self.clock()


def train_demo_model(
    data_dir: str | Path,
    out_dir: str | Path,
    budget_s: float = 170,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 2e-3,
    aux_weight: float = 0.1,
    max_threads: int = 2,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the tiny LLaVA on ``data_dir/train.json`` and save it to ``out_dir``.

    Args:
        data_dir: a directory written by :func:`~mllmcal.demo.build_dataset`.
        out_dir: receives the checkpoint (model, tokenizer, processor, chat template).
        budget_s: wall-clock training budget in seconds (the run stops earlier if the
            training loss has converged).
        seed: initialisation and batch order.
        batch_size, lr: AdamW settings; fp32 on the CPU with 2 threads.
        progress: show a tqdm bar over the budget.

    Returns:
        A summary dict: ``steps``, ``train_seconds``, ``examples``, ``final_loss`` and, when
        ``test.json`` exists, ``test_accuracy`` and ``test_ece`` (10 bins, ``Answer`` prefix,
        with image, teacher-forced first token).
    """
    import torch
    from tqdm.auto import tqdm

    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    data_dir = Path(data_dir)
    train_path = data_dir / "train.json"
    if not train_path.is_file():
        raise FileNotFoundError(f"{train_path} not found; build the data set first")
    items = json.loads(train_path.read_text())
    if not items:
        raise ValueError(f"{train_path} holds no items")

    prev_threads = torch.get_num_threads()
    try:
        model, processor = init_demo_model(data_dir, seed=seed)
        tok = processor.tokenizer
        close_id, eos_id = tok.convert_tokens_to_ids(")"), tok.eos_token_id
        image_id = model.config.image_token_id
        letter_ids = {c: tok.convert_tokens_to_ids(c) for c in OPTION_LETTERS}
        pixels = _pixel_cache(processor, data_dir, items)
        rng = np.random.default_rng(seed)
        droppable = np.array(
            ["image" in it and it.get("answerable", True) and it.get("idk_kind") is None
             and IDK_OPTION_TEXT not in _question(it) for it in items]
        )

        start = time.monotonic()
        bar = tqdm(total=int(budget_s), unit="s", desc="training demo model", disable=not progress)
        bar.set_postfix(stage="vision pre-training")
        vision = pretrain_vision(model, tok, pixels, items, VISION_PRETRAIN_FRACTION * budget_s, seed=seed)
        model.train()
        optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        # Stage 2 (everything, on the answers) gets the rest of the budget.
        stage2_start = time.monotonic()
        stage2_s = max(1e-3, budget_s - (stage2_start - start))
        warmup_s = min(10.0, 0.1 * stage2_s)
        losses: list[float] = []
        chooser = _ThreadChooser(max_threads)
        step, seen = 0, 0
        order = rng.permutation(len(items))
        cursor = 0
        while True:
            elapsed = time.monotonic() - stage2_start
            if elapsed >= stage2_s:
                break
            # Wall-clock schedule: linear warm-up, then cosine to zero at the budget.
            frac = min(1.0, elapsed / stage2_s)
            scale = min(1.0, (elapsed + 1e-3) / warmup_s) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in optim.param_groups:
                g["lr"] = lr * max(scale, 0.02)

            threads = chooser.threads(step)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            t_step = time.monotonic()
            if cursor + batch_size > len(order):
                order, cursor = rng.permutation(len(items)), 0
            idx = order[cursor : cursor + batch_size]
            cursor += batch_size
            prompts, images, targets, is_mc = [], [], [], []
            for i in idx:
                it = items[i]
                prefix = ANSWER_PREFIXES[int(rng.integers(len(ANSWER_PREFIXES)))]
                if droppable[i] and rng.random() < OPEN_ENDED_FRACTION:
                    # Open-ended twin: the option text itself, without options to pick from.
                    stem, options = parse_options(_question(it))
                    prompts.append(f"{IMAGE_TOKEN}\n{stem}\n{prefix}:")
                    images.append(it["image"])
                    words = tok(options[_answer(it)], add_special_tokens=False)["input_ids"]
                    targets.append([*words, eos_id])
                    is_mc.append(False)
                    continue
                with_image = "image" in it and not (droppable[i] and rng.random() < TEXT_ONLY_FRACTION)
                prompts.append(build_prompt(_question(it), prefix, with_image=with_image))
                images.append(it["image"] if with_image else None)
                targets.append([letter_ids[_answer(it)], close_id, eos_id])
                is_mc.append(True)
            ids, mask, pv, pos, tgt = _batch(tok, pixels, prompts, images, targets)
            hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pv).last_hidden_state
            rows = torch.arange(len(idx))[:, None]
            # The head only where a loss is read: [B, T] answer positions, not [B, L].
            picked = model.lm_head(hidden[rows, pos])
            loss_tok = torch.nn.functional.cross_entropy(
                picked.reshape(-1, picked.shape[-1]), tgt.reshape(-1), reduction="none"
            ).view(tgt.shape)
            loss = loss_tok.sum() / (tgt != -100).sum()
            if aux_weight > 0:
                # Next-token loss on the prompt text: free extra signal from the same forward
                # pass (the option letters follow A, B, C, D; the stems are templated).
                nxt = ids[:, 1:]
                keep = (mask[:, 1:] > 0) & (nxt != image_id)
                keep &= torch.arange(nxt.shape[1])[None, :] < pos[:, :1]
                h = hidden[:, :-1][keep]
                aux = torch.nn.functional.cross_entropy(model.lm_head(h), nxt[keep])
                loss = loss + aux_weight * aux
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()

            chooser.record(step, threads, time.monotonic() - t_step)
            step += 1
            seen += len(idx)
            mc = torch.tensor(is_mc)
            if mc.any():
                losses.append(float(loss_tok[mc, 0].detach().mean()))
            recent = float(np.mean(losses[-50:]))
            if step % 10 == 0:
                bar.n = min(int(time.monotonic() - start), int(budget_s))
                bar.set_postfix(step=step, letter_loss=f"{recent:.3f}")
            # Converged: even the hard items are memorised; more steps change nothing.
            if step >= 200 and recent < 1e-3:
                break
        train_seconds = time.monotonic() - start
        bar.n = min(int(train_seconds), int(budget_s))
        bar.close()

        save_checkpoint(model, processor, out_dir)
        summary: dict[str, Any] = {
            "steps": step,
            "examples": seen,
            "train_seconds": round(train_seconds, 2),
            "budget_s": budget_s,
            "seed": seed,
            "final_loss": float(np.mean(losses[-50:])),
            "vision_pretraining": vision,
        }
        test_path = data_dir / "test.json"
        if test_path.is_file():
            test_items = json.loads(test_path.read_text())
            scores = score_items(model, processor, data_dir, test_items)
            summary["test_accuracy"] = float(scores["correct"].mean())
            summary["test_ece"] = ece_l1(scores["confidence"], scores["correct"].astype(float))
            summary["test_mean_confidence"] = float(scores["confidence"].mean())
        return summary
    finally:
        torch.set_num_threads(prev_threads)


# ----------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    """``$MLLMCAL_CACHE`` if set, else ``~/.cache/mllmcal``."""
    env = os.environ.get("MLLMCAL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mllmcal"


@contextmanager
def _locked(path: Path):
    # One builder at a time: under torchrun every rank calls get_demo(); the others wait
    # and then find the marker.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def get_demo(
    cache_dir: str | Path | None = None,
    budget_s: float = 170,
    seed: int = 0,
    force: bool = False,
    sizes: dict[str, int] | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """The demo checkpoint and data set, built and trained on first use.

    Args:
        cache_dir: parent directory of the cache; default :func:`default_cache_root`.
            The demo lives in ``cache_dir/{CACHE_VERSION}-seed{seed}/`` as ``model/`` and ``data/``.
        budget_s: training budget in seconds, used only when (re)training.
        seed: data set and training seed; each seed has its own cache entry.
        force: rebuild and retrain even if a complete cache entry exists.
        sizes: split sizes for :func:`~mllmcal.demo.build_dataset` (default sizes if None),
            used only when (re)building.
        progress: show progress bars while building.

    Returns:
        ``(model_dir, data_dir)``. ``model_dir`` loads with ``AutoProcessor`` and
        ``AutoModelForImageTextToText``; ``data_dir`` holds ``{split}.json`` and ``images/``.

    A marker file (``COMPLETE.json``, holding the training summary) is written last; an
    entry without it (an interrupted build) is deleted and rebuilt, never half-used.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    entry = root / f"{CACHE_VERSION}-seed{seed}"
    model_dir, data_dir, marker = entry / "model", entry / "data", entry / MARKER
    if marker.is_file() and not force:
        return model_dir, data_dir
    with _locked(root / f".{entry.name}.lock"):
        if marker.is_file() and not force:  # another process finished while we waited
            return model_dir, data_dir
        if entry.exists():
            shutil.rmtree(entry)
        entry.mkdir(parents=True)
        build_dataset(data_dir, seed=seed, sizes=sizes)
        summary = train_demo_model(data_dir, model_dir, budget_s=budget_s, seed=seed, progress=progress)
        summary["sizes"] = {p.stem: len(json.loads(p.read_text())) for p in data_dir.glob("*.json")}
        tmp = entry / (MARKER + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, marker)
    return model_dir, data_dir


def demo_summary(model_dir: str | Path) -> dict[str, Any] | None:
    """The training summary stored in the cache marker next to ``model_dir``, if any."""
    marker = Path(model_dir).parent / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None
