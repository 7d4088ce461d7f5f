"""The embedded demo: a procedurally generated shapes VQA set and a shipped tiny LLaVA.

``demo_model_dir()`` is the trained checkpoint shipped in the package (it loads with the
Auto classes like any local checkpoint); ``get_demo()`` returns it with the evaluation data,
which is rendered from the seed on first use. Nothing trains unless asked to:
:func:`mllmcal.demo.train.retrain` (``mllmcal demo --retrain``) reruns the recipe
(:data:`mllmcal.demo.train.RECIPE`) that made the shipped checkpoint.
"""

from .assets import default_cache_root, demo_data_dir, demo_model_dir, get_demo
from .shapes import build_dataset, make_item, render_scene

__all__ = [
    "build_dataset",
    "default_cache_root",
    "demo_data_dir",
    "demo_model_dir",
    "get_demo",
    "make_item",
    "render_scene",
]
