"""vLLM integration: calibration statistics computed inside the engine.

``mllmcal.integrations.vllm:CalibratedLogitsProcessor`` is a vLLM logits processor that,
once per engine step, makes one fused :func:`mllmcal.token_stats` call over the batch's
logits (confidence, entropy, logsumexp, argmax of ``logits / T``), and turns the ``[B]``
results into per-request records and Prometheus metrics. By default it only observes: the
logits go back unchanged, nothing of shape ``[B, V]`` is allocated, and nothing waits for
the device (statistics are copied to the host with ``non_blocking=True`` and read
by a background thread once their CUDA event has completed).

Loading it (the same name works with both of vLLM's model runners)::

    LLM(model, logits_processors=[CalibratedLogitsProcessor])        # or its "module:Class" name
    python -m vllm.entrypoints.openai.api_server --model M \\
        --logits-processors mllmcal.integrations.vllm:CalibratedLogitsProcessor

It builds, by the runner's constructor signature, a :class:`V1CalibratedLogitsProcessor`
or a :class:`V2CalibratedLogitsProcessor`; either can also be named directly.

Installing mllmcal as a package also registers it under vLLM's ``vllm.logits_processors``
entry point: every engine in that environment then loads it, and it stays inert unless the
engine's operator asked for it (``MLLMCAL_VLLM=1``, an ``"mllmcal"`` key in
``additional_config``, or the processor named in ``logits_processors``; see
:func:`~.common.requested`). Loaded twice in one engine, only the first instance records.

Which logits it sees
--------------------
* V1 model runner (the CPU backend; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``): it declares
  itself not argmax-invariant, so it runs for every batch, all-greedy ones included, on the
  fp32 logits after the allowed-token mask, bad words and vLLM's built-in min-tokens and
  logit-bias processors, and before penalties and the sampling temperature. Without
  those request options these are the raw logits, the ones vLLM's default
  ``logprobs_mode="raw_logprobs"`` reports.
* Model Runner V2: after the built-in bias, penalty, bad-words and grammar stages, before
  temperature, min-p and top-k/top-p (see vLLM's ``LogitsProcessor`` docstring). V2 calls
  processors only for batches in which some request needs processing; mllmcal accepts
  every request, so in V2 vLLM copies the logits to a new fp32 tensor once per step on
  mllmcal's behalf.

Statistics are of ``logits / T`` with ``T`` the calibration temperature below, not the
sampling temperature. Requests with ``extra_args["mllmcal_apply_temperature"] = True`` (or
all, with ``MLLMCAL_VLLM_APPLY_TEMPERATURE=1``) also *sample* at it: the processor divides
their rows by ``T`` in place after taking its statistics, so vLLM then samples from
``softmax(logits / (T * T_sampling))`` (greedy choices are unchanged; vLLM's returned
``raw_logprobs`` are computed before processors and are unchanged too). In V2 this needs
one row per request (no speculative decoding).

Per request
-----------
Request ids come from ``SamplingParams(extra_args={"mllmcal_id": ...})`` (over HTTP:
``"vllm_xargs": {"mllmcal_id": ...}``), otherwise one is generated. With ``n > 1`` every
sample is its own request in the engine and gets its own record, all with the same id
(vLLM gives the samples their parent's ``extra_args``); feedback by that id then reaches
only the sample that finished last, and a warning says so once. Per generated token the
record has ``confidence``, ``entropy`` (nats) and ``logprob``, the chosen token's
log-probability under ``softmax(logits / T)``:

* exact whenever the chosen token is the argmax of the logits the processor saw (always
  for greedy requests without penalties): then it is ``log(confidence)``;
* exact for sampled requests that opt in with ``extra_args["mllmcal_logprobs"] = True``:
  the processor copies those requests' rows (``[b, V]`` per step, ``b`` the number of
  opted-in requests in the batch: vLLM divides the logits by the sampling temperature in
  place after the processor returns, so keeping a reference is not enough) and reads the
  chosen token's logit once the token is known, at the next step (V1: from the request's
  output-token list; V2: from ``req_states.all_token_ids`` on the device), then drops them;
* otherwise ``null``.

Steps whose row produced no token (a prompt prefilled in chunks, a rejected draft) are
not recorded. Sequence confidences: ``mean_logprob`` and ``min_prob`` (``exp`` of the
smallest log-prob), ``null`` unless every token's log-prob is exact; ``mean_confidence``.

When a request ends. The record is written as soon as the tracker sees the request end:
its committed tokens reach ``max_tokens`` or end with a stop token (``finish`` =
``"length"`` / ``"stop"``), or it left the batch and did not come back within
``MLLMCAL_VLLM_DETACH_TIMEOUT`` seconds (``"removed"``; vLLM also takes out requests it did
not schedule in a step and puts them back later, so leaving is not ending; requests
stopped by a stop *string* or aborted end this way). An in-process engine reuses slots
without a removed event and never signals that the last batch ended, hence the token rule.
In Model Runner V2 a step's tokens are read from the device at the next step, so the
last tokens of an engine that has gone idle are committed at its next step or at shutdown.
Whatever is still open is written when the engine is shut down or the process exits
(``finish`` = ``"flush"``), or on demand with :func:`flush`. A server stopped with SIGTERM
kills its engine process at once unless it was started with ``--shutdown-timeout N``; start
it with that flag to get the last records of requests that were still running.

Records, metrics, configuration
-------------------------------
``MLLMCAL_VLLM_RECORDS=path``: one JSON line per finished request: ``id``, ``n_tokens``,
``token_ids``, ``confidence``, ``entropy``, ``logprob``, ``mean_logprob``, ``min_prob``,
``mean_confidence``, ``temperature``, ``finish``. With tensor parallelism only TP rank 0
of the last pipeline stage writes.

Prometheus (``prometheus_client``), created once per process: histograms
``mllmcal_token_confidence`` and ``mllmcal_token_entropy`` (``_count`` = generated tokens),
counters ``mllmcal_requests_total`` and ``mllmcal_feedback_total``, gauges ``mllmcal_ece``,
``mllmcal_accuracy`` and ``mllmcal_temperature``. The processor lives in vLLM's engine
process, not the API server: to see them at the server's ``/metrics``, start it with
``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory (the API server then serves the sum
over processes through ``prometheus_client``'s multiprocess collector; gauges show the most
recent value). ``vllm serve`` with several API servers sets that variable itself.

Environment of the engine process (or ``additional_config={"mllmcal": {...}}`` with the
lower-case names): ``MLLMCAL_VLLM_TEMPERATURE`` (``temperature``, default 1),
``MLLMCAL_VLLM_ONLINE_TEMPERATURE`` (``online_temperature``), ``MLLMCAL_VLLM_FEEDBACK``
(``feedback``), ``MLLMCAL_VLLM_N_BINS`` (``n_bins``), ``MLLMCAL_VLLM_METRICS=0``
(``metrics``), ``MLLMCAL_VLLM_FLUSH_INTERVAL`` (``flush_interval``, seconds, default 0.5),
``MLLMCAL_VLLM_DETACH_TIMEOUT`` (``detach_timeout``, default 60),
``MLLMCAL_VLLM_APPLY_TEMPERATURE=1`` (``apply_temperature``), ``MLLMCAL_VLLM_DISABLE=1``.
Records that cannot be written wait and are retried at every drain (failed attempts:
``mllmcal_records_write_errors_total``).

Stopping early: ``extra_args={"mllmcal_stop_below": x, "mllmcal_stop_window": w}`` forces
the stop token once the mean confidence of the last ``w`` tokens is below ``x`` (V1 runner;
see :meth:`.v1.V1Tracker._stop_low_confidence`); the record's ``finish`` is
``"low_confidence"``.

Statistics in the response
--------------------------
A request whose ``extra_args`` carry ``mllmcal_key`` (a private key: set by the API
server's :mod:`.middleware` for ``"vllm_xargs": {"mllmcal": 1}``, or by :func:`with_stats`
offline) has its per-token values published as they commit (:mod:`.channel`): to the socket
``MLLMCAL_VLLM_CHANNEL`` (``mllmcal serve`` sets it; :func:`listen` serves one offline), or
to this process's store for an in-process engine. :func:`response_stats` reads them for
``LLM.generate``'s outputs. Requests without a key cost nothing more.

Calibration feedback
--------------------
Correctness arrives later than the request, by id. In the engine's process call
:func:`feedback` (``feedback("q17", label=token_id)`` or ``correct=True``); for an engine in
another process (the default ``LLM``, the API server), append JSON lines
``{"id": "q17", "label": 42}`` or ``{"id": "q17", "correct": false}`` to the file named by
``MLLMCAL_VLLM_FEEDBACK``; the engine reads new lines at every drain. Feedback concerns the
token at ``extra_args["mllmcal_feedback_position"]`` (default 0, the answer letter of a
multiple-choice prompt). It feeds a :class:`mllmcal.CalibrationState` (``mllmcal_ece``,
``mllmcal_accuracy``). With ``online_temperature``, feedback that carries the right token
(``label``) for a request that kept its answer row (``extra_args["mllmcal_feedback"] =
True``: one ``[V]`` copy per request, held until its feedback arrives or
``max_awaiting_feedback`` (default 1000) newer requests have finished) also takes a
Newton step of :class:`mllmcal.OnlineTemperature`, whose temperature is then used for the
statistics of later steps (one host sync per feedback item, on the drain thread). Correctness alone never moves the
temperature: the gradient needs the right token's logit, and using only the feedback that
happens to have it would bias ``T``.
"""

from __future__ import annotations

import uuid
from typing import Any

from .channel import LOCAL, listen
from .config import Config
from .feedback_scorer import feedback
from .tracker import Tracker, live_trackers

__all__ = ["CalibratedLogitsProcessor", "Config", "Tracker", "V1CalibratedLogitsProcessor",
           "V2CalibratedLogitsProcessor", "feedback", "flush", "listen", "response_stats",
           "trackers", "with_stats"]


def with_stats(params: Any) -> Any:
    """A copy of ``params`` (a ``SamplingParams``) whose request's statistics
    :func:`response_stats` can return: a fresh private key in its ``extra_args`` (and
    exact log-probs for sampled tokens, ``mllmcal_logprobs``). Use one per prompt."""
    p = params.clone()
    p.extra_args = {**(p.extra_args or {}), "mllmcal_key": uuid.uuid4().hex,
                    "mllmcal_logprobs": True}
    return p


def response_stats(outputs: list[Any], params: list[Any], *,
                   timeout: float = 10.0) -> list[dict[str, Any] | None]:
    """The statistics of each of ``LLM.generate``'s ``outputs``, aligned with its tokens.

    ``params`` are the per-prompt ``SamplingParams`` given to ``generate`` (each from
    :func:`with_stats`). Each item is :func:`.channel.summarize`'s dict for the returned
    tokens, or None if they did not arrive within ``timeout`` seconds. With the engine in its own process (the default), call
    :func:`listen` before creating the ``LLM``; an in-process engine needs nothing. ``n > 1``
    is not supported (the item is an ``{"error": ...}``).
    """
    for t in live_trackers():  # an in-process engine: publish now rather than at its drain
        t.flush()
    res = []
    for out, p in zip(outputs, params, strict=True):
        key = (p.extra_args or {}).get("mllmcal_key")
        if key is None:
            raise ValueError("these SamplingParams carry no mllmcal_key: make them with "
                             "mllmcal.integrations.vllm.with_stats(params)")
        res.append(LOCAL.take(key, len(out.outputs[0].token_ids), timeout))
    return res


def flush(*, end_active: bool = True) -> int:
    """Write the records of this process's engines now; returns how many were written.

    With ``end_active`` (the default) requests still open are closed too: call it when an
    in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) is idle, e.g. after
    ``LLM.generate`` returned. In a multiprocess engine it has nothing to flush: there the
    engine process writes records as requests finish and at shutdown.
    """
    return sum(t.flush(end_active=end_active) for t in live_trackers())


trackers = live_trackers

_PROCESSORS = ("CalibratedLogitsProcessor", "V1CalibratedLogitsProcessor",
               "V2CalibratedLogitsProcessor")


def __getattr__(name: str) -> Any:
    # The processors subclass vLLM's interfaces, so importing them imports vLLM; keep
    # ``feedback``/``flush`` importable without it.
    if name in _PROCESSORS:
        from . import processor

        return getattr(processor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
