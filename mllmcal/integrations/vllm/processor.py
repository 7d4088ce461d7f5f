"""``CalibratedLogitsProcessor``: the one loading name for both of vLLM's model runners.

vLLM checks a processor class it loads by name with ``issubclass`` against the abstract
``LogitsProcessor`` of the engine's runner, and builds it with that runner's signature. An
entry point names one class for both runners, so the name must pass both checks:
:class:`CalibratedLogitsProcessor` implements neither interface, it is registered as a
virtual subclass of both abstract bases (``ABCMeta.register``, no code inherited) and
selects the class to build.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor

from .common import ProcessorCore, check_extra_args
from .v1 import V1CalibratedLogitsProcessor

try:  # Model Runner V2's interface (vLLM >= 0.25)
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

    from .v2 import V2CalibratedLogitsProcessor
except ImportError:  # an older vLLM: V1 only
    V2LogitsProcessor = None
    V2CalibratedLogitsProcessor = None

__all__ = ["CalibratedLogitsProcessor", "V1CalibratedLogitsProcessor",
           "V2CalibratedLogitsProcessor"]


class CalibratedLogitsProcessor:
    """Per-token confidence, entropy and exact token log-probabilities inside vLLM.

    Load it with ``LLM(..., logits_processors=[CalibratedLogitsProcessor])``, the server's
    ``--logits-processors mllmcal.integrations.vllm:CalibratedLogitsProcessor`` or the
    ``vllm.logits_processors`` entry point that installing mllmcal registers. See
    :mod:`mllmcal.integrations.vllm` for what it records and how to configure it.

    ``CalibratedLogitsProcessor(vllm_config, device, is_pin_memory)`` (V1's signature)
    returns a :class:`V1CalibratedLogitsProcessor`; ``CalibratedLogitsProcessor(vllm_config,
    req_states)`` (Model Runner V2's) returns a :class:`V2CalibratedLogitsProcessor`.
    Where the runner is known, either class can be given to vLLM directly.
    """

    def __new__(cls, vllm_config: Any, *args: Any, **kwargs: Any) -> ProcessorCore:
        v2 = "req_states" in kwargs or (len(args) == 1 and not kwargs)
        if v2 and V2CalibratedLogitsProcessor is not None:
            return V2CalibratedLogitsProcessor(vllm_config, *args, **kwargs)
        return V1CalibratedLogitsProcessor(vllm_config, *args, **kwargs)

    # Both runners' loaders call this on the class they loaded.
    validate_params = staticmethod(check_extra_args)


V1LogitsProcessor.register(CalibratedLogitsProcessor)
if V2LogitsProcessor is not None:
    V2LogitsProcessor.register(CalibratedLogitsProcessor)
