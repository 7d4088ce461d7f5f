"""APE-style iterative prompt optimisation of the answer prefix (Chen et al., COLING 2025).

The prompt's answer prefix ("Answer" in ``Answer: (``) is rewritten. Starting from seed
prompts, each round paraphrases each of the current top-k prompts m times with a
*proposer*, scores every new candidate on a dev split, and keeps the top k of everything
seen. Ranking is by accuracy bucket ``floor(acc / 0.2)`` (higher first), then by ECE
(lower first), then by the text (so ties are deterministic).

Proposers (``make_proposer``):

* ``"bank"`` (default): an offline paraphrase bank -- word substitutions and framings,
  deterministic per (prompt, round);
* a local causal LM, given by a checkpoint directory, asked to paraphrase greedily;
* an OpenAI-compatible chat endpoint, given by URL (``.../v1``), called with ``urllib``;
  the key comes from ``OPENAI_API_KEY`` if set.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

__all__ = ["SEED_PROMPTS", "Proposer", "BankProposer", "LocalLMProposer", "OpenAIProposer",
           "make_proposer", "check_proposer", "rank_key", "optimize_prompts", "APEResult"]

SEED_PROMPTS = ("Answer", "The answer might be", "The answer must be")

Score = tuple[float, float]  # (accuracy, ece) on the dev split


class Proposer(Protocol):
    def propose(self, prompt: str, m: int, round_index: int) -> list[str]:
        """Up to ``m`` paraphrases of ``prompt`` (may repeat or include ``prompt``)."""


def clean_prompt(text: str) -> str:
    """One line, no quotes, no trailing ``:``/``(`` (the template adds ``: (``)."""
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(paraphrase|rewritten|new prompt)\s*\d*\s*[:.)-]\s*", "", line.strip(), flags=re.I)
    for _ in range(2):  # quotes and the template's ": (" may wrap each other
        line = re.sub(r"[\s:(]+$", "", line.strip().strip("\"'`*").strip())
    return re.sub(r"\s+", " ", line)[:100]


class BankProposer:
    """Offline paraphrases from a fixed bank of substitutions and framings."""

    SUBSTITUTIONS: dict[str, tuple[str, ...]] = {
        "answer": ("answer", "correct answer", "right option", "best choice", "correct option",
                   "most likely answer"),
        "might": ("might", "may", "could", "is likely to"),
        "must": ("must", "should", "has to", "will"),
        "is": ("is", "would be", "seems to be", "is probably"),
        "the": ("the", "my", "our"),
    }
    FRAMES = ("{p}", "I think {l}", "Most likely, {l}", "Based on the image, {l}",
              "After careful thought, {l}", "Honestly, {l}", "{p}, if unsure pick the closest one")

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def propose(self, prompt: str, m: int, round_index: int) -> list[str]:
        rng = random.Random(zlib.crc32(f"{self.seed}|{round_index}|{prompt}".encode()))
        out: list[str] = []
        for _ in range(8 * m):
            if len(out) >= m:
                break
            words = []
            for w in prompt.split():
                alts = self.SUBSTITUTIONS.get(w.lower())
                if alts and rng.random() < 0.6:
                    w = rng.choice(alts)
                words.append(w)
            p = " ".join(words)
            if rng.random() < 0.4:
                p = rng.choice(self.FRAMES).format(p=p, l=p[:1].lower() + p[1:])
            p = clean_prompt(p[:1].upper() + p[1:])
            if p and p != prompt and p not in out:
                out.append(p)
        return out


_META_PROMPT = (
    "Rewrite the following phrase that introduces the answer to a multiple-choice question. "
    "Keep its meaning, reply with the new phrase only.\nPhrase: {p}\nNew phrase:"
)


class LocalLMProposer:
    """Paraphrases from a local causal LM checkpoint directory (greedy, then sampled)."""

    def __init__(self, path: str, device: str = "cpu", max_new_tokens: int = 24) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.device = device
        self.max_new_tokens = max_new_tokens

    def propose(self, prompt: str, m: int, round_index: int) -> list[str]:
        import torch

        enc = self.tokenizer(_META_PROMPT.format(p=prompt), return_tensors="pt").to(self.device)
        torch.manual_seed(zlib.crc32(f"{round_index}|{prompt}".encode()))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(**enc, do_sample=True, top_p=0.95, temperature=1.0,
                                      num_return_sequences=m, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=pad)
        texts = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
        return [p for p in dict.fromkeys(clean_prompt(t) for t in texts) if p]


class OpenAIProposer:
    """Paraphrases from an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(self, url: str, model: str = "gpt-4o-mini", api_key: str | None = None,
                 timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout

    def propose(self, prompt: str, m: int, round_index: int) -> list[str]:
        body = {
            "model": self.model, "n": m, "temperature": 1.0,
            "messages": [{"role": "user", "content": _META_PROMPT.format(p=prompt)}],
        }
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read().decode())
        except Exception as exc:
            raise RuntimeError(f"proposer endpoint {self.url} failed: {exc}") from exc
        texts = [c.get("message", {}).get("content", "") for c in data.get("choices", [])]
        return [p for p in dict.fromkeys(clean_prompt(t) for t in texts) if p]


def make_proposer(spec: str = "bank", device: str = "cpu", seed: int = 0,
                  model: str = "gpt-4o-mini") -> Proposer:
    """``"bank"``, an ``http(s)://`` URL (OpenAI-compatible), or a local checkpoint dir."""
    if spec == "bank":
        return BankProposer(seed)
    if spec.startswith(("http://", "https://")):
        return OpenAIProposer(spec, model=model)
    if os.path.isdir(spec):
        return LocalLMProposer(spec, device=device)
    raise ValueError(f"proposer must be 'bank', an http(s) URL or a checkpoint directory, got {spec!r}")


def check_proposer(spec: str, timeout: float = 10.0) -> None:
    """Raise ValueError unless :func:`make_proposer` can use ``spec``, without loading a
    model or proposing anything: ``"bank"``; a URL whose server answers within ``timeout``
    seconds (any HTTP status counts: the check is that something listens there, through the
    same ``urllib`` opener, proxies included, that the proposals use); an existing
    directory. Called before any scoring, so that a wrong proposer fails in seconds, not
    after the test and calib splits are scored."""
    if spec == "bank":
        return
    if spec.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(urllib.request.Request(spec, method="GET"),
                                        timeout=timeout):
                pass
        except urllib.error.HTTPError:
            return  # the server answered (a 404 or 401 on the base URL is fine)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ValueError(f"--proposer {spec}: cannot reach the endpoint ({reason})") from None
        return
    if not os.path.isdir(spec):
        raise ValueError(f"proposer must be 'bank', an http(s) URL or a checkpoint directory, "
                         f"got {spec!r}")


def rank_key(prompt: str, score: Score) -> tuple[int, float, str]:
    """Sort key: accuracy bucket floor(acc/0.2) descending, then ECE, then text."""
    acc, ece = score
    bucket = math.floor(round(acc / 0.2, 9))  # round: 0.6/0.2 is 2.9999999999999996
    return (-bucket, ece if ece == ece else math.inf, prompt)


@dataclass
class APEResult:
    """Best prompt, the per-round trajectory and every scored candidate."""

    best: str
    seed: str
    scores: dict[str, Score]
    trajectory: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "best_prompt": self.best, "seed_prompt": self.seed,
            "dev": {p: {"accuracy": a, "ece": e} for p, (a, e) in self.scores.items()},
            "trajectory": self.trajectory,
        }


def optimize_prompts(score: Callable[[str], Score], proposer: Proposer,
                     seeds: Sequence[str] = SEED_PROMPTS, k: int = 5, m: int = 5,
                     n_rounds: int = 10, progress: bool = True,
                     broadcast: Callable[[Any], Any] | None = None) -> APEResult:
    """Run the APE loop; ``score(prompt) -> (accuracy, ece)`` on the dev split.

    ``broadcast`` (distributed runs) makes every rank use rank 0's proposals, so that a
    sampling proposer cannot make ranks diverge. Round 0 is the seeds alone.
    """
    if k < 1 or m < 1 or n_rounds < 0:
        raise ValueError(f"need k >= 1, m >= 1, n_rounds >= 0; got k={k}, m={m}, n_rounds={n_rounds}")
    seeds = [clean_prompt(s) for s in seeds]
    if not seeds or not all(seeds):
        raise ValueError("at least one non-empty seed prompt is needed")
    scores: dict[str, Score] = {}
    bar = tqdm(total=n_rounds + 1, desc="prompt optimisation", disable=not progress)

    def evaluate(prompts: Sequence[str]) -> None:
        for p in prompts:
            if p not in scores:
                scores[p] = score(p)

    def top() -> list[str]:
        return sorted(scores, key=lambda p: rank_key(p, scores[p]))[:k]

    def log(round_index: int, n_new: int) -> None:
        best = top()[0]
        trajectory.append({"round": round_index, "best_prompt": best,
                           "accuracy": scores[best][0], "ece": scores[best][1],
                           "top_k": top(), "n_new": n_new, "n_scored": len(scores)})
        bar.update(1)
        bar.set_postfix(acc=f"{scores[best][0]:.3f}", ece=f"{scores[best][1]:.3f}")

    trajectory: list[dict[str, Any]] = []
    evaluate(seeds)
    log(0, len(set(seeds)))
    for r in range(1, n_rounds + 1):
        proposals: list[str] = []
        for p in top():
            proposals += proposer.propose(p, m, r)[:m]
        if broadcast is not None:
            proposals = broadcast(proposals)
        new = [p for p in dict.fromkeys(proposals) if p and p not in scores]
        evaluate(new)
        log(r, len(new))
    bar.close()
    return APEResult(best=top()[0], seed=seeds[0], scores=scores, trajectory=trajectory)
