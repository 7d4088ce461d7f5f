"""The ``>>>`` examples in docstrings are tests: each listed module's examples run here."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "mllmcal.ops",
    "mllmcal.integrations.transformers.processor",
    "mllmcal.integrations.transformers.feedback",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
