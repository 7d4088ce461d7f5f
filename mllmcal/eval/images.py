"""Image files as the eval hands them to a processor: decoded to files, 8-bit, found.

Images stored as bytes (a Hugging Face ``Image`` feature, decoded base64) are written once
to content-addressed files under ``$MLLMCAL_CACHE/images`` (default ``~/.cache/mllmcal``).
A 16-bit grayscale image (PIL mode ``I;16``, or ``I`` as older Pillow opens a 16-bit PNG)
gets an 8-bit copy (:func:`eight_bit`): PIL's own ``convert("RGB")`` clips such pixels at
255, so the model saw a white picture. :func:`image_like_fields` lets a split whose images
all went unread (``image_path`` where ``image`` was meant) fail at load time instead of
being scored as text only.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["check_image", "eight_bit", "image_like_fields", "materialize_image"]

#: PIL modes of single-channel images with more than 8 bits per pixel, read as 0..65535
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")


def _cache_dir() -> Path:
    return Path(os.environ.get("MLLMCAL_CACHE", Path.home() / ".cache" / "mllmcal")) / "images"


def _write_once(name: str, write: Callable[[Path], object]) -> str:
    """The path of ``name`` in the image cache, written by ``write(tmp)`` unless it is there
    already (to a temporary name, then renamed: a kill leaves no half-written file)."""
    out = _cache_dir() / name
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, out)
    return str(out)


def check_image(path: str) -> None:
    """Raise OSError if ``path`` is not a readable image (checks the file's integrity)."""
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


def materialize_image(value: Any, base: Path) -> Any:
    """An image value as a path: ``bytes`` or ``{"bytes", "path"}`` with bytes go to a
    content-addressed file; a struct's relative ``path`` is taken relative to ``base``;
    anything else (a file name, None) is returned as it is. Raises ValueError for bytes
    that are no image."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, bytes | bytearray):
        data, path = bytes(value), None
    else:
        return value
    if data:
        from PIL import Image

        digest = hashlib.sha256(data).hexdigest()[:24]
        try:
            with Image.open(io.BytesIO(data)) as im:
                ext = (im.format or "png").lower()
        except Exception as exc:  # PIL raises many types for broken bytes
            raise ValueError(f"unreadable image bytes: {exc}") from None
        return _write_once(f"{digest}.{ext}", lambda tmp: tmp.write_bytes(data))
    if path:
        return path if Path(path).is_absolute() else str(base / path)
    return None


def eight_bit(path: str) -> str:
    """``path``, or the path of an 8-bit RGB PNG copy when the image is 16-bit grayscale.

    The copy is content-addressed under ``$MLLMCAL_CACHE/images`` and written once; its
    pixels are ``round(v * 255 / 65535)`` of the original's ``v`` in every channel.
    """
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        if im.mode not in _WIDE_MODES:
            return path
        wide = np.asarray(im, dtype=np.float64)
    gray = np.rint(np.clip(wide, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:24]
    return _write_once(f"{digest}-8bit.png",
                       lambda tmp: Image.fromarray(gray).convert("RGB").save(tmp, format="PNG"))


def _looks_like_image(value: Any) -> bool:
    if isinstance(value, bytes | bytearray):
        return len(value) > 0
    if isinstance(value, dict):
        return bool(value.get("bytes")) or _looks_like_image(value.get("path"))
    if isinstance(value, list | tuple):
        return any(_looks_like_image(v) for v in value)
    return isinstance(value, str) and value.strip().lower().endswith(_IMAGE_SUFFIXES)


def image_like_fields(record: dict, read: tuple[str, ...] = ("image", "images")) -> list[str]:
    """Names of ``record``'s fields, other than those in ``read``, that hold an image: a
    file name with an image suffix, encoded bytes or a ``{"bytes", "path"}`` struct."""
    return [k for k, v in record.items()
            if isinstance(k, str) and k not in read and _looks_like_image(v)]
