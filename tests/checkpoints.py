"""Every tiny checkpoint the tests build, saved like hub models and loaded by path.

* :func:`build_tiny_checkpoint`: a word-level LLaVA (CLIP + Llama) or Llama causal LM, the
  eval runner's and the CLI's test model.
* :func:`build_vllm_llama`: a word-level Llama that vLLM's CPU engine loads (``python
  tests/checkpoints.py DIR`` writes it, for the vLLM scripts that run in their own venv).
* ``BUILDERS`` / ``TEXT_BUILDERS``: real image-text architectures, below.

The two word-level models share :func:`word_level_tokenizer`.

Tiny random-weight checkpoints of real image-text architectures, saved like hub models.

Each builder writes a directory the way the architecture ships: its config, safetensors
weights, its REAL processor class (with the PIL image processor, so torchvision is not
needed), a BPE tokenizer trained here with ``tokenizers`` on the test vocabulary, and a
chat template written after the released one (URLs next to each). Loading by path then
exercises exactly the code path ``mllmcal eval --model DIR`` takes on a real checkpoint.

Architectures (``BUILDERS``): LLaVA-1.5, LLaVA-NeXT (1.6, Mistral), LLaVA-OneVision,
Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, Gemma 3, PaliGemma, InternVL 3, Llama 3.2
Vision (Mllama: one ``<|image|>`` token, the image enters through cross-attention; its
zero-initialised tanh gates are opened so that it reaches the logits), Qwen3-VL (DeepStack
features, interleaved M-RoPE, ``mm_token_type_ids``), Mistral 3 (Mistral Small 3.1: a
Pixtral tower and the Pixtral processor, image rows closed by ``[IMG_BREAK]`` /
``[IMG_END]``) and GLM-4.1V (``[gMASK]<sop>`` from the template, no BOS). ``TEXT_BUILDERS``:
Llama 3 and Qwen2.5 instruct causal LMs.

The lm_head rows of the letters A-C are scaled up so that random weights answer with a
letter at (or soon after) the answer position, with confidences spread over (0, 1). Only
A-C: the tests' items have 3 or 4 options, and a letter past an item's options ("E" for
4 options) is no answer to it.
"""

from __future__ import annotations

import re
import string
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mllmcal.prompting import IMAGE_TOKEN, INSTRUCTION, OPTION_LETTERS

LETTER_GAIN = 30.0
BOOSTED_LETTERS = "ABC"
IMAGE_SIZE = 16

_CORPUS = [
    INSTRUCTION, "Answer: (A)", "The answer might be", "The answer must be",
    "What colour is the shape in the picture?", "(A) red (B) blue (C) green (D) yellow",
    "I don't know", "USER: ASSISTANT: user assistant model system Assistant: User:",
    "You are a helpful assistant.", "If the question cannot be answered, choose",
    "Answer only if you are sure; otherwise choose",
]


def _train_tokenizer(specials: list[str], style: str, bos: str | None, texts: Iterable[str]):
    """A BPE tokenizer trained on the test corpus.

    ``style``: ``"metaspace"`` (SentencePiece-like: Llama, Gemma) or ``"bytelevel"``
    (GPT-2-like: Qwen, Llama 3). Punctuation is split from words, as in the released
    tokenizers, so "(" and the letter after it are separate tokens. With ``bos`` the
    post-processor prepends it, as Llama's and Gemma's tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [*_CORPUS, *texts] * 4
    if style == "metaspace":
        tk = Tokenizer(models.BPE(unk_token=specials[0] if "unk" in specials[0] else None,
                                  byte_fallback=False))
        # newlines stand alone (Llama's <0x0A>, Gemma's "\n"), then words get "\u2581"
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Punctuation("isolated"),
            pre_tokenizers.Metaspace()])
        tk.decoder = decoders.Metaspace()
        alphabet = list(string.printable)
    else:
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tk.token_to_id(bos))])
    elif style == "bytelevel":
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def _fast(tk, **kw):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tk, **kw)


def _boost_letters(model, tok) -> None:
    head = model.get_output_embeddings().weight
    ids = [tok.convert_tokens_to_ids(t) for t in _letter_pieces(tok)]
    with torch.no_grad():
        head[ids] *= LETTER_GAIN


def _letter_pieces(tok) -> list[str]:
    # every vocabulary entry that is a bare boosted letter (with or without a space marker)
    out = []
    for piece in tok.get_vocab():
        bare = piece.replace("\u2581", "").replace("\u0120", "")
        if len(bare) == 1 and bare in BOOSTED_LETTERS:
            out.append(piece)
    return out


def _save(model, processor, out: Path, video: dict | None = None, processor_class: str = "") -> Path:
    """Save like the hub. ``video``: the video processor's config, written by hand, since
    building a video processor needs torchvision (a CUDA build on PyPI, not installable
    next to the CPU torch here); the real checkpoints ship one, so the loader must cope."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(out)
    if video is not None:
        cfg_path = out / "processor_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["processor_class"] = processor_class
        cfg["video_processor"] = video
        cfg_path.write_text(json.dumps(cfg, indent=2))
    model.save_pretrained(out)
    return out


def _without_video(cls):
    """``cls`` built from its image processor and tokenizer only (see :func:`_save`)."""

    class ImageOnly(cls):
        @classmethod
        def get_attributes(klass):
            return [a for a in cls.get_attributes() if a != "video_processor"]

    return ImageOnly


def _llama(vocab: int, **kw):
    import transformers as tf

    base = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                tie_word_embeddings=False)
    base.update(kw)
    return tf.LlamaConfig(**base)


def _sentencepiece_llama_tokenizer(texts: Iterable[str]):
    """LLaMA-2 / Mistral style (LLaVA-1.5, LLaVA-NeXT): SentencePiece pieces, <s> added."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    return _fast(_train_tokenizer(specials, "metaspace", "<s>", texts), unk_token="<unk>",
                 bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                 extra_special_tokens={"image_token": "<image>"})


# ----------------------------------------------------------------------------- LLaVA-1.5

# https://huggingface.co/llava-hf/llava-1.5-7b-hf/blob/main/chat_template.json
# Verified against the copy in openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp
# (chat_template_fallback_map, "llava-1.5, llava-v1.6-vicuna (chat_template.json)"): identical
# but for its {# ... #} comments, which render nothing. A system message gets no role prefix:
# its text comes first, followed by a space.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava(out: Path, texts: Iterable[str] = ()) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    tok = _sentencepiece_llama_tokenizer(texts)
    patch = IMAGE_SIZE // 4
    vis = _clip_vision(patch)
    cfg = tf.LlavaConfig(vision_config=vis, text_config=_llama(len(tok), bos_token_id=1,
                                                              eos_token_id=2, pad_token_id=3),
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = tf.LlavaForConditionalGeneration(cfg)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save_clip_llava(model, tf.LlavaProcessor, ip, tok, patch, LLAVA_TEMPLATE, out)


def _clip_vision(patch: int):
    import transformers as tf

    return tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=patch,
                               projection_dim=16)


def _save_clip_llava(model, processor_cls, ip, tok, patch: int, template: str, out: Path) -> Path:
    """LLaVA-1.5 and LLaVA-NeXT: a CLIP tower without its CLS token ("default"), as released."""
    proc = processor_cls(image_processor=ip, tokenizer=tok, patch_size=patch,
                         vision_feature_select_strategy="default",
                         num_additional_image_tokens=1, chat_template=template)
    _boost_letters(model, tok)
    return _save(model, proc, out)


# ----------------------------------------------------------------------------- Qwen2-VL

# https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct/blob/main/chat_template.json
# Verified against the copy in openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp
# (chat_template_fallback_map, "Qwen2-VL-2B-Instruct (tokenizer_config.json)"): identical,
# default system prompt "You are a helpful assistant." included.
QWEN2VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def _build_qwen_vl(out: Path, texts: Iterable[str], seed: int, config_cls: str, model_cls: str,
                   processor_cls: str, template: str, vision: dict, text_extra: dict | None = None,
                   video_processor: str = "Qwen2VLVideoProcessor") -> Path:
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the same tokens, processor layout and image
    processor (``text_extra`` overrides the text config)."""
    import transformers as tf

    torch.manual_seed(seed)
    tok = _fast(_train_tokenizer(_QWEN_SPECIALS, "bytelevel", None, texts),
                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                extra_special_tokens={"image_token": "<|image_pad|>",
                                      "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                 "rope_theta": 10000.0},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text.update(text_extra or {})
    vis = dict(patch_size=4, spatial_merge_size=2, temporal_patch_size=2, **vision)
    cfg = getattr(tf, config_cls)(text_config=text, vision_config=vis,
                                  image_token_id=ids["<|image_pad|>"],
                                  video_token_id=ids["<|video_pad|>"],
                                  vision_start_token_id=ids["<|vision_start|>"],
                                  vision_end_token_id=ids["<|vision_end|>"])
    model = getattr(tf, model_cls)(cfg)
    ip = tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                     min_pixels=16 * 16, max_pixels=16 * 16)
    proc = _without_video(getattr(tf, processor_cls))(image_processor=ip, tokenizer=tok,
                                                      chat_template=template)
    _boost_letters(model, tok)
    video = {"video_processor_type": video_processor, "patch_size": 4, "merge_size": 2,
             "temporal_patch_size": 2, "min_pixels": 256, "max_pixels": 256}
    return _save(model, proc, out, video, processor_cls)


def build_qwen2_vl(out: Path, texts: Iterable[str] = ()) -> Path:
    return _build_qwen_vl(out, texts, 1, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                          "Qwen2VLProcessor", QWEN2VL_TEMPLATE,
                          dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2))


# ----------------------------------------------------------------------------- Idefics3

# https://huggingface.co/HuggingFaceM4/Idefics3-8B-Llama3/blob/main/chat_template.json
# Verified against huggingface/transformers tests/models/idefics3/test_processor_idefics3.py
# (test_apply_chat_template renders the hub processor's template as
# "<|begin_of_text|>User: ...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n...Assistant:")
# and the same text copied as DEFAULT_CHAT_TEMPLATE in public Idefics3-based code: identical.
# "User:" takes no space when the turn starts with the image ("User:<image>What...").
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_idefics3(out: Path, texts: Iterable[str] = ()) -> Path:
    import transformers as tf

    torch.manual_seed(2)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
                *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]
    tok = _fast(_train_tokenizer(specials, "bytelevel", "<|begin_of_text|>", texts),
                bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>",
                pad_token="<|finetune_right_pad_id|>")
    patch, scale = 4, 2
    seq_len = (IMAGE_SIZE // patch) ** 2 // scale**2
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=patch)
    cfg = tf.Idefics3Config(
        vision_config=vis, scale_factor=scale,
        text_config=_llama(len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = tf.Idefics3ForConditionalGeneration(cfg)
    # the top-level name is a torchvision-gated placeholder in transformers 5.17; the
    # module's class is the PIL one and needs only Pillow
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    ip = Idefics3ImageProcessorPil(do_image_splitting=False,
                                      size={"longest_edge": IMAGE_SIZE},
                                      max_image_size={"longest_edge": IMAGE_SIZE})
    proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq_len,
                                chat_template=IDEFICS3_TEMPLATE)
    _boost_letters(model, tok)
    return _save(model, proc, out)


# https://huggingface.co/HuggingFaceTB/SmolVLM-256M-Instruct/blob/main/chat_template.json
# Verified against huggingface/transformers tests/models/smolvlm/test_processor_smolvlm.py
# (prepare_processor_dict's chat_template, the SmolVLM one) and transformers'
# processing_smolvlm.DEFAULT_CHAT_TEMPLATE (SmolVLM2: the same plus a 'video' branch, unused
# here): identical in what we render. The 256M checkpoint's own file was not found in
# public copies.
SMOLVLM_TEMPLATE = "<|im_start|>" + IDEFICS3_TEMPLATE.removeprefix("<|begin_of_text|>")


def build_smolvlm(out: Path, texts: Iterable[str] = ()) -> Path:
    """SmolVLM: Idefics3's architecture with its own processor, which has a video part."""
    import transformers as tf
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(9)
    specials = ["<|im_start|>", "<|endoftext|>", "<end_of_utterance>",
                "<fake_token_around_image>", "<image>", "<global-img>", "<video>",
                *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]
    tok = _fast(_train_tokenizer(specials, "bytelevel", None, texts), bos_token="<|im_start|>",
                eos_token="<end_of_utterance>", pad_token="<|endoftext|>",
                extra_special_tokens={"image_token": "<image>",
                                      "fake_image_token": "<fake_token_around_image>",
                                      "global_image_token": "<global-img>",
                                      "end_of_utterance_token": "<end_of_utterance>"})
    patch, scale = 4, 2
    seq_len = (IMAGE_SIZE // patch) ** 2 // scale**2
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=patch)
    cfg = tf.SmolVLMConfig(
        vision_config=vis, scale_factor=scale,
        text_config=_llama(len(tok), bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    model = tf.SmolVLMForConditionalGeneration(cfg)
    ip = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                  max_image_size={"longest_edge": IMAGE_SIZE})
    proc = _without_video(tf.SmolVLMProcessor)(image_processor=ip, tokenizer=tok,
                                               video_processor=None, image_seq_len=seq_len,
                                               chat_template=SMOLVLM_TEMPLATE)
    _boost_letters(model, tok)
    video = {"video_processor_type": "SmolVLMVideoProcessor",
             "size": {"longest_edge": IMAGE_SIZE}}
    return _save(model, proc, out, video, "SmolVLMProcessor")


# ----------------------------------------------------------------------------- Gemma 3

# https://huggingface.co/google/gemma-3-4b-it/blob/main/chat_template.json
# Verified against microsoft/onnxruntime-extensions shared/api/chat_template.cc
# (GEMMA3_CHAT_TEMPLATE) and the gemma-3 tokenizer_config quoted in public code: the same
# template with its line breaks and indentation removed, all of which the released text's
# {%- -%} markers strip, so it renders identically (BOS from the template, system text
# folded into the first user turn followed by a blank line, role "model").
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}"
    "{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception(\"Invalid content type\") }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}"
)

_GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                   "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def build_gemma3(out: Path, texts: Iterable[str] = ()) -> Path:
    import transformers as tf

    torch.manual_seed(3)
    tok = _fast(_train_tokenizer(_GEMMA_SPECIALS, "metaspace", "<bos>", texts),
                pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                extra_special_tokens={"image_token": "<image_soft_token>",
                                      "boi_token": "<start_of_image>",
                                      "eoi_token": "<end_of_image>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in _GEMMA_SPECIALS}
    patch, mm_tokens = 4, 4
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=1024, sliding_window=64,
                pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=patch, vision_use_head=False)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vis, mm_tokens_per_image=mm_tokens,
                          boi_token_index=ids["<start_of_image>"],
                          eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"])
    model = tf.Gemma3ForConditionalGeneration(cfg)
    ip = tf.Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                    do_pan_and_scan=False)
    proc = tf.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=mm_tokens,
                              chat_template=GEMMA3_TEMPLATE)
    _boost_letters(model, tok)
    return _save(model, proc, out)


# ----------------------------------------------------------------------------- PaliGemma


def build_paligemma(out: Path, texts: Iterable[str] = ()) -> Path:
    """PaliGemma (pt): no chat template; the processor writes ``<image>*N <bos> text \\n``."""
    import transformers as tf

    torch.manual_seed(4)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]
    tok = _fast(_train_tokenizer(specials, "metaspace", "<bos>", texts), pad_token="<pad>",
                eos_token="<eos>", bos_token="<bos>", unk_token="<unk>",
                extra_special_tokens={"image_token": "<image>"})
    patch = 4
    n_img = (IMAGE_SIZE // patch) ** 2
    ip = tf.SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    ip.image_seq_length = n_img
    proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds <loc>/<seg> tokens
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=patch, projection_dim=32)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    cfg = tf.PaliGemmaConfig(vision_config=vis, text_config=text, projection_dim=32,
                             hidden_size=32, image_token_index=tok.convert_tokens_to_ids("<image>"))
    cfg.text_config.vocab_size = len(tok)
    model = tf.PaliGemmaForConditionalGeneration(cfg)
    _boost_letters(model, tok)
    return _save(model, proc, out)


# ----------------------------------------------------------------------------- OneVision

# https://huggingface.co/llava-hf/llava-onevision-qwen2-0.5b-ov-hf/blob/main/chat_template.json
# Verified against huggingface/transformers
# tests/models/llava_onevision/test_processor_llava_onevision.py: test_chat_template renders
# the hub's llava-onevision-qwen2-7b-ov-hf template as
# "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant\n"
# (also its token ids), and prepare_processor_dict carries the template text (the 0.5b
# checkpoint's own file was not found in public copies). NOTE: no newline
# after <|im_end|>, and a space (not a newline) after the role. Only the {# ... #} comments
# of the released text are left out; they render nothing.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_llava_onevision(out: Path, texts: Iterable[str] = ()) -> Path:
    import transformers as tf

    torch.manual_seed(5)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tok = _fast(_train_tokenizer(specials, "bytelevel", None, texts), eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    patch = 4
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=patch)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = tf.LlavaOnevisionConfig(
        vision_config=tf.SiglipVisionConfig(**vis), text_config=tf.Qwen2Config(**text),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9")
    model = tf.LlavaOnevisionForConditionalGeneration(cfg)
    ip = tf.LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                            image_grid_pinpoints=pinpoints)
    proc = _without_video(tf.LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok,
                                      num_image_tokens=(IMAGE_SIZE // patch) ** 2,
                                      vision_feature_select_strategy="full",
                                      chat_template=ONEVISION_TEMPLATE)
    _boost_letters(model, tok)
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor",
             "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    return _save(model, proc, out, video, "LlavaOnevisionProcessor")


# ----------------------------------------------------------------------------- InternVL

# https://huggingface.co/OpenGVLab/InternVL3-1B-hf/blob/main/chat_template.jinja
# Verified against huggingface/transformers tests/models/internvl/test_modeling_internvl.py:
# test_qwen2_small_model_integration_interleaved_images_videos renders this checkpoint's
# template for a user turn of two images and a text and decodes it as "user\n\n\nWhat are
# ..." (each image '<IMG_CONTEXT>\n', no default system prompt), and the chat_template of
# src/transformers/models/internvl/convert_internvl_weights_to_hf.py, which wrote the -hf
# checkpoints (one stored version of it has '<image>\n' for the image, which the released
# InternVLProcessor would not expand; it looks for '<IMG_CONTEXT>'): identical in what we
# render. The checkpoint's own file was not found in public copies.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)


def build_internvl(out: Path, texts: Iterable[str] = ()) -> Path:
    """InternVL 3 (the native transformers port, ``-hf`` checkpoints)."""
    import transformers as tf

    torch.manual_seed(8)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                "<IMG_CONTEXT>", "<video>"]
    tok = _fast(_train_tokenizer(specials, "bytelevel", None, texts), eos_token="<|im_end|>",
                pad_token="<|endoftext|>",
                extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                      "context_image_token": "<IMG_CONTEXT>",
                                      "video_token": "<video>"})
    patch = 4
    seq_len = (IMAGE_SIZE // patch) ** 2 // 4  # downsample_ratio 0.5 per side
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[patch, patch])
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                tie_word_embeddings=False)
    cfg = tf.InternVLConfig(vision_config=vis, text_config=tf.Qwen2Config(**text),
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            image_seq_length=seq_len, downsample_ratio=0.5,
                            tie_word_embeddings=False)
    model = tf.InternVLForConditionalGeneration(cfg)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                  crop_to_patches=False)
    proc = _without_video(tf.InternVLProcessor)(image_processor=ip, tokenizer=tok,
                                                image_seq_length=seq_len,
                                                chat_template=INTERNVL_TEMPLATE)
    _boost_letters(model, tok)
    video = {"video_processor_type": "InternVLVideoProcessor",
             "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}}
    return _save(model, proc, out, video, "InternVLProcessor")



# ----------------------------------------------------------------------------- Qwen2.5-VL

# https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/chat_template.json: the
# Qwen2-VL text unchanged (default system prompt "You are a helpful assistant.").
# Verified against huggingface/transformers tests/models/qwen2_5_vl/test_processor_qwen2_5_vl.py
# (prepare_processor_dict's chat_template: this text, character for character) and
# tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py, whose Qwen2.5-VL-7B-Instruct
# integration tests decode the hub template's output as "system\nYou are a helpful
# assistant.\nuser\nWhat kind of dog is this?\nassistant\n...". The 3B checkpoint's own
# file was not found in public copies.
QWEN25VL_TEMPLATE = QWEN2VL_TEMPLATE



def build_qwen25_vl(out: Path, texts: Iterable[str] = ()) -> Path:
    """Qwen2.5-VL: Qwen2-VL's format; a windowed-attention ViT with an RMSNorm/SwiGLU merger."""
    # window_size 16 px = 2x2 merged patches per window, so the one windowed block and the
    # full-attention block (fullatt_block_indexes) see different neighbourhoods
    return _build_qwen_vl(out, texts, 10, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                          "Qwen2_5_VLProcessor", QWEN25VL_TEMPLATE,
                          dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2,
                               out_hidden_size=32, window_size=16, fullatt_block_indexes=[1]))


# ----------------------------------------------------------------------------- LLaVA-NeXT

# https://huggingface.co/llava-hf/llava-v1.6-mistral-7b-hf/blob/main/chat_template.json
# Verified against the copy in openvinotoolkit/openvino.genai src/cpp/src/tokenizer.cpp
# (chat_template_fallback_map, "tiny-random-llava-next, llava-v1.6-mistral
# (chat_template.json)") and against the template the hub processor of
# llava-v1.6-mistral-7b-hf prints (quoted in a public LLaVA-NeXT walkthrough, which also
# shows its rendering "[INST] <image>\nIs this ...? [/INST]"): identical, except that the
# openvino copy closes an assistant turn with the typo '<\\s> ' where the current file has
# '</s> ' (used here); eval never renders past the open assistant turn, so both give the
# same prompts. No BOS in the template: Mistral's tokenizer adds <s>. The {# ... #}
# comments render nothing and are left out.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}"
    "{% endfor %}"
)


def build_llava_next(out: Path, texts: Iterable[str] = ()) -> Path:
    """LLaVA-NeXT (1.6, Mistral): anyres tiles of a CLIP tower, plus image_newline tokens."""
    import transformers as tf

    torch.manual_seed(11)
    tok = _sentencepiece_llama_tokenizer(texts)
    patch = 4
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    vis = _clip_vision(patch)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                max_position_embeddings=1024, sliding_window=None, tie_word_embeddings=False,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    cfg = tf.LlavaNextConfig(vision_config=vis, text_config=tf.MistralConfig(**text),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             image_grid_pinpoints=pinpoints, tie_word_embeddings=False)
    model = tf.LlavaNextForConditionalGeneration(cfg)
    ip = tf.LlavaNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                       image_grid_pinpoints=pinpoints)
    return _save_clip_llava(model, tf.LlavaNextProcessor, ip, tok, patch, LLAVA_NEXT_TEMPLATE,
                            out)


# ----------------------------------------------------------------------------- Llama 3.2 Vision

# https://huggingface.co/meta-llama/Llama-3.2-11B-Vision-Instruct/blob/main/chat_template.json
# Verified against two public copies of the released text: NVIDIA NeMo's
# MLlamaTemplateConfig.chat_template (nemo/collections/vlm, mllama data config) and
# johnmai-dev/Jinja Tests/ChatTemplateTests.swift (llama3_2visionChatTemplate): identical to
# each other and to this text, which keeps the released one verbatim (line breaks,
# indentation, {#- ... #} comments and the tool branches included). BOS comes from the
# template. With an image it writes no system turn (and refuses a system message); WITHOUT
# one it writes a system turn "Cutting Knowledge Date: December 2023\nToday Date: {date}"
# whose date is strftime_now("%d %b %Y") unless the caller passes date_string.
MLLAMA_TEMPLATE = (
    '{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n{%- endif %}\n'
    '{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}\n'
    '{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = "" %}\n'
    '{%- endif %}\n\n{#- Find out if there are any images #}\n'
    '{% set image_ns = namespace(has_images=false) %}      \n{%- for message in messages %}\n'
    "    {%- for content in message['content'] %}\n        {%- if content['type'] == 'image' %}\n"
    '            {%- set image_ns.has_images = true %}\n        {%- endif %}\n    {%- endfor %}\n'
    '{%- endfor %}\n\n{#- Error out if there are images and system message #}\n'
    '{%- if image_ns.has_images and not system_message == "" %}\n'
    '    {{- raise_exception("Prompting with images is incompatible with system messages.") }}\n'
    '{%- endif %}\n\n{#- System message if there are no images #}\n'
    '{%- if not image_ns.has_images %}\n'
    '    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '    {%- if tools is not none %}\n        {{- "Environment: ipython\\n" }}\n    {%- endif %}\n'
    '    {{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '    {{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '    {%- if tools is not none and not tools_in_user_message %}\n'
    '        {{- "You have access to the following functions. To call a function, please '
    'respond with JSON for a function call." }}\n'
    "        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.' }}\n"
    '        {{- "Do not use variables.\\n\\n" }}\n        {%- for t in tools %}\n'
    '            {{- t | tojson(indent=4) }}\n            {{- "\\n\\n" }}\n'
    '        {%- endfor %}\n    {%- endif %}\n    {{- system_message }}\n'
    '    {{- "<|eot_id|>" }}\n{%- endif %}\n\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when there\'s no '
    'first user message!") }}\n{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
    "argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n        {{- "\\n\\n" }}\n    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n{%- endif %}\n\n{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in "
    "message) %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "        {%- if message['content'] is string %}\n            {{- message['content'] }}\n"
    "        {%- else %}\n            {%- for content in message['content'] %}\n"
    "                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n"
    "                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n"
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n'
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n        {{- tool_call.arguments | tojson }}\n"
    '        {{- "}" }}\n        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n        {%- else %}\n'
    '            {{- message.content }}\n        {%- endif %}\n        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"
)


def build_mllama(out: Path, texts: Iterable[str] = ()) -> Path:
    """Llama 3.2 Vision: ONE <|image|> token in the text; the image enters through
    cross-attention layers (cross_attention_mask, aspect-ratio ids), not as tokens."""
    import transformers as tf

    torch.manual_seed(12)
    # as released, <|image|> is the id right after the text vocabulary (the LM head leaves
    # it out; the input embeddings have 8 extra rows)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>",
                "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>"]
    tk = _train_tokenizer(specials, "bytelevel", "<|begin_of_text|>", texts)
    tk.add_special_tokens(["<|image|>"])
    tok = _fast(tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                pad_token="<|finetune_right_pad_id|>")
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert image_id == len(tok) - 1
    patch, tiles = 4, 2
    vis = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
               attention_heads=2, image_size=IMAGE_SIZE, patch_size=patch, max_num_tiles=tiles,
               supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], intermediate_layers_indices=[0],
               vision_output_dim=32)
    text = dict(vocab_size=image_id, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                cross_attention_layers=[1], bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = tf.MllamaConfig(vision_config=vis, text_config=text, image_token_index=image_id)
    model = tf.MllamaForConditionalGeneration(cfg)
    with torch.no_grad():
        # released weights have learned gates; zeros (the init) would cut the image off
        for name, param in model.named_parameters():
            if name.endswith(("gate", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(0.5)
    ip = tf.MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                    max_image_tiles=tiles)
    proc = tf.MllamaProcessor(image_processor=ip, tokenizer=tok, chat_template=MLLAMA_TEMPLATE)
    _boost_letters(model, tok)
    return _save(model, proc, out)


# ----------------------------------------------------------------------------- Qwen3-VL

# https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct/blob/main/chat_template.json (the same
# text ships with every Qwen3-VL Instruct checkpoint). Verified against a public table of
# released templates that vendors the Qwen3-VL-30B-A3B-Instruct one verbatim (a Go test
# fixture, "Qwen3-VL-30B-A3B-Instruct-Q8_0") and against the same user/assistant branches
# vendored in several public Qwen3-VL fine-tuning repositories: identical. Unlike Qwen2-VL's
# it writes NO default system turn; the tool branches are kept (the project passes no
# tools). The Instruct template has no thinking part (the -Thinking checkpoints' one opens
# the assistant turn with "<think>\n"; not built here).
QWEN3VL_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n"
    "<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n"
    "        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in "
    "content %}\n                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n"
    "        {%- else %}\n            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n"
    "                    {{- content_item.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n                {%- endif %}\n"
    "                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n"
    "                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in "
    "content %}\n                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n"
    "                {%- elif 'text' in content %}\n                    {{- content.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n"
    "{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def build_qwen3_vl(out: Path, texts: Iterable[str] = ()) -> Path:
    """Qwen3-VL: Qwen2-VL's tokens and processor layout (plus ``mm_token_type_ids``, which
    its M-RoPE needs); a ViT with learned position embeddings and DeepStack features fed
    into the first text layers; interleaved M-RoPE."""
    # head_dim 16 -> 8 rotary frequencies, interleaved over (t, h, w) by mrope_section
    text = dict(head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [4, 2, 2],
                                              "mrope_interleaved": True})
    # 16 px / 4 px patches = a 4x4 grid of learned positions; DeepStack taps block 0
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    return _build_qwen_vl(out, texts, 13, "Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
                          "Qwen3VLProcessor", QWEN3VL_TEMPLATE, vision, text,
                          "Qwen3VLVideoProcessor")


# ----------------------------------------------------------------------------- Mistral 3

# https://huggingface.co/mistralai/Mistral-Small-3.1-24B-Instruct-2503/blob/main/chat_template.json
# (the transformers-format files). Verified against huggingface/transformers
# tests/models/mistral3/test_processing_mistral3.py: prepare_processor_dict carries this
# checkpoint's template (its processor files are mirrored as
# hf-internal-testing/Mistral-Small-3.1-24B-Instruct-2503-only-processor), and a public
# mlx-lm script vendors the Mistral-Small-3.2 variant (same turns, no date): identical in
# what we render. BOS from the template; a DEFAULT system prompt that prints today's date
# (strftime_now("%Y-%m-%d"), pinned by eval); image '[IMG]', which the Pixtral processor
# expands to rows of [IMG] separated by [IMG_BREAK] and closed by [IMG_END].
MISTRAL3_TEMPLATE = (
    '{%- set today = strftime_now("%Y-%m-%d") %}\n'
    '{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) '
    'created by Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base was '
    'last updated on 2023-10-01. The current date is " + today + ".\\n\\nWhen you\'re not sure '
    "about some information, you say that you don't have the information and don't make up "
    "anything.\\nIf the user's question is not clear, ambiguous, or does not provide enough "
    "context for you to accurately answer the question, you do not try to answer it right "
    "away and you rather ask the user to clarify their request (e.g. \\\"What are some good "
    "restaurants around me?\\\" => \\\"Where are you?\\\" or \\\"When is the next flight to "
    'Tokyo\\" => \\"Where do you travel from?\\")" %}\n\n{{- bos_token }}\n\n'
    "{%- if messages[0]['role'] == 'system' %}\n    {%- if messages[0] is string %}\n"
    "        {%- set system_message = messages[0]['content'] %}\n"
    "        {%- set loop_messages = messages[1:] %}\n    {%- else %} \n"
    "        {%- set system_message = messages[0]['content'][0]['text'] %}\n"
    "        {%- set loop_messages = messages[1:] %}\n    {%- endif %}\n{%- else %}\n"
    "    {%- set system_message = default_system_message %}\n"
    "    {%- set loop_messages = messages %}\n{%- endif %}\n"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}\n\n"
    "{%- for message in loop_messages %}\n    {%- if message['role'] == 'user' %}\n"
    "            {%- if message['content'] is string %}\n"
    "            {{- '[INST]' + message['content'] + '[/INST]' }}\n            {%- else %}\n"
    "                    {{- '[INST]' }}\n"
    "                    {%- for block in message['content'] %}\n"
    "                            {%- if block['type'] == 'text' %}\n"
    "                                    {{- block['text'] }}\n"
    "                            {%- elif block['type'] == 'image' or block['type'] == "
    "'image_url' %}\n                                    {{- '[IMG]' }}\n"
    "                                {%- else %}\n"
    "                                    {{- raise_exception('Only text and image blocks are "
    "supported in message content!') }}\n                                {%- endif %}\n"
    "                        {%- endfor %}\n                    {{- '[/INST]' }}\n"
    "                {%- endif %}\n    {%- elif message['role'] == 'system' %}\n"
    "        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] + eos_token }}\n        {%- else %}\n"
    "            {{- message['content'][0]['text'] + eos_token }}\n        {%- endif %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user, system and assistant roles are supported!') }}\n"
    "    {%- endif %}\n{%- endfor %}"
)


def build_mistral3(out: Path, texts: Iterable[str] = ()) -> Path:
    """Mistral 3 (Mistral Small 3.1): a Pixtral vision tower, a 2x2 patch merger, the
    Pixtral processor (image rows broken by [IMG_BREAK], closed by [IMG_END])."""
    import transformers as tf
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    torch.manual_seed(14)
    # Tekken (tiktoken-style byte-level BPE); its tokenizer prepends <s>
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]",
                "[IMG_END]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]
    tok = _fast(_train_tokenizer(specials, "bytelevel", "<s>", texts), unk_token="<unk>",
                bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    patch, merge = 4, 2
    vis = tf.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, head_dim=8, image_size=IMAGE_SIZE,
                                 patch_size=patch)
    text = tf.MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=16, max_position_embeddings=1024, sliding_window=None,
                            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                            pad_token_id=ids["<pad>"], tie_word_embeddings=False)
    cfg = tf.Mistral3Config(vision_config=vis, text_config=text, image_token_index=ids["[IMG]"],
                            spatial_merge_size=merge, vision_feature_layer=-1,
                            tie_word_embeddings=False)
    model = tf.Mistral3ForConditionalGeneration(cfg)
    ip = PixtralImageProcessorPil(size={"longest_edge": IMAGE_SIZE},
                                  patch_size={"height": patch, "width": patch})
    from mllmcal.eval.compat import processor_class

    # transformers 5.17 gates PixtralProcessor on torchvision (see processor_class)
    proc = processor_class("PixtralProcessor")(image_processor=ip, tokenizer=tok, patch_size=patch,
                               spatial_merge_size=merge, chat_template=MISTRAL3_TEMPLATE)
    _boost_letters(model, tok)
    return _save(model, proc, out)


# ----------------------------------------------------------------------------- GLM-4.1V

# https://huggingface.co/zai-org/GLM-4.1V-9B-Thinking/blob/main/chat_template.jinja
# Verified against two public copies: one records this checkpoint's processor template
# ("official_chat_template" of zai-org/GLM-4.1V-9B-Thinking at revision 3c1471e5, with its
# sha256) and sgl-project/sglang's test of template content formats
# (test_detect_msg_content_pattern) quotes the same text without the blank line after
# '<|user|>{{ '\n' }}' (which the following {%- strips anyway): identical in what we render.
# '[gMASK]<sop>' comes from the template (the tokenizer has no BOS). It has no <think>
# part: the Thinking model writes "<think>" itself after "<|assistant|>\n", so the open
# assistant turn eval continues is "<|assistant|>\nAnswer: (" as the template renders it.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>\n{%- for msg in messages %}\n    {%- if msg.role == 'system' %}\n"
    "<|system|>\n{{ msg.content }}\n    {%- elif msg.role == 'user' %}\n"
    "<|user|>{{ '\\n' }}\n\n        {%- if msg.content is string %}\n{{ msg.content }}\n"
    "        {%- else %}\n            {%- for item in msg.content %}\n"
    "                {%- if item.type == 'video' or 'video' in item %}\n"
    "<|begin_of_video|><|video|><|end_of_video|>\n"
    "                {%- elif item.type == 'image' or 'image' in item %}\n"
    "<|begin_of_image|><|image|><|end_of_image|>\n"
    "                {%- elif item.type == 'text' %}\n{{ item.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "    {%- elif msg.role == 'assistant' %}\n        {%- if msg.metadata %}\n"
    "<|assistant|>{{ msg.metadata }}\n{{ msg.content }}\n        {%- else %}\n"
    "<|assistant|>\n{{ msg.content }}\n        {%- endif %}\n    {%- endif %}\n"
    "{%- endfor %}\n{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                 "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                 "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>", "<|image|>", "<|video|>"]


def build_glm4v(out: Path, texts: Iterable[str] = ()) -> Path:
    """GLM-4.1V: Qwen2-VL-like dynamic patches (the processor expands <|image|>), a ViT with
    interpolated learned positions, M-RoPE over half of each head (partial_rotary_factor)."""
    import transformers as tf
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    torch.manual_seed(15)
    tok = _fast(_train_tokenizer(_GLM_SPECIALS, "bytelevel", None, texts),
                eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in _GLM_SPECIALS}
    patch, merge = 4, 2
    # head_dim 16, half rotary -> 4 frequencies over (t, h, w)
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5},
                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    vis = dict(depth=1, hidden_size=16, num_heads=2, image_size=IMAGE_SIZE, patch_size=patch,
               spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=32,
               intermediate_size=32)
    cfg = tf.Glm4vConfig(text_config=text, vision_config=vis,
                         image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                         image_start_token_id=ids["<|begin_of_image|>"],
                         image_end_token_id=ids["<|end_of_image|>"],
                         video_start_token_id=ids["<|begin_of_video|>"],
                         video_end_token_id=ids["<|end_of_video|>"])
    model = tf.Glm4vForConditionalGeneration(cfg)
    # smart_resize counts 2 (temporal) x h x w pixels: at most a 16x32 frame
    pixels = 2 * IMAGE_SIZE * 2 * IMAGE_SIZE
    ip = Glm4vImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                size={"shortest_edge": 2 * IMAGE_SIZE * IMAGE_SIZE,
                                      "longest_edge": pixels})
    proc = _without_video(tf.Glm4vProcessor)(image_processor=ip, tokenizer=tok,
                                             chat_template=GLM4V_TEMPLATE)
    _boost_letters(model, tok)
    video = {"video_processor_type": "Glm4vVideoProcessor", "patch_size": patch,
             "merge_size": merge, "temporal_patch_size": 2,
             "size": {"shortest_edge": 2 * IMAGE_SIZE * IMAGE_SIZE, "longest_edge": pixels}}
    return _save(model, proc, out, video, "Glm4vProcessor")


def manual_inputs(arch_name: str, path: Path, text: str, image) -> dict:
    """Model inputs built by hand from the checkpoint's files, independently of eval."""
    from mllmcal.eval.compat import load_processor

    proc = load_processor(path)
    tok = proc.tokenizer
    if arch_name == "paligemma":
        if image is None:
            ids = tok(tok.bos_token + text, return_tensors="pt", add_special_tokens=False)
            ids["token_type_ids"] = torch.zeros_like(ids["input_ids"])
            return ids
        enc = proc(images=[[image]], text=[text], return_tensors="pt")
        enc.pop("labels")
        assert tok.convert_ids_to_tokens(int(enc["input_ids"][0, -1])).strip("\u2581") == "\n"
        return {k: (v[:, :-1] if k in ("input_ids", "attention_mask", "token_type_ids") else v)
                for k, v in enc.items()}
    special = not text.startswith(tok.bos_token or "\0")
    if image is None:
        return proc(text=[text], return_tensors="pt", add_special_tokens=special)
    return proc(images=[[image]], text=[text], return_tensors="pt", add_special_tokens=special)


BUILDERS: dict[str, Callable[..., Path]] = {
    "llava-1.5": build_llava,
    "qwen2-vl": build_qwen2_vl,
    "idefics3": build_idefics3,
    "smolvlm": build_smolvlm,
    "gemma3": build_gemma3,
    "paligemma": build_paligemma,
    "llava-onevision": build_llava_onevision,
    "internvl": build_internvl,
    "qwen2.5-vl": build_qwen25_vl,
    "llava-next": build_llava_next,
    "mllama": build_mllama,
    "qwen3-vl": build_qwen3_vl,
    "mistral3": build_mistral3,
    "glm4v": build_glm4v,
}


# ----------------------------------------------------------------------------- text LLMs

# https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct/blob/main/tokenizer_config.json
# Verified against microsoft/onnxruntime-extensions shared/api/chat_template.cc
# (LLAMA3_CHAT_TEMPLATE, mapped there to meta-llama/Meta-Llama-3-8B-Instruct): identical.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct/blob/main/tokenizer_config.json
# (the part without tools: the released text's `tools` branch and its tool-call / tool
# message branches are left out; the project passes no tools). Verified against the
# Qwen2.5-Instruct template as vendored verbatim in public code (default system prompt "You
# are Qwen, created by Alibaba Cloud. You are a helpful assistant." also in pytorch/torchtune
# torchtune/models/qwen2_5/_prompt_template.py): identical in what we render.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}"
    "{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


def build_llama3_text(out: Path, texts: Iterable[str] = ()) -> Path:
    """A Llama 3 instruct causal LM: the template writes BOS, the tokenizer would too."""
    import transformers as tf

    torch.manual_seed(6)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = _fast(_train_tokenizer(specials, "bytelevel", "<|begin_of_text|>", texts),
                bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    model = tf.LlamaForCausalLM(_llama(len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id))
    _boost_letters(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def build_qwen25_text(out: Path, texts: Iterable[str] = ()) -> Path:
    """A Qwen2.5 instruct causal LM: no BOS at all."""
    import transformers as tf

    torch.manual_seed(7)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = _fast(_train_tokenizer(specials, "bytelevel", None, texts), eos_token="<|im_end|>",
                pad_token="<|endoftext|>")
    tok.chat_template = QWEN25_TEMPLATE
    cfg = tf.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tf.Qwen2ForCausalLM(cfg)
    _boost_letters(model, tok)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


TEXT_BUILDERS: dict[str, Callable[..., Path]] = {
    "llama3": build_llama3_text,
    "qwen2.5": build_qwen25_text,
}


# ----------------------------------------------------------------- word-level models


def word_level_tokenizer(specials: list[str], words: Iterable[str], pre_tokenizer: str = "whitespace",
                         **kw):
    """A fast tokenizer whose vocabulary is ``specials`` then ``words``, one id each.

    ``pre_tokenizer``: ``"whitespace"`` (words and punctuation runs apart) or ``"split"``
    (on whitespace only). ``kw``: the special-token names (``bos_token="<s>"``, ...).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    if pre_tokenizer == "whitespace":
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.decoder = decoders.WordPiece(prefix="##")
    else:
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _fast(tk, **kw)


_TINY_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN]


def _tiny_words(texts: Iterable[str]) -> list[str]:
    base = f"{INSTRUCTION} Answer : ( ) % , . ? {' '.join(OPTION_LETTERS)} I don't know"
    seen: dict[str, None] = {}
    for t in [base, *texts]:
        for w in re.findall(r"\w+|[^\w\s]+", t):
            seen.setdefault(w, None)
    return [w for w in seen if w not in _TINY_SPECIAL]


def build_tiny_checkpoint(out_dir: str | Path, texts: Iterable[str] = (), multimodal: bool = True,
                          seed: int = 0, image_size: int = 16, letter_gain: float = 6.0) -> Path:
    """Write a random tiny checkpoint to ``out_dir`` and return the path.

    Saved exactly like a hub checkpoint (config, safetensors, word-level tokenizer,
    processor), so that loading it exercises the ``--model PATH`` code path. The lm_head
    rows of the option letters are scaled by ``letter_gain`` so that random weights still
    answer with a letter most of the time, with confidences spread over (0, 1).

    Args:
        texts: text the word-level vocabulary must cover (questions, options).
        multimodal: a LLaVA (CLIP vision tower + Llama) if True, else a ``LlamaForCausalLM``.
        image_size: the vision tower's input side, in pixels (patch size is half of it).
    """
    import transformers as tf

    torch.manual_seed(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = word_level_tokenizer(
        _TINY_SPECIAL, _tiny_words(texts), pad_token="<pad>", unk_token="<unk>",
        bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": IMAGE_TOKEN})
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


#: the vLLM model's words, ``w0 w1 ...``: prompts are made of them
VLLM_WORDS = [f"w{i}" for i in range(250)]


def build_vllm_llama(path: str | Path, seed: int = 0, *, n_words: int = 250, hidden: int = 128,
                     layers: int = 2) -> Path:
    """A tiny random Llama with a word-level tokenizer, saved where vLLM loads it by path
    (nothing is written if ``path`` holds a model already).

    hidden 128 with 4 heads gives head_dim 32, the smallest the CPU attention backend takes.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    words = VLLM_WORDS if n_words == len(VLLM_WORDS) else [f"w{i}" for i in range(n_words)]
    fast = word_level_tokenizer(specials, words, pre_tokenizer="split", unk_token="<unk>",
                                bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(specials) + len(words), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32,
                      num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # Larger output weights than the default init give peaked, varied distributions, so
    # confidences spread over (0, 1) instead of sitting near 1/V.
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(build_vllm_llama(sys.argv[1]))


# ------------------------------------------------------------- for the vLLM CPU engine
# vLLM's CPU attention takes head sizes 32, 64, 80, ... only: these are the eval's test
# models with head_dim 32 everywhere (text and vision towers), saved in the released layout.

#: gain on the vLLM test LLaVA's projector output layer (weights, not its bias): the image
#: then moves the letters' probabilities by up to ~0.3 instead of ~1e-3
IMAGE_GAIN = 20.0


def build_vllm_eval_llama(out: str | Path, texts: Iterable[str] = (), seed: int = 1) -> Path:
    """:func:`build_tiny_checkpoint`'s word-level Llama causal LM (no chat template) with
    hidden 64 / 2 heads (head_dim 32), which vLLM's CPU engine runs."""
    import transformers as tf

    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = word_level_tokenizer(
        _TINY_SPECIAL, _tiny_words(texts), pad_token="<pad>", unk_token="<unk>",
        bos_token="<s>", eos_token="</s>")
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[tok.convert_tokens_to_ids(list(OPTION_LETTERS))] *= 6.0
    tok.save_pretrained(out)
    model.save_pretrained(out)
    return out


def _released_llava_names(out: Path) -> None:
    """Rename a transformers-5 LLaVA's weights to the released checkpoints' layout
    (``language_model.model.*``, ``language_model.lm_head.*``, ``vision_tower.vision_model.*``,
    ``multi_modal_projector.*``), the one vLLM 0.32 loads."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    sd = load_file(str(path))
    renamed = {}
    for k, v in sd.items():
        n = k
        for old, new in (("model.language_model.", "language_model.model."),
                         ("lm_head.", "language_model.lm_head."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.vision_tower.", "vision_tower."),
                         ("vision_tower.", "vision_tower.vision_model.")):
            if n.startswith(old) and not n.startswith("vision_tower.vision_model."):
                n = new + n[len(old):]
        renamed[n] = v
    save_file(renamed, str(path), metadata={"format": "pt"})


def _scale_weights(out: Path, prefix: str, gain: float) -> None:
    """Multiply the saved weights whose names start with ``prefix`` by ``gain``."""
    from safetensors.torch import load_file, save_file

    path = out / "model.safetensors"
    sd = load_file(str(path))
    for k in sd:
        if k.startswith(prefix):
            sd[k] = sd[k] * gain
    save_file(sd, str(path), metadata={"format": "pt"})


def build_vllm_llava(out: Path, texts: Iterable[str] = ()) -> Path:
    """:func:`build_llava` (LLaVA-1.5 with its processor and chat template) with head_dim 32
    in the Llama and the CLIP tower, its weights named as released."""
    import transformers as tf

    torch.manual_seed(0)
    tok = _sentencepiece_llama_tokenizer(texts)
    patch = IMAGE_SIZE // 4
    vis = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=patch,
                              projection_dim=64)
    text = _llama(len(tok), hidden_size=64, intermediate_size=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=3)
    cfg = tf.LlavaConfig(vision_config=vis, text_config=text,
                         image_token_index=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    model = tf.LlavaForConditionalGeneration(cfg)
    ip = tf.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    _save_clip_llava(model, tf.LlavaProcessor, ip, tok, patch, LLAVA_TEMPLATE, out)
    _released_llava_names(out)
    _scale_weights(out, "multi_modal_projector.linear_2.", IMAGE_GAIN)
    return out


def build_vllm_qwen2_vl(out: Path, texts: Iterable[str] = ()) -> Path:
    """:func:`build_qwen2_vl` with head_dim 32 in the text model (M-RoPE sections 4+6+6)
    and the vision tower."""
    _build_qwen_vl(out, texts, 1, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration",
                   "Qwen2VLProcessor", QWEN2VL_TEMPLATE,
                   dict(depth=1, embed_dim=64, hidden_size=64, num_heads=2, mlp_ratio=2),
                          text_extra=dict(hidden_size=64, intermediate_size=128, rope_parameters={
                              "rope_type": "default", "mrope_section": [4, 6, 6],
                              "rope_theta": 10000.0}))
    return out


VLLM_EVAL_BUILDERS: dict[str, Callable[..., Path]] = {
    "llama": build_vllm_eval_llama, "llava-1.5": build_vllm_llava, "qwen2-vl": build_vllm_qwen2_vl,
}
