"""Loading any local checkpoint for evaluation, and turning items into model inputs.

A checkpoint directory is loaded through the Auto classes: a config with a
``vision_config`` is an image-text model (``AutoModelForImageTextToText`` with its
``AutoProcessor``), anything else a causal LM (``AutoModelForCausalLM`` with its
``AutoTokenizer``).

How a prompt becomes model inputs (the same for every architecture, exceptions named):

1. **Rendering.** With a chat template, :func:`mllmcal.prompting.chat_messages` (a user turn
   of typed parts, ``{"type": "image"}`` only when the image is shown, and an open
   assistant turn ``"{prefix}: ("``) goes through the *processor's*
   ``apply_chat_template(..., continue_final_message=True)``: the template places the
   architecture's own image placeholder. Text-only causal LMs get plain-string contents,
   which is what their templates iterate. Without a template the prompt is
   :func:`mllmcal.prompting.build_prompt` with ``processor.image_token`` as placeholder.
   Templates that print today's date get a fixed one (:func:`~mllmcal.eval.quirks.date_kwargs`),
   so prompts (and cached scores) do not change with the day of the run. Llama 3.2
   Vision's template writes a system turn with that date into text-only prompts and none
   into image prompts (it refuses a system message next to an image); eval keeps the
   released behaviour, so for it the two prompts differ by that turn as well as by the
   image.
2. **BOS exactly once**, one rule for image and text-only prompts: tokenize with the
   tokenizer's special tokens ON, unless the rendered text already starts with the
   tokenizer's ``bos_token`` string (templates such as Gemma 3's and Idefics3's write it),
   then OFF; also OFF when the processor writes BOS into the text itself (Mllama's puts
   ``<|begin_of_text|>`` after any leading ``<|image|>`` of a text that has none: its
   base-model layout ``<|image|><|begin_of_text|>prompt``). Encoded rows are checked:
   more than one BOS is an error naming the model.
3. **Images per sample**: the processor gets ``[[image], [image], ...]``. An item with
   several images (:attr:`~mllmcal.eval.data.Item.images`) shows them where their
   ``<image k>`` placeholders stand (:meth:`~mllmcal.eval.data.Item.interleave`; images no
   placeholder names come first): one ``{"type": "image"}`` part per image among the text
   parts of the user turn, or the image placeholder in the text without a chat template;
   the processor gets that sample's images in that order. A model that cannot take that
   many images (:meth:`EvalModel.image_limit_reason`: the architecture's
   ``PromptQuirks.max_images``, else a trial encoding through its processor) skips the item
   with a message naming the model and the item; an item is never cut to fewer images.
   Items with one image keep the single-image prompt (image first).
4. **The next token is the letter.** The encoded prompt must end with the tokens of the
   rendered text's end; a processor that appends text is handled explicitly or refused.

Architectures that deviate are listed by ``model_type`` in
:data:`mllmcal.eval.quirks.PROMPT_QUIRKS`; the transformers compatibility shims are in
:mod:`mllmcal.eval.compat`.

PaliGemma (pt checkpoints have no chat template) is the explicit exception: its processor
writes ``<image>*N <bos> prompt \n`` itself and switches the tokenizer's own BOS off. Its
inputs are that layout without the trailing ``\n`` (big_vision's prefix/suffix separator),
so that the letter follows ``(``: ``<image>*N`` (N from the processor, which also makes the
pixel values) then the tokenized ``<bos> prompt``. Text-only prompts are ``<bos> prompt``;
both get ``token_type_ids`` all 0, i.e. the same bidirectional prefix, so the two differ
only in the image tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..prompting import (
    DEFAULT_ANSWER_PREFIX,
    OPTION_LETTERS,
    answer_opening,
    build_prompt,
    chat_messages,
    user_text,
)
from .compat import MissingDependencyError, load_processor, missing_package
from .data import Item
from .quirks import PromptQuirks, date_kwargs, quirks_for

__all__ = ["EvalModel", "MissingDependencyError", "load_model", "load_processor", "parse_dtype",
           "render_chat", "special_tokens_on",
           "resolve_checkpoint"]

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


def render_chat(processor: Any, msgs: list[dict[str, Any]]) -> str:
    """``msgs`` (:func:`~mllmcal.prompting.chat_messages`) through the chat template of
    ``processor`` (or a tokenizer), the last (assistant) turn left open, today's date pinned (:mod:`.quirks`).

    Typed content parts first. A template that prints an assistant turn's content as is
    (GLM-4.1V's ``{{ msg.content }}``; its user branch takes parts) would write the parts'
    Python repr, ``[{'type': 'text', ...``: that turn is then given as the plain string the
    template expects.

    Raises:
        ValueError: the template prints message contents as Python lists either way.
    """
    def render(messages: list[dict[str, Any]]) -> str:
        return processor.apply_chat_template(messages, tokenize=False,
                                             continue_final_message=True,
                                             **date_kwargs(processor.chat_template))

    text = render(msgs)
    parts = msgs[-1]["content"]
    if isinstance(parts, list) and repr(parts[0])[:9] in text:  # "{'type': "
        flat = "".join(p["text"] for p in parts if p.get("type") == "text")
        text = render([*msgs[:-1], {**msgs[-1], "content": flat}])
        if repr(parts[0])[:9] in text:
            raise ValueError("its chat template prints message contents as Python lists")
    return text


def special_tokens_on(tokenizer: Any, text: str) -> bool:
    """The BOS rule: tokenize a rendered prompt with special tokens on, unless it already
    starts with the tokenizer's ``bos_token`` text (templates that write BOS themselves)."""
    bos = tokenizer.bos_token
    return not (bool(bos) and text.startswith(bos))


@dataclass
class EvalModel:
    """A loaded checkpoint plus what the evaluator needs to know about its vocabulary.

    ``letter_of_token`` is an int64 ``[V]`` tensor on the logits' device: the option
    index (0 for A, ...) a token decodes to, or -1. :meth:`answer_token_ids` gives, for an
    answer prefix, the token that follows ``"{prefix}: ("`` for each letter.
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
    eos_token_ids: list[int] = field(repr=False)
    vocab_size: int = 0
    _answer_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _writes_bos: bool | None = field(default=None, repr=False)
    _placeholder: str | None = field(default=None, repr=False)
    #: images per prompt -> why the model cannot take that many (None: it can)
    _image_limits: dict[int, str | None] = field(default_factory=dict, repr=False)
    #: the architecture's prompt quirks, from :data:`~mllmcal.eval.quirks.PROMPT_QUIRKS`
    quirks: PromptQuirks = field(default_factory=PromptQuirks)

    # ------------------------------------------------------------------ architecture facts

    @property
    def is_paligemma(self) -> bool:
        """The processor lays out image tokens and BOS itself (``PROMPT_QUIRKS``)."""
        return self.quirks.processor_layout

    @property
    def image_token(self) -> str:
        """The processor's own image placeholder (never a literal ``<image>`` guess)."""
        for owner in (self.processor, self.tokenizer):
            tok = getattr(owner, "image_token", None)
            if isinstance(tok, str) and tok:
                return tok
        raise ValueError(f"model {self.name!r}: its processor names no image token and has "
                         "no chat template; cannot place the image in the prompt")

    @property
    def image_placeholder(self) -> str:
        """What stands for the image in a prompt without chat template.

        :attr:`image_token`, wrapped in the image start/end markers where the model's
        config names them and the processor does not write them itself (Qwen2-VL to
        Qwen3-VL: ``<|vision_start|><|image_pad|><|vision_end|>``; GLM-4.1V:
        ``<|begin_of_image|><|image|><|end_of_image|>``, as their templates write it; their
        processors expand only the middle token).
        """
        if self._placeholder is None:
            self._placeholder = self.image_token
            cfg = getattr(self.model, "config", None)
            for a, b in self.quirks.image_markers:
                start, end = getattr(cfg, a, None), getattr(cfg, b, None)
                if isinstance(start, int) and isinstance(end, int):
                    if not self._processor_writes(start):
                        s_tok, e_tok = self.tokenizer.convert_ids_to_tokens([start, end])
                        self._placeholder = f"{s_tok}{self.image_token}{e_tok}"
                    break
        return self._placeholder

    def _processor_writes(self, token_id: int) -> bool:
        """Whether the processor, given the bare image token and an image, writes
        ``token_id`` into the ids itself."""
        from PIL import Image

        try:
            ids = self.processor(text=[self.image_token], images=[[Image.new("RGB", (32, 32))]],
                                 return_tensors="pt")["input_ids"]
        except Exception:  # noqa: BLE001 -- cannot tell: assume it does not
            return False
        return bool((ids == token_id).any())

    def answer_token_ids(self, answer_prefix: str = DEFAULT_ANSWER_PREFIX) -> list[int]:
        """Per letter A-H, the token that follows ``"{answer_prefix}: ("`` (-1 if none).

        Computed for the prefix actually used, so prompts found by prompt optimisation get
        their own table: with BPE, what the prefix ends with can change how a letter
        after it is tokenized.
        """
        if answer_prefix not in self._answer_ids:
            self._answer_ids[answer_prefix] = _canonical_letters(
                self.tokenizer, self.letter_of_token.tolist(), answer_opening(answer_prefix))
        return self._answer_ids[answer_prefix]

    # ------------------------------------------------------------------ several images

    @staticmethod
    def image_order(item: Item) -> list[int]:
        """Indices into ``item.images`` in the order the prompt shows them (one entry per
        shown image: a placeholder named twice shows its image twice)."""
        return [p for p in item.interleave() if isinstance(p, int)]

    def image_limit_reason(self, n: int) -> str | None:
        """Why one prompt of this model cannot show ``n`` images, or None when it can (one
        always can; for more, see the module docstring's step 3; tried once per ``n``)."""
        if n <= 1:
            return None
        if n not in self._image_limits:
            limit = self.quirks.max_images
            kind = getattr(getattr(self.model, "config", None), "model_type", None) or "?"
            if not self.multimodal:
                why: str | None = "it is text-only"
            elif limit is not None and n > limit:
                why = f"its architecture ({kind}) takes at most {limit} image(s) per prompt"
            else:
                why = self._try_images(n, kind)
            self._image_limits[n] = why
        return self._image_limits[n]

    def _try_images(self, n: int, kind: str) -> str | None:
        from PIL import Image

        probe = Item("probe", " ".join(f"<image {k + 1}>" for k in range(n)) + " Which?",
                     ("a", "b"), "A", images=tuple(f"probe{k}.png" for k in range(n)))
        try:
            prompt = self.render(probe)
            self.encode([prompt], [[Image.new("RGB", (32, 32), (9 * k, 0, 0)) for k in range(n)]])
        except Exception as exc:  # noqa: BLE001 -- any refusal means: cannot take n images
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return f"its processor ({kind}) refused a prompt with {n} images ({first})"
        return None

    def _render_interleaved(self, item: Item, answer_prefix: str, hint: str | None,
                            instruction: str | None) -> str:
        """The prompt of an item with several images, each where its placeholder stands."""
        parts = item.interleave(user_text(item.question_with_options, hint, instruction))
        if self.use_chat_template:
            content = [{"type": "image"} if isinstance(p, int) else {"type": "text", "text": p}
                       for p in parts]
            return self._render_chat([
                {"role": "user", "content": content},
                {"role": "assistant", "content": [{"type": "text",
                                                   "text": answer_opening(answer_prefix)}]}])
        if self.is_paligemma:
            raise ValueError(f"model {self.name!r}: PaliGemma prompts take one image")
        out, leading = [], True
        for p in parts:
            if isinstance(p, int):
                # images before any text each open a line, as the one-image prompt does
                out.append(self.image_placeholder + ("\n" if leading else ""))
            else:
                leading = False
                out.append(p)
        return "".join(out) + "\n" + answer_opening(answer_prefix)

    # ------------------------------------------------------------------ prompts

    def render(self, item: Item, answer_prefix: str = DEFAULT_ANSWER_PREFIX,
               with_image: bool = True, hint: str | None = None,
               instruction: str | None = None) -> str:
        """The prompt text for ``item`` (with the image placeholder(s) when shown; an item
        with several images interleaves them, see the module docstring)."""
        if with_image and self.multimodal and len(item.images) > 1:
            return self._render_interleaved(item, answer_prefix, hint, instruction)
        q = item.question_with_options
        if self.use_chat_template:
            if self.multimodal:
                return self._render_chat(chat_messages(q, answer_prefix, with_image, hint,
                                                       instruction))
            # plain-string contents: what text-only templates iterate
            return render_chat(self.tokenizer, [
                {"role": "user", "content": user_text(q, hint, instruction)},
                {"role": "assistant", "content": answer_opening(answer_prefix)}])
        if with_image and self.is_paligemma:
            # the processor writes the image tokens and BOS itself (module docstring)
            return build_prompt(q, answer_prefix, with_image=False, hint=hint,
                                instruction=instruction)
        return build_prompt(q, answer_prefix, with_image=with_image, hint=hint,
                            instruction=instruction,
                            image_token=self.image_placeholder if with_image else "")

    def _render_chat(self, msgs: list[dict[str, Any]]) -> str:
        try:
            return render_chat(self.processor, msgs)
        except ValueError as exc:
            raise ValueError(f"model {self.name!r}: {exc}") from None

    def _add_special_tokens(self, prompts: list[str]) -> bool:
        starts = {not special_tokens_on(self.tokenizer, p) for p in prompts}
        if len(starts) > 1:
            raise ValueError(f"model {self.name!r}: some prompts of one batch start with BOS "
                             "and some do not")
        return not starts.pop() and not self._processor_writes_bos

    @property
    def _processor_writes_bos(self) -> bool:
        """Whether the processor puts BOS into the text itself (Mllama's inserts it after
        any leading ``<|image|>`` when the text has none), so the tokenizer must not."""
        if self._writes_bos is None:
            self._writes_bos = False
            bos_id = self.tokenizer.bos_token_id
            if self.processor is not None and bos_id is not None and not self.is_paligemma:
                try:
                    ids = self.processor(text=["x"], add_special_tokens=False)["input_ids"][0]
                except Exception:  # noqa: BLE001 -- a processor that cannot take text alone
                    ids = []
                self._writes_bos = bos_id in list(ids)
        return self._writes_bos

    def encode(self, prompts: list[str], images: list[Any] | None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs on the model's input device.

        ``prompts`` from :meth:`render`; ``images`` (per prompt one PIL image, or the list
        of its images in :meth:`image_order`) only for image prompts. See the module
        docstring for the BOS rule and PaliGemma.
        """
        special = self._add_special_tokens(prompts)
        if self.is_paligemma:
            enc = self._paligemma_inputs(prompts, images)
        elif images:
            if self.processor is None:
                raise ValueError(f"model {self.name!r} is text-only; it cannot take images")
            per_sample = [list(im) if isinstance(im, list | tuple) else [im] for im in images]
            enc = self.processor(images=per_sample, text=prompts,
                                 return_tensors="pt", padding=True, add_special_tokens=special)
        elif self.processor is not None:
            enc = self.processor(text=prompts, return_tensors="pt", padding=True,
                                 add_special_tokens=special)
        else:
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True,
                                 add_special_tokens=special)
        self._check_encoding(enc, prompts)
        out = {}
        for k, v in enc.items():
            if k == "labels" or not isinstance(v, torch.Tensor):
                continue  # PaliGemma's processor adds training labels
            if k == "token_type_ids" and not self.multimodal:
                continue
            v = v.to(self.device)
            if v.is_floating_point():
                v = v.to(self.dtype)
            out[k] = v
        return out

    def _paligemma_inputs(self, prompts: list[str], images: list[Any] | None) -> dict:
        """``<image>*N <bos> prompt`` (left-padded), ``token_type_ids`` all 0 (module
        docstring): assembled here, so the result does not depend on how ``(`` and ``\n``
        would tokenize together; the processor's N is checked and its pixel values used."""
        tok = self.tokenizer
        n_img, pixels = 0, None
        if images:
            enc = self.processor(images=[[im] for im in images], text=prompts,
                                 return_tensors="pt", padding=True)
            image_id = tok.convert_tokens_to_ids(self.image_token)
            counts = (enc["input_ids"] == image_id).sum(dim=1)
            n_img, pixels = int(counts[0]), enc["pixel_values"]
            if not bool((counts == n_img).all()) or n_img == 0:
                raise ValueError(f"model {self.name!r}: unexpected image-token counts "
                                 f"{counts.tolist()} from PaliGemma's processor")
        text = tok([tok.bos_token + p for p in prompts], add_special_tokens=False)["input_ids"]
        rows = [[tok.convert_tokens_to_ids(self.image_token)] * n_img + ids for ids in text]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        out = {
            "input_ids": torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
        }
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
        if pixels is not None:
            out["pixel_values"] = pixels
        return out

    def _check_encoding(self, enc: Any, prompts: list[str]) -> None:
        ids = enc["input_ids"]
        mask = enc.get("attention_mask")
        bos_id = self.tokenizer.bos_token_id
        for r in range(ids.shape[0]):
            row = ids[r][mask[r].bool()] if mask is not None else ids[r]
            if bos_id is not None and int((row == bos_id).sum()) > 1:
                raise ValueError(f"model {self.name!r}: the encoded prompt holds BOS "
                                 f"{int((row == bos_id).sum())} times")
            # the rendered text's own last token: what the letter must follow
            tail = self.tokenizer.encode(prompts[r], add_special_tokens=False)[-1:]
            if tail and int(row[-1]) != tail[0]:
                raise ValueError(
                    f"model {self.name!r}: the encoded prompt does not end with the answer "
                    f"prefix (its processor appended {self.tokenizer.decode(row[-2:])!r}); "
                    "the next token would not be the letter")


def resolve_checkpoint(spec: str) -> str:
    """``spec`` as a local checkpoint directory with a ``config.json``.

    Raises:
        FileNotFoundError: not a directory, or no config.json in it.
    """
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"--model {spec!r}: not a local checkpoint directory (mllmcal loads local "
            "directories only; download hub models first, e.g. with `huggingface-cli download`)"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"--model {spec!r}: no config.json in that directory")
    return str(p)


def _letter_table(tokenizer: Any, vocab_size: int) -> list[int]:
    letter_of = [-1] * vocab_size
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(vocab_size, len(tokenizer)))))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            continue
        # SentencePiece marks a leading space with U+2581, byte-level BPE with U+0120
        s = piece.replace("\u2581", " ").replace("\u0120", " ").strip()
        if len(s) == 1 and s in OPTION_LETTERS:
            letter_of[i] = OPTION_LETTERS.index(s)
    return letter_of


def _canonical_letters(tokenizer: Any, letter_of: list[int], opening: str) -> list[int]:
    base = tokenizer.encode(opening, add_special_tokens=False)
    canonical = []
    for idx, letter in enumerate(OPTION_LETTERS):
        ids = tokenizer.encode(opening + letter, add_special_tokens=False)
        tok = ids[-1] if (ids[: len(base)] == base and len(ids) == len(base) + 1) else -1
        if tok < 0 or tok >= len(letter_of) or letter_of[tok] != idx:
            tok = next((i for i, li in enumerate(letter_of) if li == idx), -1)
        canonical.append(tok)
    return canonical


def prepare_tokenizer(path: str, tokenizer: Any, owner: Any, chat_template: str,
                      vocab_size: int, eos: int | list[int] | None
                      ) -> tuple[bool, list[int], list[int]]:
    """What both engines set up on the tokenizer side: left padding (generation appends on
    the right; pad = EOS where unset). Returns whether the chat template of ``owner`` (the
    processor, else the tokenizer) is used, the ``[vocab_size]`` letter table and the end
    token ids (``eos``, the generation config's, else the tokenizer's)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_chat = chat_template != "off" and bool(getattr(owner, "chat_template", None))
    letter_of = _letter_table(tokenizer, vocab_size)
    if all(li < 0 for li in letter_of):
        raise ValueError(f"{path}: no token of this vocabulary decodes to an option letter A-H")
    eos = eos if eos is not None else tokenizer.eos_token_id
    return use_chat, letter_of, [e for e in (eos if isinstance(eos, list) else [eos])
                                 if e is not None]


def load_model(spec: str, device: str | torch.device = "cpu", dtype: str = "auto",
               chat_template: str = "auto", name: str | None = None,
               device_map: str | None = None) -> EvalModel:
    """Load a local checkpoint directory for evaluation.

    Args:
        spec: a directory with ``config.json`` and weights.
        device: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"`` (ignored with ``device_map``).
        dtype: ``auto`` | ``float32`` | ``float16`` | ``bfloat16`` for the weights.
        chat_template: ``auto`` (use the directory's template if it has one) or ``off``.
        name: the display name (default: the directory's name).
        device_map: e.g. ``"auto"``: spread the model over the visible devices with
            accelerate (for models larger than one device); inputs go to the device of
            the input embeddings.

    Raises:
        MissingDependencyError: the processor or model needs a missing optional package.
    """
    import transformers as tf

    path = resolve_checkpoint(spec)
    name = name or os.path.basename(os.path.normpath(path))
    device = torch.device(device if device_map is None else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = parse_dtype(dtype, device)
    config = tf.AutoConfig.from_pretrained(path)
    multimodal = getattr(config, "vision_config", None) is not None
    processor = None
    kw: dict[str, Any] = {"dtype": torch_dtype}
    if device_map is not None:
        try:
            import accelerate  # noqa: F401  (device_map needs it)
        except ImportError:
            raise MissingDependencyError(
                f"model {name!r}: --device-map {device_map} needs the package 'accelerate'"
            ) from None
        kw["device_map"] = device_map
    try:
        if multimodal:
            processor = load_processor(path, name)
            tokenizer = processor.tokenizer
            model = tf.AutoModelForImageTextToText.from_pretrained(path, **kw)
        else:
            tokenizer = tf.AutoTokenizer.from_pretrained(path)
            model = tf.AutoModelForCausalLM.from_pretrained(path, **kw)
    except MissingDependencyError:
        raise
    except ImportError as exc:
        pkg = missing_package(exc)
        raise MissingDependencyError(
            f"model {name!r} ({path}) needs the package {pkg!r}, which is not installed or "
            f"does not import: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
        ) from None
    if device_map is None:
        model.to(device)
    model.eval()
    try:  # inputs go where the input embeddings live
        device = model.get_input_embeddings().weight.device
    except AttributeError:
        pass
    # logits come out where the lm_head lives (another GPU than the inputs with device_map)
    out_device = model.get_output_embeddings().weight.device
    vocab_size = model.get_output_embeddings().weight.shape[0]
    use_chat, letter_of, eos_ids = prepare_tokenizer(
        path, tokenizer, processor if multimodal else tokenizer, chat_template, vocab_size,
        model.generation_config.eos_token_id if model.generation_config else None)
    return EvalModel(
        name=name, path=path, model=model, tokenizer=tokenizer, processor=processor,
        multimodal=multimodal, device=device, dtype=torch_dtype, use_chat_template=use_chat,
        letter_of_token=torch.tensor(letter_of, dtype=torch.int64, device=out_device),
        eos_token_ids=eos_ids, vocab_size=vocab_size,
        quirks=quirks_for(getattr(config, "model_type", None)),
    )
