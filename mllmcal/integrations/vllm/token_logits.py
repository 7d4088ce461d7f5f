"""Opt-in per-step logits of chosen token ids, kept by the V1 processor for one request.

A request asks with ``SamplingParams(extra_args={...})``:

* ``"mllmcal_logits_ids"``: a list of token ids (their logits at every generated step), or
  ``"all"`` (the whole ``[V]`` row at every step);
* ``"mllmcal_logits_last": True``: keep only the row of the latest step (what the request
  ends on, e.g. its answer letter when the letters are its stop tokens): ``O(W)`` memory
  per request instead of ``O(steps·W)``.

The logits are the ones the processor sees (see :mod:`mllmcal.integrations.vllm`: on the
V1 runner, before penalties and the sampling temperature; the raw logits for a request
without bias, bad words or min-tokens), in fp32, unscaled by the calibration temperature.
They are gathered on the device in the engine thread with one indexing op per group of
requests that ask for the same ids: no host sync, no Python per vocabulary entry.

The request's record (``MLLMCAL_VLLM_RECORDS``) then has ``"token_logits"``: ``{"ids":
[...] | "all", "steps": [k...], "shape": [n, W], "b64": ...}``, the rows of output tokens
``steps`` as little-endian float32 in base64 (exact, and a quarter of the size of JSON
numbers). :func:`token_logits` reads them back; :class:`RecordsReader` collects the records
of given request ids from the file, offline, as the engine writes them.

Only the V1 model runner (the CPU backend; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) keeps
them; on Model Runner V2 the record has no ``token_logits``.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["IDS_KEY", "LAST_KEY", "LogitsWanted", "RecordsReader", "check_logits_args",
           "keep_token_logits", "token_logits", "token_logits_field", "wanted_logits"]

IDS_KEY = "mllmcal_logits_ids"
LAST_KEY = "mllmcal_logits_last"


@dataclass
class LogitsWanted:
    """What one request asked for, and the rows kept so far.

    Attributes:
        ids: the token ids, or None for the whole row.
        last: keep only the latest step's row.
        rows: output-token index -> fp32 ``[W]`` row on the logits' device (a later row of
            the same index, as after a prompt prefilled in chunks, replaces the earlier).
    """

    ids: tuple[int, ...] | None
    last: bool = False
    rows: dict[int, torch.Tensor] = field(default_factory=dict)


def check_logits_args(extra: dict[str, Any]) -> None:
    """Reject malformed ``mllmcal_logits_*`` extra_args (called by the loaders' validation)."""
    ids = extra.get(IDS_KEY)
    if ids is not None and ids != "all" and not (
            isinstance(ids, (list, tuple)) and ids
            and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)):
        raise ValueError(f"extra_args[{IDS_KEY!r}] must be 'all' or a non-empty list of token "
                         f"ids >= 0, got {ids!r}")
    if LAST_KEY in extra and extra[LAST_KEY] not in (True, False, 0, 1):
        raise ValueError(f"extra_args[{LAST_KEY!r}] must be true or false, got {extra[LAST_KEY]!r}")


def wanted_logits(extra: dict[str, Any]) -> LogitsWanted | None:
    """The request's :class:`LogitsWanted`, or None when it asked for none."""
    ids = extra.get(IDS_KEY)
    if ids is None:
        return None
    return LogitsWanted(None if ids == "all" else tuple(int(i) for i in ids),
                        bool(extra.get(LAST_KEY, False)))


def keep_token_logits(logits: torch.Tensor, rows: Sequence[int], requests: Sequence[Any],
                      n_tokens: Sequence[int]) -> None:
    """Engine thread, V1: keep the asked-for logits of batch ``rows``.

    Args:
        logits: fp32 ``[B, V]``, the step's logits (not modified).
        rows: batch rows whose request has a ``token_logits`` :class:`LogitsWanted`.
        requests: the request of each batch row.
        n_tokens: each row's output-token index (the token the row produces, if any).
    """
    groups: dict[tuple[int, ...] | None, list[int]] = {}
    n = logits.shape[0]
    for r in rows:
        if r < n:
            groups.setdefault(requests[r].token_logits.ids, []).append(r)
    for ids, rs in groups.items():
        # built on the host, copied without blocking (a device tensor literal would sync)
        ri = torch.tensor(rs, dtype=torch.long).to(logits.device, non_blocking=True)
        if ids is None:
            got = logits.index_select(0, ri).float()
        else:
            ci = torch.tensor(ids, dtype=torch.long).to(logits.device, non_blocking=True)
            got = logits.index_select(0, ri).index_select(1, ci).float()
        if got.device.type == "cuda":
            # to pinned host memory without waiting: the step's statistics event, recorded
            # after this (StepStats.launch_copy), says when it has landed, and a request's
            # record is written only after its last step's statistics are ready
            host = torch.empty(got.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(got, non_blocking=True)
            got = host
        for j, r in enumerate(rs):
            want, k = requests[r].token_logits, n_tokens[r]
            if want.last:
                for old in [i for i in want.rows if i < k]:
                    del want.rows[old]
            want.rows[k] = got[j]


def token_logits_field(req: Any, n_committed: int) -> dict[str, Any]:
    """``{"token_logits": ...}`` for a request that asked, else ``{}`` (drain thread; the
    rows of its committed tokens only; the rows are dropped from the request)."""
    want = getattr(req, "token_logits", None)
    if want is None:
        return {}
    steps = sorted(k for k in want.rows if k < n_committed)
    if steps:
        arr = torch.stack([want.rows[k] for k in steps]).cpu().numpy().astype("<f4")
    else:
        arr = np.zeros((0, 0), dtype="<f4")
    want.rows.clear()
    return {"token_logits": {"ids": "all" if want.ids is None else list(want.ids),
                             "steps": steps, "shape": list(arr.shape),
                             "b64": base64.b64encode(arr.tobytes()).decode("ascii")}}


def token_logits(record: dict[str, Any]) -> tuple[list[int], torch.Tensor]:
    """The kept logits of a record: (output-token indices, fp32 ``[n, W]``).

    Raises:
        KeyError: the record has none (the request did not ask, or ran on Model Runner V2).
    """
    tl = record.get("token_logits")
    if tl is None:
        raise KeyError(f"record {record.get('id')!r} has no token_logits: the request did not "
                       f"set extra_args[{IDS_KEY!r}], or the engine ran Model Runner V2 "
                       "(set VLLM_USE_V2_MODEL_RUNNER=0)")
    buf = base64.b64decode(tl["b64"])
    arr = np.frombuffer(buf, dtype="<f4").reshape(tl["shape"]).copy()
    return list(tl["steps"]), torch.from_numpy(arr)


class RecordsReader:
    """Reads the records of a ``MLLMCAL_VLLM_RECORDS`` file as the engine appends them.

    ``collect(ids)`` returns the records of those request ids, waiting (polling) until all
    are written: an engine writes a request's record from its drain thread shortly after
    the request ends, so ``LLM.generate`` can return before. Lines are read once, from
    where the last call stopped; records of other ids are kept for later calls.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._offset = 0
        self._partial = ""
        self._pending: dict[str, dict[str, Any]] = {}

    def _read_new(self) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            f.seek(self._offset)
            data = f.read()
            self._offset = f.tell()
        lines = (self._partial + data).split("\n")
        self._partial = lines.pop()  # a line still being written
        for line in lines:
            if line.strip():
                rec = json.loads(line)
                # an engine that loads the processor twice (entry point and by name) writes
                # each request twice: the first one counts
                self._pending.setdefault(str(rec["id"]), rec)

    def collect(self, ids: Iterable[str], timeout: float = 120.0,
                poll: float = 0.02) -> dict[str, dict[str, Any]]:
        """The records of ``ids`` (removed from the reader).

        Raises:
            TimeoutError: some were not written within ``timeout`` seconds.
        """
        want = [str(i) for i in ids]
        deadline = time.monotonic() + timeout
        while True:
            self._read_new()
            missing = [i for i in want if i not in self._pending]
            if not missing:
                return {i: self._pending.pop(i) for i in want}
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} vLLM records were not written to "
                                   f"{self.path} within {timeout:.0f} s (first: {missing[0]!r})")
            time.sleep(poll)

    def clear(self) -> None:
        """Empty the file if every record read so far has been collected: for the owner of
        the file, between batches, while its engine is idle (the engine appends, so its next
        record starts the emptied file). Keeps a long run's file from growing."""
        self._read_new()
        if not self._pending and not self._partial and os.path.exists(self.path):
            os.truncate(self.path, 0)
            self._offset = 0
