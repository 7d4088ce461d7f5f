"""The embedded demo: a procedurally generated shapes VQA set and a tiny LLaVA model.

``get_demo()`` returns ``(model_dir, data_dir)``, building the data set and training the
model on first use and reusing the cache afterwards; see :mod:`mllmcal.demo.train`.
"""

from .shapes import build_dataset, make_item, render_scene
from .train import get_demo, train_demo_model

__all__ = ["build_dataset", "get_demo", "make_item", "render_scene", "train_demo_model"]
