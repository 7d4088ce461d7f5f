"""Agreement table: `mllmcal eval` on each image-text architecture.

For every architecture of ``tests/checkpoints.py`` (tiny random weights, each saved in
its shipped format and loaded by path): score N image items and N text-only items with
:func:`mllmcal.eval.confidence.score_items`, rebuild every answered item's inputs by hand
(``manual_inputs``, the same helper the tests use), decode greedily with the model's own
``generate`` (no mllmcal), check that the first token that is one of the item's letters
comes at the step the eval recorded, and compare the recorded confidence with that
step's float64 probability.

Prints a markdown table and writes ``bench/results/eval_architectures.json``. Not a timing
benchmark: it measures agreement. Run from the repository root::

    PYTHONPATH=$PWD python bench/eval_architectures.py [--n 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import transformers as tf
    from checkpoints import BUILDERS, TEXT_BUILDERS, manual_inputs
    from PIL import Image

    from mllmcal.eval.confidence import score_items
    from mllmcal.eval.data import Item
    from mllmcal.eval.models import load_model
    from mllmcal.prompting import format_question

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="items per modality")
    args = ap.parse_args()
    tf.logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp())
    colours = ["red", "blue", "green", "yellow"]
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(args.n):
        p = tmp / f"{i}.png"
        w, h = (int(x) for x in torch.randint(8, 40, (2,), generator=g))
        Image.new("RGB", (w, h), tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))).save(p)
        items.append(Item(f"q{i}", "What colour is the shape in the picture?",
                          tuple(colours[: 2 + i % 3]), "ABCD"[i % 2], str(p)))
    texts = [format_question("What colour is the shape in the picture?", colours)]
    rows = []
    for name, build in {**BUILDERS, **TEXT_BUILDERS}.items():
        path = build(tmp / name, texts)
        row = {"architecture": name, "works": False}
        try:
            em = load_model(str(path))
            auto = tf.AutoModelForImageTextToText if em.multimodal else tf.AutoModelForCausalLM
            model = auto.from_pretrained(path).eval()
            worst, n_cmp, n_img_tokens, n_answered = 0.0, 0, [], 0
            for with_image in ((True, False) if em.multimodal else (False,)):
                recs = [r for b in score_items(em, items, with_image=with_image, batch_size=8)
                        for r in b.records]
                for it, rec in zip(items, recs, strict=True):
                    if rec["pred"] is None:
                        continue
                    n_answered += 1
                    text = em.render(it, with_image=with_image)
                    if em.multimodal:
                        with Image.open(it.image) as im:
                            image = im.convert("RGB") if with_image else None
                        inputs = manual_inputs(name, path, text, image)
                    else:
                        special = not (em.tokenizer.bos_token and text.startswith(em.tokenizer.bos_token))
                        inputs = em.tokenizer(text, return_tensors="pt", add_special_tokens=special)
                    if with_image:
                        n_img_tokens.append(int((inputs["input_ids"] == model.config.image_token_id).sum()))
                    with torch.no_grad():  # greedy by the model's own generate
                        out = model.generate(**inputs, max_new_tokens=rec["step"] + 1,
                                             do_sample=False, output_logits=True,
                                             return_dict_in_generate=True, eos_token_id=None,
                                             pad_token_id=em.tokenizer.pad_token_id)
                    gen = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
                    letters = [int(em.letter_of_token[t]) for t in gen]
                    first = next(k for k, x in enumerate(letters) if 0 <= x < len(it.options))
                    if first != rec["step"]:
                        raise AssertionError(f"{it.id}: first letter at step {first}, eval says {rec['step']}")
                    probs = out.logits[first][0].double().softmax(-1)
                    worst = max(worst, abs(float(probs.max()) - rec["confidence"]))
                    n_cmp += 1
            row.update(works=True, image_tokens=(f"{min(n_img_tokens)}-{max(n_img_tokens)}"
                                                 if n_img_tokens and min(n_img_tokens) != max(n_img_tokens)
                                                 else (n_img_tokens[0] if n_img_tokens else "n/a (text)")),
                       answered=n_answered, compared=n_cmp, max_abs_diff=worst)
        except Exception as exc:  # the table reports failures instead of stopping
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    print("| architecture | works | image tokens seen | items compared | max abs diff vs manual greedy |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if r["works"]:
            print(f"| {r['architecture']} | yes | {r['image_tokens']} | {r['compared']} / "
                  f"{r['answered']} answered | {r['max_abs_diff']:.2e} |")
        else:
            print(f"| {r['architecture']} | no: {r['error']} | | | |")
    out = ROOT / "bench" / "results" / "eval_architectures.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"n_items": args.n, "transformers": tf.__version__,
                               "rows": rows}, indent=2))
    return 0 if all(r["works"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
