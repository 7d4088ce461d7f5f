"""Loading any local checkpoint for evaluation, and turning items into model inputs.

A checkpoint directory is loaded through the Auto classes: a config with a
``vision_config`` is an image-text model (``AutoModelForImageTextToText`` with its
``AutoProcessor``), anything else a causal LM (``AutoModelForCausalLM`` with its
``AutoTokenizer``). The chat template, when the directory has one, comes from the same
place; the question and instruction then form the user turn and the answer prefix
("Answer: (") opens the assistant turn, so that the next token is still the letter.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..prompting import DEFAULT_ANSWER_PREFIX, OPTION_LETTERS, build_prompt
from .data import Item

__all__ = ["EvalModel", "load_model", "parse_dtype"]

_log = logging.getLogger("mllmcal.eval")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (bf16 matmuls are slow there) and bf16 on accelerators."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto, {', '.join(sorted(_DTYPES))}") from None


def _norm_piece(piece: str) -> str:
    # SentencePiece marks a leading space with U+2581, byte-level BPE with U+0120
    return piece.replace("\u2581", " ").replace("\u0120", " ").strip()


@dataclass
class EvalModel:
    """A loaded checkpoint plus what the evaluator needs to know about its vocabulary.

    ``letter_of_token`` is an int64 ``[V]`` tensor on the model's device: the option
    index (0 for A, ...) a token decodes to, or -1. ``answer_token_ids`` are the tokens
    that follow "Answer: (" for each letter (the canonical spelling at the answer
    position; -1 if a letter cannot be a single token there).
    """

    name: str
    path: str
    model: Any
    tokenizer: Any
    processor: Any | None
    multimodal: bool
    device: torch.device
    dtype: torch.dtype
    use_chat_template: bool
    letter_of_token: torch.Tensor = field(repr=False)
    answer_token_ids: list[int] = field(repr=False)
    eos_token_ids: list[int] = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return int(self.letter_of_token.numel())

    def render(self, item: Item, answer_prefix: str = DEFAULT_ANSWER_PREFIX,
               with_image: bool = True, hint: str | None = None,
               instruction: str | None = None) -> str:
        """The prompt text for ``item`` (with the image placeholder when shown)."""
        body = item.question_with_options
        if hint:
            body = f"{body}\n{hint}"
        text = build_prompt(body, answer_prefix, with_image=with_image)
        if instruction is not None:
            head, _, tail = text.rpartition("\n")
            head = head.rsplit("\n", 1)[0]
            text = f"{head}\n{instruction}\n{tail}"
        if not self.use_chat_template:
            return text
        user, _, assistant = text.rpartition("\n")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return self.tokenizer.apply_chat_template(
            msgs, tokenize=False, continue_final_message=True
        )

    def encode(self, prompts: list[str], images: list[Any] | None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs on the model's device; ``images`` only for image prompts."""
        if self.processor is not None and images:
            enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        else:
            add_special = not self.use_chat_template
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                 add_special_tokens=add_special)
        out = {}
        for k, v in enc.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
                out[k] = v
        return out


def _resolve_path(spec: str) -> str:
    if spec == "demo":
        try:
            from mllmcal.demo.train import get_demo
        except ImportError as exc:
            raise RuntimeError(
                "--model demo needs mllmcal.demo.get_demo, which is not available in this "
                f"install ({exc})"
            ) from None
        model_dir, _ = get_demo()
        return str(model_dir)
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"--model {spec!r}: not a local checkpoint directory (mllmcal loads local "
            "directories only; download hub models first, e.g. with `huggingface-cli download`)"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"--model {spec!r}: no config.json in that directory")
    return str(p)


def _letter_tables(tokenizer: Any, vocab_size: int) -> tuple[list[int], list[int]]:
    letter_of = [-1] * vocab_size
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            continue
        s = _norm_piece(piece)
        if len(s) == 1 and s in OPTION_LETTERS:
            letter_of[i] = OPTION_LETTERS.index(s)
    base = tokenizer.encode("Answer: (", add_special_tokens=False)
    canonical = []
    for idx, letter in enumerate(OPTION_LETTERS):
        ids = tokenizer.encode("Answer: (" + letter, add_special_tokens=False)
        tok = ids[-1] if (ids[: len(base)] == base and len(ids) == len(base) + 1) else -1
        if tok < 0 or tok >= vocab_size or letter_of[tok] != idx:
            tok = next((i for i, li in enumerate(letter_of) if li == idx), -1)
        canonical.append(tok)
    return letter_of, canonical


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str = "auto",
               chat_template: str = "auto") -> EvalModel:
    """Load a local checkpoint directory (or ``"demo"``) for evaluation.

    Args:
        spec: a directory with ``config.json`` and weights, or ``"demo"``.
        device: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        dtype: ``auto`` | ``float32`` | ``float16`` | ``bfloat16`` for the weights.
        chat_template: ``auto`` (use the directory's template if it has one) or ``off``.
    """
    import transformers as tf

    path = _resolve_path(spec)
    device = torch.device(device)
    torch_dtype = parse_dtype(dtype, device)
    config = tf.AutoConfig.from_pretrained(path)
    multimodal = getattr(config, "vision_config", None) is not None
    processor = None
    if multimodal:
        processor = tf.AutoProcessor.from_pretrained(path)
        tokenizer = processor.tokenizer
        model = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
    else:
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    model.to(device).eval()
    tokenizer.padding_side = "left"  # generation appends on the right
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = getattr(tokenizer, "chat_template", None) or getattr(processor, "chat_template", None)
    use_chat = chat_template != "off" and bool(template)
    if use_chat and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    vocab_size = model.get_output_embeddings().weight.shape[0]
    letter_of, canonical = _letter_tables(tokenizer, vocab_size)
    if all(c < 0 for c in canonical):
        raise ValueError(f"{path}: no token of this vocabulary decodes to an option letter A-H")
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    return EvalModel(
        name=os.path.basename(os.path.normpath(path)) if spec != "demo" else "demo",
        path=path, model=model, tokenizer=tokenizer, processor=processor,
        multimodal=multimodal, device=device, dtype=torch_dtype, use_chat_template=use_chat,
        letter_of_token=torch.tensor(letter_of, dtype=torch.int64, device=device),
        answer_token_ids=canonical, eos_token_ids=eos_ids,
    )
