"""The demo's tiny LLaVA: a word-level tokenizer, a CLIP image processor and the model config.

Everything is built offline from arguments and saved with ``save_pretrained`` into one
directory, so the evaluator loads it with the Auto classes exactly like a hub checkpoint::

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)

Image tokens: the vision tower sees a ``IMAGE_SIZE`` px image cut into
``(IMAGE_SIZE / PATCH_SIZE)**2`` patches plus a CLS token. With
``vision_feature_select_strategy="default"`` LLaVA drops the CLS feature, so the processor
(``patch_size``, ``num_additional_image_tokens=1``, same strategy) expands one ``<image>`` into
exactly ``NUM_IMAGE_TOKENS`` placeholders, the count ``LlavaModel.get_placeholder_mask`` checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

from ..prompting import (
    ABSTENTION_HINTS,
    DEFAULT_ANSWER_PREFIX,
    IDK_OPTION_TEXT,
    IMAGE_TOKEN,
    INSTRUCTION,
    OPTION_LETTERS,
)
from .shapes import BACKGROUND, IMAGE_SIZE, SPLITS

PATCH_SIZE = 12
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
PAD, BOS, EOS, UNK = SPECIAL_TOKENS[:4]

# Answer prefixes the model is trained with, so the paper's seed prompts and their
# paraphrases land in familiar territory. The first is the paper's default.
ANSWER_PREFIXES = (
    DEFAULT_ANSWER_PREFIX,
    "The answer is",
    "The answer might be",
    "The answer must be",
    "The correct answer is",
    "The best answer is",
    "My answer is",
    "The answer could be",
    "The answer should be",
    "I think the answer is",
    "The right option is",
    "Final answer",
    "The most likely answer is",
    "Answer with the option letter",
)

# Words a prompt optimiser or a verbalised-confidence prompt is likely to use; in the
# vocabulary so that they are not all <unk> (their embeddings stay near initialisation
# unless they also occur in training).
EXTRA_WORDS = """
a an the is are be might must could should would may can will probably likely surely certainly
perhaps maybe definitely clearly answer answers option options letter choice choose select
pick correct right best most final my your our I you we think believe guess say respond
response reply output give provide only just directly single one of this that these those
question image picture photo shown see look above below in on at to for with without and or
not no yes if unsure sure confident confidence how what which where why who when please
based given from as it its let me us step carefully consider considering between percent
probability number rate scale 0-100 from to very quite fairly somewhat highly less more
""".split()

_WORD_RE = re.compile(r"[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]")
_OPTION_LINE_RE = re.compile(r"^\(([A-H])\) (.+)$")


def words_of(text: str) -> list[str]:
    """The word-level pieces the demo tokenizer splits ``text`` into (specials excluded)."""
    return _WORD_RE.findall(text.replace(IMAGE_TOKEN, " "))


def option_phrase(letter: str, text: str) -> str:
    """The single token that stands for the option line ``({letter}) {text}``."""
    return f"({letter}) {text}"


def build_vocab(texts: Iterable[str]) -> dict[str, int]:
    """Token -> id over ``texts`` plus the prompt words (instruction, abstention hints,
    answer prefixes, :data:`EXTRA_WORDS`); specials first, then sorted tokens.

    Besides words, every option line ``(X) text`` seen in ``texts`` (for every letter A-H)
    is one phrase token, so the letter and the option text reach the model as one vector
    and no previous-token circuit is needed to tie them. Options whose text is not in the
    vocabulary still tokenize, word by word.
    """
    words: set[str] = {"\n", *OPTION_LETTERS, *".,:;?!()'\"-%"}
    option_texts: set[str] = {IDK_OPTION_TEXT}
    hints = [h for h in ABSTENTION_HINTS.values() if h]
    for text in [INSTRUCTION, IDK_OPTION_TEXT, *hints, *ANSWER_PREFIXES, *EXTRA_WORDS, *texts]:
        words.update(words_of(text))
        for line in text.splitlines():
            m = _OPTION_LINE_RE.match(line.strip())
            if m:
                option_texts.add(m.group(2).strip())
    words.update(w.capitalize() for w in list(words) if w.isalpha() and w.islower())
    words.update(str(k) for k in range(101))
    words.difference_update(SPECIAL_TOKENS)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    phrases = {option_phrase(c, t) for c in OPTION_LETTERS for t in option_texts}
    for w in sorted(words) + sorted(phrases):
        vocab[w] = len(vocab)
    return vocab


def phrase_parts(token: str) -> tuple[str, list[str]] | None:
    """``(letter, words of the option text)`` for a phrase token, else None."""
    m = _OPTION_LINE_RE.match(token)
    return (m.group(1), words_of(m.group(2))) if m else None


def build_tokenizer(vocab: dict[str, int]):
    """A ``PreTrainedTokenizerFast`` (word level, newline kept as a token, ``<s>`` prepended).

    Left padding, so that batched ``generate`` continues every row from its last prompt token.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t\r]+"), "removed"),
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Split(Regex(_WORD_RE.pattern), "isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Phrase tokens are matched before pre-tokenization; single_word keeps "(A) 1" from
    # matching the start of "(A) 10".
    phrases = [t for t in vocab if phrase_parts(t) is not None]
    tok.add_tokens([AddedToken(t, single_word=True, normalized=False) for t in phrases])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        model_max_length=512,
    )


# Renders ``mllmcal.prompting.chat_messages(q, prefix, with_image, hint)`` as exactly
# ``build_prompt(q, prefix, with_image, hint)``, the raw prompt the model is trained on: the
# image placeholder on its own line, the user text, then "\n" and the open assistant turn
# ("Answer: ("). No role markers and no BOS (the demo model never saw either); the
# tokenizer adds BOS, so a caller that tokenizes the rendered text with special tokens on
# gets BOS exactly once. ``add_generation_prompt`` opens the assistant's line.
CHAT_TEMPLATE = (
    # Newlines as expressions: transformers renders chat templates with trim_blocks, which
    # would eat a literal newline right after a block tag.
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN + "\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}{% endif %}"
)


def build_processor(tokenizer):
    """A ``LlavaProcessor`` whose image expansion matches the model (``NUM_IMAGE_TOKENS``)."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The PIL backend: the torchvision one is not a dependency of mllmcal.
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        do_convert_rgb=True,
        # Centred on the background colour: empty patches embed to zero (plus position),
        # so the few patches holding a shape stand out from the start of training.
        image_mean=[c / 255 for c in BACKGROUND],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(vocab: dict[str, int]):
    """``LlavaConfig``: 2-layer CLIP tower (64 wide) and a 3-layer Llama (128 wide)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=64,
    )
    text = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=vocab[PAD],
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        # Tied: a token read from the context (an option's letter) and the same token
        # predicted share one vector, so copying a letter is close to the identity map.
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab[IMAGE_TOKEN],
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        # The last layer: a 2-layer tower has little to spare for LLaVA's usual -2.
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def vocab_from_dataset(data_dir: str | Path) -> dict[str, int]:
    """The vocabulary of every split JSON (``{split}.json``) in ``data_dir`` (see :func:`build_vocab`)."""
    texts: list[str] = []
    paths = [Path(data_dir) / f"{split}.json" for split in SPLITS]
    for path in [p for p in paths if p.is_file()]:
        for item in json.loads(path.read_text()):
            texts += [turn["value"] for turn in item["conversations"]]
    if not texts:
        raise FileNotFoundError(f"no split JSON with items found in {data_dir}")
    return build_vocab(texts)


def init_demo_model(data_dir: str | Path, seed: int = 0):
    """A freshly initialised ``(model, processor)`` pair over the data set's vocabulary."""
    import torch
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    vocab = vocab_from_dataset(data_dir)
    processor = build_processor(build_tokenizer(vocab))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(build_config(vocab))
    # A phrase token starts as letter + mean of its words, so what the model learns about
    # a letter or a word carries over to the phrases that contain it.
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        for tok, i in vocab.items():
            parts = phrase_parts(tok)
            if parts is None:
                continue
            letter, words = parts
            ids = [vocab.get(w, vocab[UNK]) for w in words]
            emb[i] = emb[vocab[letter]] + emb[ids].mean(0)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[PAD],
        do_sample=False,
        max_new_tokens=20,
    )
    return model, processor


def save_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """``save_pretrained`` model and processor (tokenizer included) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
