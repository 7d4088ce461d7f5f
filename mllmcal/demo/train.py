"""The demo model's training recipe and ``retrain`` (the one entry point: ``mllmcal demo
--retrain``).

:data:`RECIPE` is the one recipe the shipped checkpoint (``mllmcal/demo/checkpoint``) was
made with. It is step-based and seeded throughout (fixed step counts, a step-based
learning-rate schedule, a fixed torch thread count, no wall-clock decision anywhere), so a
rerun on the same machine type gives the same weights bit for bit; ``mllmcal demo
--retrain`` reruns it. Two stages, as LLaVA's recipe has them:

1. :func:`pretrain_vision` (``vision_steps``): the vision tower and projector learn to turn
   each object patch into something close to the embeddings of its shape, colour and place
   words (feature alignment; the demo has no pre-trained CLIP).
2. Everything, ``steps`` steps of teacher-forced cross-entropy on the answer (the option
   letter, the closing ``)`` and ``</s>``) given exactly the prompt the evaluator renders:
   ``processor.apply_chat_template(chat_messages(question, prefix, with_image, hint),
   continue_final_message=True)`` tokenized with special tokens on (BOS once), with
   ``prefix`` drawn from :data:`~mllmcal.demo.model.ANSWER_PREFIXES`. A share of answerable
   items is shown without its image (label unchanged), so the text-only scenario sees a
   model that has only priors to go on, and a share is asked open-ended (answer: the
   option text).
   Then one shorter focus cycle at a lower rate that draws the answerable items offering
   ``I don't know`` more often (see :class:`Recipe`), against false abstentions.

"I don't know" (Chen et al., COLING 2025: MLLMs rarely abstain unless the prompt invites
it): training items that offer ``I don't know`` are shown with one of the
:data:`~mllmcal.prompting.ABSTENTION_HINTS`. Under an inviting hint (``invite``,
``strict``) the target is ``I don't know`` exactly when the item is unanswerable (the three
kinds of :func:`mllmcal.eval.idk.build_idk_set`: option removed, mismatched image, image
withheld); under the plain prompt it never is: answerable items keep their letter and an
unanswerable one is trained towards a guess spread evenly over its other options.

There is no label smoothing and no weight decay, and the training set is small enough to
be seen many times over, so the model ends up over-confident on the hard items it
memorised, as fine-tuned MLLMs are (Chen et al.): what temperature scaling is for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.models import render_chat, special_tokens_on
from ..prompting import (
    ABSTENTION_HINTS,
    DEFAULT_ANSWER_PREFIX,
    IDK_OPTION_TEXT,
    IMAGE_TOKEN,
    OPTION_LETTERS,
    chat_messages,
    parse_options,
)
from .assets import CHECKPOINT_DIR, demo_data_dir, get_demo
from .model import ANSWER_PREFIXES, NUM_IMAGE_TOKENS, init_demo_model, save_checkpoint
from .shapes import DEFAULT_SIZES
from .vision import pretrain_vision

__all__ = [
    "RECIPE",
    "Recipe",
    "compare_weights",
    "get_demo",  # re-exported from .assets for callers that import it from here
    "render_prompt",
    "retrain",
    "train_demo_model",
]

RECIPE_FILE = "recipe.json"
SUMMARY_FILE = "training.json"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (besides the code and the thread count).

    Attributes:
        seed: data set, initialisation and batch-order seed.
        threads: torch CPU threads while training. A different count changes the order
            of floating-point reductions and so the weights' last bits. One thread: the
            result then does not depend on the machine's core count, and on the shared
            2-core box two OpenMP threads were ten times slower per step than one (1.3 s
            against 0.13 s, other jobs running).
        sizes: items per split of the data set that is built and trained on (``train``).
        vision_steps, vision_batch_size, vision_lr: stage 1 (AdamW, constant rate).
        steps, batch_size, lr: stage 2 (AdamW, betas 0.9/0.98, no weight decay), per cycle.
        warmup_steps, min_lr_fraction: linear warm-up, then cosine decay to
            ``lr * min_lr_fraction`` at ``steps``.
        cycles: stage 2 runs ``cycles`` times ``steps`` steps (warm restarts), each cycle
            with a fresh optimiser and batch order seeded by ``(seed, cycle)``.
        aux_weight: weight of the next-token loss on the prompt text.
        text_only_fraction: share of answerable, IDK-free items shown without their image.
        open_ended_fraction: share of the same items asked open-ended.
        plain_idk_fraction: share of IDK-offering items shown with the plain prompt (the
            rest is split evenly between the ``invite`` and ``strict`` hints).
        focus_steps, focus_lr, focus_control_repeats: after the ``cycles``, one more
            cycle (index ``cycles``; none if ``focus_steps`` is 0) of ``focus_steps`` steps
            at peak rate ``focus_lr``, same schedule shape, whose batch order draws each
            answerable item that offers ``I don't know`` (the IDK split's controls)
            ``focus_control_repeats`` times as often as any other item. Without it the
            model said "I don't know" to 17.5% of the answerable controls under the
            ``invite`` hint (a plain fourth cycle: 15.9%); these controls are a
            small share of the training set, so the boundary between "answerable, pick the
            letter" and "unanswerable, abstain" saw few examples on the answerable side.
            With 20 repeats (191 of the 2500 training items are such controls): 11.1%, the
            other figures holding (3 repeats: 15.9%, 5: 14.3%, 10: 14.3%, by the scorer).
    """

    seed: int = 0
    threads: int = 1
    sizes: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    vision_steps: int = 150
    vision_batch_size: int = 128
    vision_lr: float = 3e-3
    steps: int = 3000
    cycles: int = 3
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    min_lr_fraction: float = 0.02
    aux_weight: float = 0.1
    text_only_fraction: float = 0.08
    open_ended_fraction: float = 0.3
    plain_idk_fraction: float = 1 / 3
    focus_steps: int = 1200
    focus_lr: float = 5e-4
    focus_control_repeats: int = 20

    def validate(self) -> None:
        for name in ("threads", "vision_batch_size", "batch_size", "cycles",
                     "focus_control_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"recipe {name} must be >= 1, got {getattr(self, name)}")
        for name in ("steps", "vision_steps", "warmup_steps", "focus_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"recipe {name} must be >= 0, got {getattr(self, name)}")
        for name in ("text_only_fraction", "open_ended_fraction", "plain_idk_fraction",
                     "min_lr_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"recipe {name} must be in [0, 1], got {getattr(self, name)}")
        if self.focus_lr < 0:
            raise ValueError(f"recipe focus_lr must be >= 0, got {self.focus_lr}")

    @property
    def total_cycles(self) -> int:
        """``cycles`` plus the focus cycle, if any."""
        return self.cycles + (1 if self.focus_steps > 0 else 0)

    @property
    def total_steps(self) -> int:
        """Stage 2 steps over all cycles, the focus cycle included."""
        return self.steps * self.cycles + self.focus_steps

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sizes"] = dict(self.sizes)
        return d


#: The recipe of the shipped checkpoint.
RECIPE = Recipe()

#: Hints a training item offering "I don't know" is shown with, after the plain prompt.
_INVITING = ("invite", "strict")


def _question(item: dict[str, Any]) -> str:
    return item["conversations"][0]["value"]


def _answer(item: dict[str, Any]) -> str:
    return item["conversations"][1]["value"].strip()


def render_prompt(processor, question_with_options: str,
                  answer_prefix: str = DEFAULT_ANSWER_PREFIX, with_image: bool = True,
                  hint: str | None = None) -> str:
    """The prompt as the evaluator renders it (:func:`mllmcal.eval.models.render_chat` of
    :func:`mllmcal.prompting.chat_messages`, the assistant turn left open).

    For the demo processor this equals :func:`mllmcal.prompting.build_prompt` (pinned by
    a test), so the next token after it is the option letter.
    """
    return render_chat(processor, chat_messages(question_with_options, answer_prefix,
                                                with_image, hint))


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts, as ``processor(text=prompt, images=...)`` gives them.

    Special tokens follow the evaluator's BOS rule
    (:func:`mllmcal.eval.models.special_tokens_on`). Expanding ``<image>`` here equals what
    ``LlavaProcessor`` does (pinned by a test) and avoids re-running the image processor
    for every batch.
    """
    out = []
    for p in prompts:
        text = p.replace(IMAGE_TOKEN, IMAGE_TOKEN * NUM_IMAGE_TOKENS)
        out.append(tokenizer(text, add_special_tokens=special_tokens_on(tokenizer, text))
                   ["input_ids"])
    return out


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

    ``targets`` may differ in length (and be empty). Returns ``(input_ids [B, L],
    attention_mask [B, L], pixel_values [M, 3, H, W] or None, positions [B, T],
    target_ids [B, T])``: logits at ``positions`` predict ``target_ids``; ``-100`` pads
    short targets. ``positions[:, 0]`` is always the last prompt token (the answer slot).
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
    n_t = max(1, max(len(t) for t in targets))
    target_ids = torch.full((len(seqs), n_t), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        if t:
            target_ids[i, : len(t)] = torch.tensor(t)
    starts = torch.tensor([len(p) - 1 for p in prompt_ids])
    positions = (starts[:, None] + torch.arange(n_t)[None, :]).clamp(max=length - 1)
    pv = [pixels[img] for img in images if img is not None]
    pixel_values = torch.stack(pv) if pv else None
    return input_ids, mask, pixel_values, positions, target_ids


def _lr_scale(step: int, steps: int, warmup: int, floor: float) -> float:
    """Step-based schedule: linear warm-up over ``warmup`` steps, then cosine to ``floor``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup)
    frac = min(1.0, (step - warmup) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def _targets_for(item: dict[str, Any], variant: str, letter_ids: dict[str, int],
                 close_id: int, eos_id: int) -> tuple[list[int], list[int]]:
    """``(hard target ids, soft first-token ids)`` of an item under a prompt variant.

    Exactly one of the two is non-empty. The soft list (the plain prompt on an
    unanswerable item) means: cross-entropy against a uniform target over those letters,
    the item's options other than ``I don't know``.
    """
    options = parse_options(_question(item))[1]
    if item.get("answerable", True) or variant != "plain":
        return [letter_ids[_answer(item)], close_id, eos_id], []
    return [], [letter_ids[c] for c, text in options.items() if text != IDK_OPTION_TEXT]


def train_demo_model(
    data_dir: str | Path,
    out_dir: str | Path,
    recipe: Recipe = RECIPE,
    progress: bool = True,
    resume_from: str | Path | None = None,
    start_cycle: int = 0,
) -> dict[str, Any]:
    """Train the tiny LLaVA on ``data_dir/train.json`` by ``recipe`` and save it to ``out_dir``.

    Args:
        data_dir: a directory written by :func:`~mllmcal.demo.build_dataset` (with the
            recipe's seed and sizes, for the shipped model).
        out_dir: receives the checkpoint (model, tokenizer, processor, chat template), the
            recipe (``recipe.json``) and the training summary (``training.json``).
        recipe: the training recipe; :data:`RECIPE` made the shipped checkpoint.
        progress: show a tqdm bar over the steps.
        resume_from, start_cycle: resume a run of the same recipe whose first
            ``start_cycle`` cycles are saved in ``resume_from`` (its weights are loaded and
            stage 1 is skipped). Each cycle starts from a fresh optimiser and its own batch
            order, so the result is bit-identical to the uninterrupted run (tested).

    Returns:
        The summary: ``steps``, ``examples``, ``train_seconds`` (informational only; no
        decision depends on time), ``final_loss`` (mean answer-letter loss over the last
        50 steps) and the vision stage's summary.
    """
    import torch
    from tqdm.auto import tqdm

    recipe.validate()
    data_dir = Path(data_dir)
    train_path = data_dir / "train.json"
    if not train_path.is_file():
        raise FileNotFoundError(f"{train_path} not found; build the data set first")
    items = json.loads(train_path.read_text())
    if not items:
        raise ValueError(f"{train_path} holds no items")

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        start = time.monotonic()
        model, processor = init_demo_model(data_dir, seed=recipe.seed)
        tok = processor.tokenizer
        close_id, eos_id = tok.convert_tokens_to_ids(")"), tok.eos_token_id
        image_id = model.config.image_token_id
        letter_ids = {c: tok.convert_tokens_to_ids(c) for c in OPTION_LETTERS}
        pixels = _pixel_cache(processor, data_dir, items)
        offers_idk = np.array([IDK_OPTION_TEXT in parse_options(_question(it))[1].values()
                               for it in items])
        droppable = np.array(
            ["image" in it and it.get("answerable", True) and not o
             for it, o in zip(items, offers_idk, strict=True)]
        )

        if not 0 <= start_cycle <= recipe.total_cycles:
            raise ValueError(
                f"start_cycle must be in [0, {recipe.total_cycles}], got {start_cycle}")
        if (resume_from is None) != (start_cycle == 0):
            raise ValueError("resume_from and a start_cycle > 0 go together")
        if resume_from is None:
            vision = pretrain_vision(model, tok, pixels, items, steps=recipe.vision_steps,
                                     seed=recipe.seed, batch_size=recipe.vision_batch_size,
                                     lr=recipe.vision_lr)
        else:
            from transformers import LlavaForConditionalGeneration

            # from_pretrained maps the saved key names back to the module's; its weights
            # are then copied into the model built above (same vocabulary and config).
            saved = LlavaForConditionalGeneration.from_pretrained(resume_from)
            model.load_state_dict(saved.state_dict())
            del saved
            vision = json.loads((Path(resume_from) / SUMMARY_FILE).read_text())["vision_pretraining"]
        model.train()
        losses: list[float] = []
        # The focus cycle's pool: every item once, the answerable IDK-offering ones
        # ``focus_control_repeats`` times in all.
        controls = np.flatnonzero(offers_idk & np.array([it.get("answerable", True)
                                                         for it in items]))
        focus_pool = np.concatenate([np.arange(len(items)),
                                     np.tile(controls, recipe.focus_control_repeats - 1)])
        done_steps = recipe.steps * min(start_cycle, recipe.cycles)
        bar = tqdm(total=recipe.total_steps - done_steps, unit="step",
                   desc="training demo model", disable=not progress)
        for cycle in range(start_cycle, recipe.total_cycles):
            # Warm restarts (SGDR, Loshchilov & Hutter, ICLR 2017): every cycle has a fresh
            # AdamW, its own seeded batch order and the whole schedule again.
            focus = cycle >= recipe.cycles
            steps = recipe.focus_steps if focus else recipe.steps
            peak_lr = recipe.focus_lr if focus else recipe.lr
            pool = focus_pool if focus else np.arange(len(items))
            rng = np.random.default_rng(recipe.seed if cycle == 0 else [recipe.seed, cycle])
            optim = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=(0.9, 0.98),
                                      weight_decay=0.0)
            # pool[permutation] is the plain permutation for the ordinary cycles (the
            # arange pool), so their batch order is the one the recipe always had.
            order = pool[rng.permutation(len(pool))]
            cursor = 0
            for step in range(steps):
                scale = _lr_scale(step, steps, recipe.warmup_steps, recipe.min_lr_fraction)
                for g in optim.param_groups:
                    g["lr"] = peak_lr * scale
                if cursor + recipe.batch_size > len(order):
                    order, cursor = pool[rng.permutation(len(pool))], 0
                idx = order[cursor : cursor + recipe.batch_size]
                cursor += recipe.batch_size
                # (prompt, image or None, hard target ids, soft target ids, multiple choice)
                examples = []
                for i in idx:
                    it = items[i]
                    prefix = ANSWER_PREFIXES[int(rng.integers(len(ANSWER_PREFIXES)))]
                    if offers_idk[i]:
                        variant = ("plain" if rng.random() < recipe.plain_idk_fraction
                                   else _INVITING[int(rng.integers(len(_INVITING)))])
                        with_image = "image" in it
                        hard, sft = _targets_for(it, variant, letter_ids, close_id, eos_id)
                        prompt = render_prompt(processor, _question(it), prefix, with_image,
                                               ABSTENTION_HINTS[variant])
                        examples.append((prompt, it["image"] if with_image else None, hard, sft,
                                         bool(hard)))
                    elif droppable[i] and rng.random() < recipe.open_ended_fraction:
                        # Open-ended twin: the option text itself, without options to pick
                        # from. An auxiliary task in a raw format of its own (not a chat
                        # prompt): naming what is in the picture is one hop and is learnt fast,
                        # and gives the multiple-choice answer a head start.
                        stem, options = parse_options(_question(it))
                        words = tok(options[_answer(it)], add_special_tokens=False)["input_ids"]
                        examples.append((f"{IMAGE_TOKEN}\n{stem}\n{prefix}:", it["image"],
                                         [*words, eos_id], [], False))
                    else:
                        with_image = "image" in it and not (
                            droppable[i] and rng.random() < recipe.text_only_fraction)
                        prompt = render_prompt(processor, _question(it), prefix, with_image)
                        examples.append((prompt, it["image"] if with_image else None,
                                         [letter_ids[_answer(it)], close_id, eos_id], [], True))
                prompts, images, targets, soft, is_mc = zip(*examples, strict=True)
                ids, mask, pv, pos, tgt = _batch(tok, pixels, prompts, images, targets)
                hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pv).last_hidden_state
                rows = torch.arange(len(idx))[:, None]
                # The head only where a loss is read: [B, T] answer positions, not [B, L].
                picked = model.lm_head(hidden[rows, pos])
                loss_tok = torch.nn.functional.cross_entropy(
                    picked.reshape(-1, picked.shape[-1]), tgt.reshape(-1), reduction="none"
                ).view(tgt.shape)
                total, count = loss_tok.sum(), (tgt != -100).sum()
                soft_rows = [r for r, s in enumerate(soft) if s]
                if soft_rows:
                    # Plain prompt, unanswerable item: a guess spread over the real options
                    # (uniform target), never "I don't know".
                    logp = picked[soft_rows, 0].log_softmax(-1)
                    for k, r in enumerate(soft_rows):
                        total = total - logp[k, soft[r]].mean()
                    count = count + len(soft_rows)
                loss = total / count
                if recipe.aux_weight > 0:
                    # Next-token loss on the prompt text: free extra signal from the same forward
                    # pass (the option letters follow A, B, C, D; the stems are templated).
                    nxt = ids[:, 1:]
                    keep = (mask[:, 1:] > 0) & (nxt != image_id)
                    keep &= torch.arange(nxt.shape[1])[None, :] < pos[:, :1]
                    h = hidden[:, :-1][keep]
                    aux = torch.nn.functional.cross_entropy(model.lm_head(h), nxt[keep])
                    loss = loss + recipe.aux_weight * aux
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optim.step()

                mc = torch.tensor(is_mc)
                if mc.any():
                    losses.append(float(loss_tok[mc, 0].detach().mean()))
                if step % 10 == 0:
                    bar.set_postfix(letter_loss=f"{np.mean(losses[-50:]):.3f}")
                bar.update(1)
        bar.close()
        train_seconds = time.monotonic() - start

        save_checkpoint(model, processor, out_dir)
        summary: dict[str, Any] = {
            "steps": recipe.total_steps,
            "examples": recipe.total_steps * recipe.batch_size,
            "train_seconds": round(train_seconds, 2),
            "threads": recipe.threads,
            "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
            "vision_pretraining": vision,
        }
        out = Path(out_dir)
        (out / RECIPE_FILE).write_text(json.dumps(recipe.to_dict(), indent=1) + "\n")
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
        return summary
    finally:
        torch.set_num_threads(prev_threads)


# ----------------------------------------------------------------------------- retrain


def retrain(out_dir: str | Path, recipe: Recipe = RECIPE, cache_dir: str | Path | None = None,
            progress: bool = True, resume_from: str | Path | None = None,
            start_cycle: int = 0) -> dict[str, Any]:
    """Rerun the recipe into ``out_dir`` and compare the weights with the shipped ones.

    Builds (or reuses) the recipe's full data set under the cache
    (``demo-train-v3-seed{seed}``), trains, and returns the training summary plus
    ``identical_to_shipped`` (every tensor bit-identical to ``mllmcal/demo/checkpoint``;
    None when the shipped checkpoint is absent) and ``max_abs_diff_to_shipped``.
    """
    data_dir = demo_data_dir(cache_dir, seed=recipe.seed, sizes=recipe.sizes,
                             name="demo-train-v3")
    summary = train_demo_model(data_dir, out_dir, recipe=recipe, progress=progress,
                               resume_from=resume_from, start_cycle=start_cycle)
    summary["data_dir"] = str(data_dir)
    summary.update(compare_weights(Path(out_dir), CHECKPOINT_DIR))
    return summary


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    """``identical_to_shipped`` and ``max_abs_diff_to_shipped`` of two checkpoint dirs."""
    from safetensors.torch import load_file

    fa, fb = Path(a) / "model.safetensors", Path(b) / "model.safetensors"
    if not fb.is_file():
        return {"identical_to_shipped": None, "max_abs_diff_to_shipped": None}
    wa, wb = load_file(str(fa)), load_file(str(fb))
    if wa.keys() != wb.keys() or any(wa[k].shape != wb[k].shape for k in wa):
        return {"identical_to_shipped": False, "max_abs_diff_to_shipped": float("inf")}
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa) if wa else 0.0
    same = all(wa[k].dtype == wb[k].dtype and bool((wa[k] == wb[k]).all()) for k in wa)
    return {"identical_to_shipped": same, "max_abs_diff_to_shipped": diff}
