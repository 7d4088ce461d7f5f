"""Test scaffolding, never installed: a stand-in for SGLang's ``sgl_kernel``.

``sgl_kernel`` has no CPU wheel (its wheels hold only CUDA libraries). SGLang imports it
to register ``torch.ops.sgl_kernel.*``; with this module, which registers none, SGLang's CPU
engine takes its plain-torch paths. Plain prefill and decode call none of its functions;
speculative decoding and MoE would fail. tests/test_integration_sglang.py puts this folder
on the SGLang engine subprocess's PYTHONPATH only.
"""

__version__ = "0.0.0+mllmcal-test-stub"


def __getattr__(name: str):
    # `from sgl_kernel import f` must succeed at import time; calling f means SGLang took a
    # path that needs the real kernels, which these tests must not reach.
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is a test stand-in (tests/sglang/stubs)")

    missing.__name__ = name
    return missing
