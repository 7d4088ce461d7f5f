"""Tiny random checkpoints for tests: a LLaVA (CLIP + Llama) and a Llama causal LM.

They are saved to a directory exactly like a hub checkpoint (config, safetensors,
word-level tokenizer, processor), so that loading them exercises the same
``--model PATH`` code path as a real model. Their lm_head rows for the option letters
are scaled up so that random weights still answer with a letter most of the time,
with confidences spread over (0, 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from ..prompting import IMAGE_TOKEN, INSTRUCTION, OPTION_LETTERS

__all__ = ["build_tiny_checkpoint"]

_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]


def _words(texts: Iterable[str]) -> list[str]:
    base = f"{INSTRUCTION} Answer : ( ) % , . ? {' '.join(OPTION_LETTERS)} I don't know"
    seen: dict[str, None] = {}
    for t in [base, *texts]:
        for w in re.findall(r"\w+|[^\w\s]+", t):
            seen.setdefault(w, None)
    return [w for w in seen if w not in _SPECIAL]


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_SPECIAL + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str] = (), multimodal: bool = True,
                          seed: int = 0, image_size: int = 16, letter_gain: float = 6.0) -> Path:
    """Write a random tiny checkpoint to ``out_dir`` and return the path.

    Args:
        texts: text the word-level vocabulary must cover (questions, options).
        multimodal: a LLaVA (CLIP vision tower + Llama) if True, else a ``LlamaForCausalLM``.
        image_size: the vision tower's input side, in pixels (patch size is half of it).
        letter_gain: factor on the option letters' lm_head rows (see the module doc).
    """
    import transformers as tf

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(_words(texts))
    text_cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    if multimodal:
        vis_cfg = tf.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            image_size=image_size, patch_size=image_size // 2, projection_dim=16,
        )
        cfg = tf.LlavaConfig(vision_config=vis_cfg, text_config=text_cfg,
                             image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                             vision_feature_select_strategy="default", vision_feature_layer=-1)
        model = tf.LlavaForConditionalGeneration(cfg)
        image_proc = tf.CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
        proc = tf.LlavaProcessor(image_processor=image_proc, tokenizer=tok,
                                 patch_size=image_size // 2, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
        proc.save_pretrained(out)
    else:
        model = tf.LlamaForCausalLM(text_cfg)
        tok.save_pretrained(out)
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        ids = tok.convert_tokens_to_ids(list(OPTION_LETTERS))
        head[ids] *= letter_gain
    model.save_pretrained(out)
    return out
