"""What the engine check scripts (tests/vllm/*_checks.py, tests/sglang/engine_checks.py)
share: a free port, JSON over HTTP, mllmcal's Prometheus samples, polling, JSON-lines
records, and a server subprocess that is up (its /health answers 200) while in use.

Standard library only: the scripts import it in the engines' own venvs (tests/ on sys.path).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def vllm_model_args(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse ``--model DIR --out FILE`` and ``ap``'s own options; build the tiny vLLM Llama
    (tests/checkpoints.py) in DIR."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import checkpoints

    checkpoints.build_vllm_llama(args.model)
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body: dict | list | None = None, *, key: str | None = None,
         timeout: float = 120.0) -> tuple[int, bytes]:
    """GET (no body) or POST ``body`` as JSON, with ``key`` as bearer token; the status and
    raw payload, error statuses included (connection errors raise OSError)."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def post_json(url: str, body: dict, timeout: float = 120.0) -> dict:
    """POST ``body`` and return the decoded answer; RuntimeError on an error status."""
    status, raw = http(url, body, timeout=timeout)
    if status >= 300:
        raise RuntimeError(f"POST {url} {body}: {status} {raw.decode()[:2000]}")
    return json.loads(raw)


def mllmcal_metrics(base: str) -> dict[str, float]:
    """The ``mllmcal_*`` samples of ``{base}/metrics`` by name (labels, if any, included)."""
    vals = {}
    for line in http(f"{base}/metrics", timeout=10)[1].decode().splitlines():
        if line.startswith("mllmcal_"):
            name, value = line.rsplit(" ", 1)
            vals[name] = float(value)
    return vals


def wait_for(fn: Callable, timeout: float, what: str | None = None, every: float = 0.1):
    """Call ``fn`` every ``every`` s until it returns something true, and return that. After
    ``timeout`` s: TimeoutError naming ``what``, or without ``what`` the last false value."""
    deadline = time.monotonic() + timeout
    while not (got := fn()) and time.monotonic() < deadline:
        time.sleep(every)
    if not got and what is not None:
        raise TimeoutError(f"{what} not complete after {timeout} s")
    return got


def jsonl(path: Path) -> list[dict]:
    """The JSON lines of ``path`` (blank lines skipped); [] while it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_records(path: Path, ids: set[str], timeout: float, what: str | None = None,
                 every: float = 0.1) -> list[dict]:
    """The records in ``path`` once every id in ``ids`` has one (or when ``timeout`` s
    have passed: then as :func:`wait_for`)."""
    recs: list[dict] = []

    def complete() -> bool:
        nonlocal recs
        recs = jsonl(path)
        return ids <= {r["id"] for r in recs}

    wait_for(complete, timeout, what, every)
    return recs


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A temporary folder, removed when the block succeeds, kept (and named) when it fails."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    except BaseException:
        print(f"server files kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def served(cmd: list[str], *, log: Path, health_url: str, timeout: float,
           env: dict | None = None, session: bool = True, term_group: bool = True,
           grace: float = 60.0) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` (output to ``log``) and yield it once ``health_url`` answers 200; raise
    with the log's tail if it exits first. On leaving: SIGTERM to its process group
    (``term_group``) or to the server alone, then after ``grace`` s SIGKILL to the group.
    ``session=False`` keeps it in this process group (SIGKILL then goes to the server)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=session)

        def up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n"
                                   + log.read_text()[-6000:])
            try:
                return http(health_url, timeout=2)[0] == 200
            except OSError:
                return False

        try:
            wait_for(up, timeout, "server start", every=0.5)
            yield proc
        finally:
            if proc.poll() is None:
                if term_group:
                    os.killpg(proc.pid, signal.SIGTERM)
                else:
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    if session:
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                    proc.wait()
