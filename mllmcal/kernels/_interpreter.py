"""Triton's CPU interpreter (``TRITON_INTERPRET=1``): detection and the one fix the kernels
need from it. Importing this module (every kernel module does) installs the fix when
:func:`interpreting`, once, before any launch.
"""

from __future__ import annotations

import os

__all__ = ["interpreting", "install_fixes"]


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def install_fixes() -> None:
    """Let ``range(start, stop)`` take runtime scalars under Triton 3.6's interpreter.

    The interpreter holds scalars as 1-element arrays and converts them with
    ``int(array)``, which NumPy >= 2.4 rejects for ndim > 0 ("only 0-dimensional arrays
    can be converted"), so every loop with a runtime bound fails. This re-registers
    ``__index__`` with an explicit element read; compiled kernels are unaffected.
    Idempotent.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_mllmcal_scalar_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._mllmcal_scalar_index = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    install_fixes()
