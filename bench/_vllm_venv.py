"""Shared by the benches that drive the vLLM CPU engine: run the bench in .venv-vllm."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VPY = ROOT / ".venv-vllm" / "bin" / "python"
TORCHVISION = ROOT / ".venv-vllm" / "torchvision-cpu"


def run_with_vllm(main, *, torchvision: bool = False) -> None:
    """Call ``main()`` where vLLM imports; elsewhere re-execute this script with .venv-vllm's
    Python (with the repository, and with ``torchvision`` its CPU torchvision, on PYTHONPATH)."""
    try:
        from vllm import LLM  # noqa: F401
    except ImportError:
        if not VPY.exists():
            sys.exit(f"no vLLM here and no {VPY}: run `bash scripts/setup_vllm.sh` first")
        paths = [str(ROOT), *([str(TORCHVISION)] if torchvision else [])]
        paths.append(os.environ.get("PYTHONPATH", ""))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
        os.execve(str(VPY), [str(VPY), *sys.argv], env)
    main()
