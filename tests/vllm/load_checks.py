"""vLLM finds mllmcal's processor by its "module:Class" name and through the entry point
that pyproject.toml registers, in both runners' loaders.

Run from v2_unit.py (one vLLM import for both), or alone: ``python load_checks.py
PYPROJECT``. mllmcal is on that venv's path through a .pth (no installed metadata, so no
entry point): the entry point is checked with a throw-away distribution whose
entry_points.txt holds exactly what pyproject.toml declares. Prints OK.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import tomllib
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

FQCN = "mllmcal.integrations.vllm:CalibratedLogitsProcessor"
GROUP = "vllm.logits_processors"


def v1_rejects_bad_args(logits_processors) -> bool:
    """V1 validates each request against every loaded processor class (plugins included):
    a rejection naming our extra_args shows our class was loaded."""
    validate_logits_processors_parameters(logits_processors, SamplingParams(
        extra_args={"mllmcal_id": "ok", "mllmcal_logprobs": True}))
    try:
        validate_logits_processors_parameters(logits_processors, SamplingParams(
            extra_args={"mllmcal_logprobs": "not a bool"}))
    except VLLMValidationError as exc:
        assert "mllmcal_logprobs" in str(exc), exc
        return True
    return False


def v2_instances(logits_processors) -> list:
    req_states = SimpleNamespace(
        device=torch.device("cpu"), max_num_reqs=4, vocab_size=11,
        all_token_ids=SimpleNamespace(gpu=torch.zeros(4, 8, dtype=torch.int32)),
        prompt_len=SimpleNamespace(np=None), prefill_len=SimpleNamespace(np=None),
        total_len=SimpleNamespace(gpu=torch.zeros(4, dtype=torch.int32)))
    cfg = SimpleNamespace(additional_config={"mllmcal": {"metrics": False}})
    return build_custom_logits_processors(cfg, req_states, False, logits_processors)


def main(pyproject: str) -> None:
    from mllmcal.integrations.vllm import V2CalibratedLogitsProcessor

    eps = tomllib.loads(Path(pyproject).read_text())["project"]["entry-points"][GROUP]
    assert list(eps.values()) == [FQCN], eps

    # By name, before any entry point exists: V1 loads it, V2 instantiates it.
    assert not v1_rejects_bad_args(None), "a processor was loaded with no name given"
    assert v1_rejects_bad_args((FQCN,))
    (proc,) = v2_instances([FQCN])
    assert type(proc) is V2CalibratedLogitsProcessor and proc.runner == "v2"

    # Through the entry point.
    site = Path(tempfile.mkdtemp())
    dist = site / "mllmcal_entrypoint_check-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: mllmcal-entrypoint-check\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        f"[{GROUP}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    sys.path.insert(0, str(site))
    # () rather than None: vLLM caches the classes loaded per argument.
    assert v1_rejects_bad_args(()), "V1 did not load the entry point"
    (proc,) = v2_instances([])
    assert type(proc) is V2CalibratedLogitsProcessor, "V2 did not load the entry point"
    print("OK")


if __name__ == "__main__":
    main()
