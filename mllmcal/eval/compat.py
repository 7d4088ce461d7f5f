"""Compatibility with transformers releases, quarantined: building a checkpoint's processor
when parts of it need an optional package that is missing (transformers 5's video
processors and torchvision image processors), and naming that package when nothing helps.

Everything here works around a transformers behaviour, each named where it is handled;
the rest of :mod:`mllmcal.eval` calls :func:`load_processor` and knows nothing of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["MissingDependencyError", "load_processor", "missing_package", "processor_class"]

_log = logging.getLogger("mllmcal.eval")


class MissingDependencyError(ImportError):
    """A checkpoint needs an optional package that is missing or does not import."""


_PACKAGE_RE = re.compile(r"requires the (\w+) library|Package `([\w.-]+)` is required", re.I)
# the names transformers' messages use -> the package to install
_PACKAGES = {"torchvision": "torchvision", "pil": "pillow", "pillow": "pillow", "av": "av",
             "decord": "decord", "timm": "timm", "sentencepiece": "sentencepiece",
             "protobuf": "protobuf", "librosa": "librosa", "soundfile": "soundfile"}


def missing_package(exc: BaseException) -> str:
    m = _PACKAGE_RE.search(str(exc))
    if m:
        name = (m.group(1) or m.group(2)).lower()
        return _PACKAGES.get(name, name)
    if "torchvision" in str(exc).lower():
        return "torchvision"
    name = getattr(exc, "name", None)
    return str(name) if name else "an optional package"


def _processor_class_name(path: Path) -> str | None:
    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        name = _read_json(path / fname).get("processor_class")
        if name:
            return str(name)
    return None


def _without_video(cls: type) -> type:
    """``cls`` restricted to its image processor and tokenizer.

    ``ProcessorMixin`` builds and type-checks one sub-processor per name returned by its
    public ``get_attributes()``; dropping ``video_processor`` there lets an image-text
    processor be built when its video part cannot be (transformers 5's video processors
    need torchvision). Image prompts never touch the video processor.
    """

    class ImageOnlyProcessor(cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # some processors (SmolVLM's) take video_processor as a required argument
            kwargs.setdefault("video_processor", None)
            super().__init__(*args, **kwargs)

        @classmethod
        def get_attributes(klass) -> list[str]:
            return [a for a in cls.get_attributes() if a != "video_processor"]

        def apply_chat_template(self, conversation: Any, chat_template: str | None = None,
                                **kwargs: Any) -> Any:
            # Rendering to text is the template alone; the processor's own method also
            # reads video sampling defaults (SmolVLM: video_processor.num_frames) from the
            # part left out. Eval renders with tokenize=False only.
            if kwargs.get("tokenize", False):
                raise NotImplementedError("an image-only processor renders text only")
            return self.tokenizer.apply_chat_template(
                conversation, chat_template=chat_template or self.chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"{cls.__name__}ImageOnly"
    return ImageOnlyProcessor


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _image_processor_modules(class_name: str) -> list[str]:
    """The model modules transformers' auto table lists ``class_name`` under."""
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name
        from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    except ImportError:
        return []
    out = []
    for model_type, names in IMAGE_PROCESSOR_MAPPING_NAMES.items():
        values = names.values() if isinstance(names, dict) else names
        if class_name in {v for v in values if isinstance(v, str)}:
            out.append(model_type_to_module_name(model_type))
    return out


def _pil_image_processor(path: Path, settings: dict[str, Any]) -> Any:
    """The PIL backend of the checkpoint's image processor, imported from its model module.

    transformers 5.17 lists some PIL image processors (Idefics3's) as needing torchvision,
    so ``AutoImageProcessor`` refuses them without it although they need only Pillow.
    """
    import importlib

    model_type = _read_json(path / "config.json").get("model_type", "")
    settings = dict(settings)
    kind = str(settings.pop("image_processor_type", ""))
    base = kind.removesuffix("Pil").removesuffix("ImageProcessor")
    kind = f"{base}ImageProcessorPil"
    # the class lives in its own model's module (InternVL uses GotOcr2's): try the module
    # named after the class (GotOcr2 -> got_ocr2), then the checkpoint's model type, then
    # every module transformers' image-processor table files the class under (Qwen2.5-VL
    # ships "Qwen2VLImageProcessor", which lives in qwen2_vl, not in "qwen2_v_l")
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", base).lower()
    candidates = list(dict.fromkeys([snake, model_type, *_image_processor_modules(kind)]))
    for name in candidates:
        try:
            module = importlib.import_module(f"transformers.models.{name}.image_processing_pil_{name}")
        except ImportError:
            continue
        if hasattr(module, kind):
            return getattr(module, kind)(**settings)
    raise ImportError(f"no PIL image processor {kind} in transformers (checked "
                      f"{', '.join(map(repr, candidates))}); its torchvision one needs the "
                      "package 'torchvision'")


def _processor_by_hand(path: Path, cls: type) -> Any:
    """``cls`` from the checkpoint's files, with only the parts images need."""
    import transformers as tf

    cfg = _read_json(path / "processor_config.json")
    image_cfg = cfg.get("image_processor") or _read_json(path / "preprocessor_config.json")
    try:
        image_processor = tf.AutoImageProcessor.from_pretrained(path)
    except (ImportError, ValueError):
        image_processor = _pil_image_processor(path, image_cfg)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").is_file():
        template = _read_json(path / "chat_template.json").get("chat_template")
    attributes = set(cls.get_attributes())
    kwargs = {k: v for k, v in cfg.items()
              if k not in attributes and k not in ("processor_class", "chat_template")}
    klass = _without_video(cls) if "video_processor" in attributes else cls
    return klass(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                 **kwargs)


def processor_class(name: str) -> type | None:
    """transformers' processor class ``name``, importable without torchvision if it can be.

    transformers 5.17 replaces a processor whose module fails to import without
    torchvision by a placeholder that refuses to be built. Some such modules (Pixtral's,
    used by Mistral 3) import only a helper from their model's torchvision image-processor
    module, which the PIL module defines too (same name, same signature): the module is
    then imported with the PIL module standing in for the torchvision one during the
    import. Returns the placeholder (or ``None``) when that does not help.
    """
    import importlib
    import sys

    import transformers as tf

    cls = getattr(tf, name, None)
    # the placeholder refuses any public attribute; its own dict holds "_backends"
    if cls is None or "_backends" not in vars(cls):
        return cls  # a real class, or no such name
    module = cls.__module__  # transformers.models.<m>.processing_<m>
    package, _, leaf = module.rpartition(".")
    model = leaf.removeprefix("processing_")
    tv_name = f"{package}.image_processing_{model}"
    try:
        pil = importlib.import_module(f"{package}.image_processing_pil_{model}")
    except ImportError:
        return cls
    saved = sys.modules.get(tv_name)
    sys.modules[tv_name] = pil
    try:
        real = getattr(importlib.import_module(module), name, None)
    except ImportError:
        real = None
    finally:
        if saved is None:
            sys.modules.pop(tv_name, None)
        else:
            sys.modules[tv_name] = saved
    return real if real is not None and "_backends" not in vars(real) else cls


_WARNED: set[str] = set()


def load_processor(path: str | os.PathLike, name: str | None = None) -> Any:
    """The checkpoint's processor, without the parts that need a missing optional package.

    ``AutoProcessor`` first. If it fails for a missing package (transformers 5's video
    processors need torchvision, as do its default image processor backends), the
    processor class is built from the image processor (its PIL backend if need be) and
    the tokenizer only, with a warning: image prompts do not use the video part.

    Raises:
        MissingDependencyError: the processor cannot be built without a missing optional
            package; the message names the package and the model.
    """
    import transformers as tf

    path = Path(path)
    name = name or path.name
    try:
        return tf.AutoProcessor.from_pretrained(path)
    except ImportError as exc:
        first: Exception = exc
    except ValueError as exc:
        if "Missing optional dependencies" not in str(exc):
            raise
        first = exc
    pkg = "torchvision" if "torchvision" in str(first).lower() else missing_package(first)
    cls_name = _processor_class_name(path)
    cls = processor_class(cls_name) if cls_name else None
    if cls is not None:
        try:
            proc = _processor_by_hand(path, cls)
        except (ImportError, ValueError, AttributeError, TypeError) as exc:
            # what blocks the image-only build is the package to name now
            if isinstance(exc, ImportError) or "torchvision" not in str(exc).lower():
                pkg = missing_package(exc) if isinstance(exc, ImportError) else pkg
            first = exc
        else:
            if str(path) not in _WARNED:  # once per checkpoint, not per load
                _WARNED.add(str(path))
                _log.warning("model %s: parts of %s need the package %r, which is not usable "
                             "here; built it from its image processor and tokenizer only", name,
                             cls_name, pkg)
            return proc
    msg = str(first).strip().splitlines()[0] if str(first).strip() else repr(first)
    raise MissingDependencyError(
        f"model {name!r} ({path}): its processor {cls_name or '(unknown class)'} needs the "
        f"package {pkg!r}, which is not installed or does not import: {msg}"
    ) from None
