"""The embedded demo: a procedurally generated shapes VQA set and a tiny LLaVA model.

``get_demo()`` returns ``(model_dir, data_dir)``, building the data set and training the
model on first use and reusing the cache afterwards; see :mod:`mllmcal.demo.train`.
"""

from .shapes import build_dataset, make_item, render_scene

__all__ = ["build_dataset", "make_item", "render_scene"]
