"""ASGI middleware for vLLM's OpenAI server: each request that asks gets mllmcal's
statistics of its own tokens in its own response.

Load it with ``--middleware mllmcal.integrations.vllm.middleware.StatsMiddleware`` (``mllmcal
serve`` does, with the processor and the channel configured). What it does:

* ``POST /v1/completions`` and ``/v1/chat/completions`` whose body has
  ``"vllm_xargs": {"mllmcal": 1}``: it sets ``vllm_xargs["mllmcal_key"]`` to a fresh random
  key (a client-sent one is dropped, so ``mllmcal_id`` stays a label: two clients sending
  the same id get their own numbers) and ``mllmcal_logprobs`` (exact log-probs for sampled
  tokens). The engine publishes that request's per-token values under the key (see
  :mod:`.channel`); the middleware waits until it has as many as the response has tokens
  (``usage.completion_tokens``; up to ``MLLMCAL_VLLM_STATS_TIMEOUT`` seconds, default 30,
  else ``{"error": "timeout", ...}``) and adds ``"mllmcal": {...}`` to each choice (the
  fields of :func:`.channel.summarize`).
* Streaming: chunks pass through as they come; the last chunk (the usage chunk: the
  middleware turns on ``stream_options.include_usage``) carries ``"mllmcal": {"choices":
  [{"index": 0, ...}]}`` with all the values.
* Requests that did not ask go through untouched (one look at the path and a read of the
  body of the two generation endpoints).
* ``POST /v1/mllmcal/feedback`` with ``{"id": ..., "label": ...}`` / ``{"id": ...,
  "correct": ...}`` (or a list of them) appends them to the feedback file
  (``MLLMCAL_VLLM_FEEDBACK``) the engine reads. It needs the server's API key
  (``Authorization: Bearer``) when the server has one (``--api-key``, passed on by
  ``mllmcal serve`` in ``MLLMCAL_SERVE_API_KEYS``, or ``VLLM_API_KEY``).

``n > 1`` is not supported (the choice gets an ``{"error": ...}``). One API server process
(the socket is served by the process that answers).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from .channel import ENV, Store, feed
from .feedback_scorer import parse_feedback

__all__ = ["StatsMiddleware"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_GEN_PATHS = ("/v1/completions", "/v1/chat/completions")
FEEDBACK_PATH = "/v1/mllmcal/feedback"


def _api_keys() -> list[str]:
    keys = json.loads(os.environ.get("MLLMCAL_SERVE_API_KEYS") or "[]")
    if os.environ.get("VLLM_API_KEY"):
        keys.append(os.environ["VLLM_API_KEY"])
    return [k for k in keys if k]


class StatsMiddleware:
    """See the module docstring. ``app`` is the ASGI app it wraps."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app
        self.store = Store()
        self.timeout = float(os.environ.get("MLLMCAL_VLLM_STATS_TIMEOUT", "30"))
        self._server: asyncio.AbstractServer | None = None
        self._news: dict[str, asyncio.Event] = {}  # key -> set when its values arrive
        self._starting: asyncio.Lock | None = None

    async def _serve_channel(self) -> None:
        """Start the socket the engine sends to (first request; idempotent)."""
        path = os.environ.get(ENV)
        if self._server is not None or not path:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._server is not None:
                return
            if os.path.exists(path):
                os.unlink(path)

            async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                try:
                    while line := await reader.readline():
                        key = feed(self.store, line)
                        ev = self._news.get(key) if key is not None else None
                        if ev is not None:
                            ev.set()
                finally:
                    writer.close()

            self._server = await asyncio.start_unix_server(on_conn, path, limit=1 << 24)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if path == FEEDBACK_PATH:
            await self._feedback(scope, receive, send)
            return
        if path not in _GEN_PATHS:
            await self.app(scope, receive, send)
            return
        await self._serve_channel()
        body, more = await _read_body(receive)
        req = None
        if b"mllmcal" in body:  # requests that did not ask are not parsed here
            try:
                req = json.loads(body)
            except ValueError:
                pass
        xargs = req.get("vllm_xargs") if isinstance(req, dict) else None
        if not isinstance(xargs, dict) or not (xargs.get("mllmcal") or "mllmcal_key" in xargs):
            await self.app(scope, _replay(body, more, receive), send)
            return
        xargs.pop("mllmcal_key", None)  # keys are ours, never a client's
        if not xargs.get("mllmcal"):
            await self.app(scope, *_rewritten(scope, req, receive), send)
            return
        key = uuid.uuid4().hex
        xargs["mllmcal_key"] = key
        xargs["mllmcal_logprobs"] = 1
        n = int(req.get("n") or 1)
        stream = bool(req.get("stream"))
        if stream:
            opts = req.get("stream_options") or {}
            req["stream_options"] = {**opts, "include_usage": True}
        scope2, receive2 = _rewritten(scope, req, receive)
        try:
            if stream:
                await self.app(scope2, receive2, _StreamSend(self, send, key, n))
            else:
                await self._whole(scope2, receive2, send, key, n)
        finally:
            self.store.discard(key)

    async def stats_for(self, key: str, n: int, n_tokens: int | None) -> dict[str, Any]:
        """Wait for ``key``'s values without blocking the event loop."""
        if n != 1:
            return {"error": "mllmcal statistics support n = 1 only"}
        deadline = time.monotonic() + self.timeout
        ev = self._news[key] = asyncio.Event()
        try:
            while True:
                ev.clear()
                got = self.store.peek(key, n_tokens)
                if got is not None:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return {"error": "timeout", "n_tokens": n_tokens}
                try:  # woken by the channel; the short cap also covers a missed wake-up
                    await asyncio.wait_for(ev.wait(), min(left, 0.25))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._news.pop(key, None)

    async def _whole(self, scope: Scope, receive: Receive, send: Send, key: str, n: int) -> None:
        start: Message | None = None
        chunks: list[bytes] = []

        async def capture(msg: Message) -> None:
            nonlocal start
            if msg["type"] == "http.response.start":
                start = msg
            elif msg["type"] == "http.response.body":
                chunks.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    await self._finish_whole(start, b"".join(chunks), send, key, n)
            else:
                await send(msg)

        await self.app(scope, receive, capture)

    async def _finish_whole(self, start: Message, body: bytes, send: Send, key: str,
                            n: int) -> None:
        if start is not None and start["status"] == 200:
            try:
                resp = json.loads(body)
                tokens = (resp.get("usage") or {}).get("completion_tokens")
                stats = await self.stats_for(key, n, tokens)
                for ch in resp.get("choices", []):
                    ch["mllmcal"] = stats
                body = json.dumps(resp).encode()
            except ValueError:
                pass
            start = dict(start, headers=_with_length(start["headers"], body))
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _feedback(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = _api_keys()
        if keys:
            auth = dict(scope.get("headers", [])).get(b"authorization", b"").decode()
            got = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not any(hmac.compare_digest(got.encode(), k.encode()) for k in keys):
                await _json(send, 401, {"error": "Unauthorized"})
                return
        body, _ = await _read_body(receive)
        path = os.environ.get("MLLMCAL_VLLM_FEEDBACK")
        if not path:
            await _json(send, 503, {"error": "no feedback file (MLLMCAL_VLLM_FEEDBACK)"})
            return
        try:
            items = json.loads(body)
            items = items if isinstance(items, list) else [items]
            for it in items:
                parse_feedback(it)
        except (ValueError, TypeError, AttributeError) as exc:
            await _json(send, 400, {"error": str(exc)})
            return
        lines = "".join(json.dumps(it) + "\n" for it in items)
        with open(path, "a", encoding="utf-8") as f:  # one write: lines stay whole
            f.write(lines)
        await _json(send, 200, {"accepted": len(items)})


class _StreamSend:
    """Passes a streamed response through, holding the usage chunk until the statistics are
    there and adding them to it."""

    def __init__(self, mw: StatsMiddleware, send: Send, key: str, n: int) -> None:
        self.mw, self.send, self.key, self.n = mw, send, key, n
        self.buf = b""
        self.ok = False

    async def __call__(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.ok = msg["status"] == 200
            await self.send(msg)
            return
        if msg["type"] != "http.response.body" or not self.ok:
            await self.send(msg)
            return
        self.buf += msg.get("body", b"")
        more = msg.get("more_body", False)
        *events, self.buf = self.buf.split(b"\n\n")
        if not more and self.buf:
            events, self.buf = [*events, self.buf], b""
        out = [await self._event(ev) + b"\n\n" for ev in events]
        await self.send({"type": "http.response.body", "body": b"".join(out), "more_body": more})

    async def _event(self, ev: bytes) -> bytes:
        if not ev.startswith(b"data: ") or b'"usage"' not in ev:
            return ev
        try:
            chunk = json.loads(ev[6:])
        except ValueError:
            return ev
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if not usage or chunk.get("choices"):
            return ev
        stats = await self.mw.stats_for(self.key, self.n, usage.get("completion_tokens"))
        chunk["mllmcal"] = {"choices": [{"index": 0, **stats}]}
        return b"data: " + json.dumps(chunk).encode()


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    """The whole request body, and any non-body messages received meanwhile."""
    parts, other = [], []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            other.append(msg)
            break
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    return b"".join(parts), other


def _replay(body: bytes, more: list[Message], receive: Receive) -> Receive:
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return more.pop(0) if more else await receive()

    return again


def _rewritten(scope: Scope, req: dict[str, Any], receive: Receive) -> tuple[Scope, Receive]:
    body = json.dumps(req).encode()
    return dict(scope, headers=_with_length(scope["headers"], body)), _replay(body, [], receive)


def _with_length(headers: list[tuple[bytes, bytes]], body: bytes) -> list[tuple[bytes, bytes]]:
    """``headers`` with the content length of ``body`` (a rewritten request or response)."""
    return [(k, v) for k, v in headers if k.lower() != b"content-length"] + [
        (b"content-length", str(len(body)).encode())]


async def _json(send: Send, status: int, obj: Any) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
