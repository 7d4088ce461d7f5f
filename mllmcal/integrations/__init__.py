"""Integrations with model libraries.

``mllmcal.integrations.transformers`` holds the ``transformers`` logits processor and
teacher-forced scoring. It is imported on demand, so ``import mllmcal`` never pulls in
``transformers``.
"""
