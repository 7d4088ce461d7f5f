"""Per-token statistics of the requests that asked for them, from the engine to the
process that answers the request.

A request asks with ``extra_args["mllmcal_key"]``: a private key that the API server's
middleware (:mod:`.middleware`) or :func:`with_stats` sets, never the client (the
middleware drops a client-sent one). The engine's tracker publishes, at each drain, the
values its requests committed since the last one, one JSON line per request::

    {"key": ..., "sub": ..., "id": ..., "start": k, "token_ids": [...], "confidence": [...],
     "entropy": [...], "logprob": [...], "temperature": T, "finish": null | "length" | ...}

(``sub`` tells apart the engine requests of one key: the samples of ``n > 1``).
Where they go: with ``MLLMCAL_VLLM_CHANNEL=path`` set in the engine's environment, to the
Unix-domain stream socket at ``path`` (served by the middleware, or by :func:`listen` for an
offline engine in its own process); otherwise into this process's :data:`LOCAL` store (an
in-process engine). Requests without a key cost nothing here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from .records import logprob_summary

__all__ = ["ENV", "LOCAL", "Publisher", "Store", "listen", "summarize"]

ENV = "MLLMCAL_VLLM_CHANNEL"
_log = logging.getLogger("mllmcal")


class _Entry:
    __slots__ = ("subs", "id", "born")

    def __init__(self) -> None:
        self.subs: dict[Any, dict[str, Any]] = {}
        self.id: Any = None
        self.born = time.monotonic()


class Store:
    """Values received per key (thread-safe), kept until taken or ``ttl`` seconds old.

    Args:
        max_keys: keys kept at most; the oldest go first.
        ttl: seconds a key's values are kept if nobody takes them.
    """

    def __init__(self, max_keys: int = 100_000, ttl: float = 600.0) -> None:
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._gone: OrderedDict[str, None] = OrderedDict()  # taken keys: late messages dropped
        self.max_keys, self.ttl = max_keys, ttl

    def put(self, msg: dict[str, Any]) -> None:
        """Add one published message (see the module docstring)."""
        with self._cond:
            if msg["key"] in self._gone:
                return
            e = self._entries.get(msg["key"])
            if e is None:
                entries = self._entries
                e = entries[msg["key"]] = _Entry()
                now = time.monotonic()
                while entries and (len(entries) > self.max_keys
                                   or now - next(iter(entries.values())).born > self.ttl):
                    entries.popitem(last=False)
            e.id = msg.get("id", e.id)
            sub = e.subs.setdefault(msg.get("sub"), {
                "token_ids": [], "confidence": [], "entropy": [], "logprob": [],
                "temperature": None, "finish": None})
            start = int(msg.get("start", len(sub["confidence"])))
            for f in ("token_ids", "confidence", "entropy", "logprob"):
                del sub[f][start:]  # a resent range replaces, never doubles
                sub[f].extend(msg.get(f, ()))
            if msg.get("temperature") is not None:
                sub["temperature"] = msg["temperature"]
            if msg.get("finish"):
                sub["finish"] = msg["finish"]
            self._cond.notify_all()

    def peek(self, key: str, n_tokens: int | None) -> dict[str, Any] | None:
        """The statistics of ``key`` (see :func:`summarize`) once ``n_tokens`` values (None:
        the request's end) have arrived, else None."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or len(e.subs) != 1:
                return None if e is None or not e.subs else {"error": "several engine "
                                                             "requests share this key (n > 1)"}
            (sub,) = e.subs.values()
            have = len(sub["confidence"])
            if (n_tokens is None and not sub["finish"]) or (n_tokens is not None and have < n_tokens):
                return None
            return summarize(sub, n_tokens, e.id)

    def take(self, key: str, n_tokens: int | None, timeout: float) -> dict[str, Any] | None:
        """Wait up to ``timeout`` seconds for :meth:`peek`, then forget ``key``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = self.peek(key, n_tokens)
                left = deadline - time.monotonic()
                if got is not None or left <= 0:
                    self.discard(key)
                    return got
                self._cond.wait(left)

    def discard(self, key: str) -> None:
        """Forget ``key``; messages that still come for it are dropped."""
        with self._lock:
            self._entries.pop(key, None)
            self._gone[key] = None
            while len(self._gone) > self.max_keys:
                self._gone.popitem(last=False)


def summarize(sub: dict[str, Any], n_tokens: int | None, label: Any = None) -> dict[str, Any]:
    """The response statistics of one request: its first ``n_tokens`` tokens' ``confidence``,
    ``entropy``, ``logprob``, ``mean_logprob``, ``min_prob`` (:func:`.records.logprob_summary`),
    ``temperature`` (the calibration temperature of the statistics), ``finish`` (mllmcal's
    reason: ``"low_confidence"`` for a forced stop; None if the engine has not seen the end
    yet) and ``id`` (the request's ``mllmcal_id``, a label)."""
    n = len(sub["confidence"]) if n_tokens is None else n_tokens
    lps = sub["logprob"][:n]
    return {
        "id": label,
        "token_ids": sub["token_ids"][:n],
        "confidence": sub["confidence"][:n],
        "entropy": sub["entropy"][:n],
        "logprob": lps,
        **logprob_summary(lps, n),
        "temperature": sub["temperature"],
        "finish": sub["finish"],
    }


LOCAL = Store()
"""Where an in-process engine's tracker puts the values (no ``MLLMCAL_VLLM_CHANNEL``)."""


class Publisher:
    """The engine side: sends messages to the socket named by ``MLLMCAL_VLLM_CHANNEL``, or
    puts them in :data:`LOCAL`. Called from the tracker's drain thread only."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path if path is not None else (os.environ.get(ENV) or None)
        self._sock: socket.socket | None = None
        self._warned = False
        self._lock = threading.Lock()  # a flush() in another thread may send too
        self.n_lost = 0

    def send(self, msgs: list[dict[str, Any]]) -> None:
        if not msgs:
            return
        if self.path is None:
            for m in msgs:
                LOCAL.put(m)
            return
        data = b"".join(json.dumps(m, allow_nan=False).encode() + b"\n" for m in msgs)
        with self._lock:
            self._send(data, len(msgs))

    def _send(self, data: bytes, n: int) -> None:
        for attempt in (0, 1):  # one reconnect: the listener may have restarted
            try:
                if self._sock is None:
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(5.0)
                    s.connect(self.path)
                    self._sock = s
                self._sock.sendall(data)
                return
            except OSError as exc:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                if attempt:
                    self.n_lost += n
                    if not self._warned:
                        self._warned = True
                        _log.warning("mllmcal: cannot send response statistics to %s (%s); "
                                     "their requests get an error marker. Said once.",
                                     self.path, exc)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def feed(store: Store, line: bytes) -> str | None:
    """Put one received JSON line into ``store``; returns its key (a bad line is logged and
    skipped: None)."""
    try:
        msg = json.loads(line)
        if isinstance(msg, dict) and "key" in msg:
            store.put(msg)
            return str(msg["key"])
    except ValueError:
        _log.warning("mllmcal: bad statistics message %r", line[:200])
    return None


def listen(path: str | None = None) -> str:
    """Receive the statistics of an engine in another process (the default ``LLM``) in this
    one: starts a daemon thread serving a Unix-domain socket, feeding :data:`LOCAL`, and
    sets ``MLLMCAL_VLLM_CHANNEL`` so that engines started afterwards send to it. Call it
    before creating the ``LLM``; returns the socket's path (idempotent)."""
    global _listening
    if _listening is not None:
        return _listening
    import tempfile

    path = path or os.path.join(tempfile.mkdtemp(prefix="mllmcal-"), f"{uuid.uuid4().hex[:8]}.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)

    def conn_loop(c: socket.socket) -> None:
        buf = b""
        with c:
            while chunk := c.recv(1 << 16):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    feed(LOCAL, line)

    def accept_loop() -> None:
        while True:
            c, _ = srv.accept()
            threading.Thread(target=conn_loop, args=(c,), daemon=True).start()

    threading.Thread(target=accept_loop, name="mllmcal-channel", daemon=True).start()
    os.environ[ENV] = path
    _listening = path
    return path


_listening: str | None = None
