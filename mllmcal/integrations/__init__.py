"""Integrations with model libraries.

``mllmcal.integrations.transformers`` holds the ``transformers`` logits processor and
teacher-forced scoring; ``mllmcal.integrations.vllm`` the vLLM logits processors (one class
per model-runner interface) with their request tracking, records, metrics and feedback.
Both keep answers waiting for correctness feedback in the one book of
:mod:`mllmcal.integrations._feedback`. Each is imported on demand, so ``import mllmcal``
never pulls in ``transformers`` or vLLM.
"""
