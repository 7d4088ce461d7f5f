"""Run the README's vLLM example (its ```py blocks) in .venv-vllm and check what it wrote.

    python readme_example.py README.md MODEL_DIR WORK_DIR

The README's ```python blocks run in the main venv (tests/test_readme.py), which has no
vLLM; the vLLM example is fenced as ```py and runs here instead. Prints OK.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path


def main() -> None:
    readme, model, work = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    blocks = re.findall(r"```py\n(.*?)```", readme.read_text(), flags=re.S)
    assert len(blocks) == 1, f"expected one ```py block (the vLLM example), got {len(blocks)}"
    os.chdir(work)
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    ns = {"__name__": "__readme__", "MODEL": model}
    exec(compile(blocks[0], "README.md[py block]", "exec"), ns)
    recs = {r["id"]: r for r in map(json.loads, Path("records.jsonl").read_text().splitlines())}
    assert set(recs) == {"q1", "q2"}, recs.keys()
    for r in recs.values():
        assert r["n_tokens"] == 8 and None not in r["logprob"], r
    stats = ns["stats"]  # response_stats: the records' values, one dict per output
    assert [st["id"] for st in stats] == ["q1", "q2"], stats
    for st in stats:
        r = recs[st["id"]]
        assert st["logprob"] == r["logprob"] and st["token_ids"] == r["token_ids"], (st, r)
    from mllmcal.integrations import vllm as mv

    (tracker,) = mv.trackers()
    assert tracker.n_feedback == 1 and tracker.state.count == 1
    print("OK")


if __name__ == "__main__":
    main()
