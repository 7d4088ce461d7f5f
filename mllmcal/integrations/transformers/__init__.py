"""``transformers`` integration, one module per job:

* :mod:`.processor` -- :class:`CalibratedLogitsProcessor`, per-token confidence and exact
  generated-token log-probabilities during ``generate`` (public API only);
* :mod:`.runs` -- :class:`GenerationRun`, the explicit scope of one ``generate`` call
  (``with proc.run(request_ids=...) as run:``) and its results;
* :mod:`.feedback` -- delayed correctness feedback per request (the feedback book shared
  with the vLLM integration, :mod:`mllmcal.integrations._feedback`) and token-level
  monitoring;
* :mod:`.answers` -- :class:`StopAtAnswer`, a stopping criterion that ends each row at its
  first answer token (e.g. an option letter) and keeps that step's confidence;
* :mod:`.scoring` -- :func:`score_tokens`, teacher-forced calibration over a corpus.
"""

from .._feedback import SEQUENCE_CONFIDENCE_KINDS, sequence_scores
from .answers import StopAtAnswer
from .feedback import FeedbackMonitor
from .processor import CalibratedLogitsProcessor
from .runs import GenerationRun
from .scoring import iter_score_tokens, score_tokens

__all__ = [
    "CalibratedLogitsProcessor",
    "FeedbackMonitor",
    "GenerationRun",
    "SEQUENCE_CONFIDENCE_KINDS",
    "StopAtAnswer",
    "iter_score_tokens",
    "score_tokens",
    "sequence_scores",
]
