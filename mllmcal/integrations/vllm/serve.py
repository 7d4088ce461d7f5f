"""``mllmcal serve MODEL [vLLM's own arguments]``: vLLM's OpenAI server with mllmcal on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

__all__ = ["main", "server_command"]

PROCESSOR = "mllmcal.integrations.vllm:CalibratedLogitsProcessor"
MIDDLEWARE = "mllmcal.integrations.vllm.middleware.StatsMiddleware"

HELP = f"""usage: mllmcal serve MODEL [vLLM's own arguments]

Starts vLLM's OpenAI-compatible server (python -m vllm.entrypoints.openai.api_server; every
argument after MODEL goes to it unchanged, --api-key, --host and --port included) with:

  --logits-processors {PROCESSOR}
      per-token confidence, entropy and log-probs in the engine (MLLMCAL_VLLM=1);
  --middleware {MIDDLEWARE}
      a request with "vllm_xargs": {{"mllmcal": 1}} gets them in its response, per choice
      under "mllmcal" (streaming: in the last chunk); POST /v1/mllmcal/feedback takes
      {{"id": ..., "label": ...}} / {{"id": ..., "correct": ...}}, behind --api-key;
  MLLMCAL_VLLM_CHANNEL
      a Unix-domain socket in a private temporary folder that brings the engine's values
      to the server;
  MLLMCAL_VLLM_FEEDBACK, PROMETHEUS_MULTIPROC_DIR
      a feedback file and a metrics folder in that temporary folder unless already set
      (the mllmcal_* metrics then show at /metrics);
  MLLMCAL_VLLM_FLUSH_INTERVAL=0.05 unless set (the engine drains every 10 ms while
      requests wait for their statistics).

Other MLLMCAL_VLLM_* settings (MLLMCAL_VLLM_RECORDS, ...) are read from the environment
as usual. Requests may also stop early: "vllm_xargs": {{"mllmcal_stop_below": 0.3,
"mllmcal_stop_window": 16}}.
"""


def _api_keys(args: list[str]) -> list[str]:
    keys = []
    for i, a in enumerate(args):
        if a == "--api-key" and i + 1 < len(args):
            keys.append(args[i + 1])
        elif a.startswith("--api-key="):
            keys.append(a.split("=", 1)[1])
    return keys


def server_command(model: str, args: list[str], workdir: str,
                   env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line and environment ``mllmcal serve`` runs (``workdir``: a private
    folder for the socket, and the feedback file and metrics folder if not set)."""
    env = dict(os.environ if env is None else env)
    env["MLLMCAL_VLLM"] = "1"
    env["MLLMCAL_VLLM_CHANNEL"] = os.path.join(workdir, "channel.sock")
    # Responses wait for the engine's drain: drain often (it is cheap when idle).
    env.setdefault("MLLMCAL_VLLM_FLUSH_INTERVAL", "0.05")
    env.setdefault("MLLMCAL_VLLM_FEEDBACK", os.path.join(workdir, "feedback.jsonl"))
    if "PROMETHEUS_MULTIPROC_DIR" not in env:
        prom = os.path.join(workdir, "prometheus")
        os.makedirs(prom, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = prom
    keys = _api_keys(args)
    if keys:
        env["MLLMCAL_SERVE_API_KEYS"] = json.dumps(keys)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args,
           "--logits-processors", PROCESSOR, "--middleware", MIDDLEWARE]
    return cmd, env


def main(argv: list[str]) -> int:
    """Run the server until it exits (SIGINT/SIGTERM are passed on); its exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        return 0 if argv else 2
    with tempfile.TemporaryDirectory(prefix="mllmcal-serve-") as work:
        os.chmod(work, 0o700)
        cmd, env = server_command(argv[0], argv[1:], work)
        proc = subprocess.Popen(cmd, env=env)

        def forward(sig: int, _frame: object) -> None:
            proc.send_signal(sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, forward)
        return proc.wait()
