"""``mllmcal eval`` on the image-text architectures people run, as tiny random checkpoints
saved in each one's shipped format (tests/checkpoints.py) and loaded by path.

For each architecture: the image reaches the model (the processor's expanded image
tokens and the pixel values), the recorded confidence equals the letter probability of a
manual forward pass at the answer position, BOS appears exactly once, and the image and
text-only prompts differ only in the image.
"""

import json

import pytest
import torch
import transformers as tf
from checkpoints import BUILDERS, TEXT_BUILDERS, manual_inputs
from PIL import Image

from mllmcal.eval.confidence import score_items
from mllmcal.eval.data import Item
from mllmcal.eval.models import load_model
from mllmcal.prompting import format_question

COLOURS = ["red", "blue", "green", "yellow"]

# image tokens each architecture's processor must expand one 16x16 image into
EXPECTED_IMAGE_TOKENS = {
    "llava-1.5": 16,        # (16/4)^2 CLIP patches, CLS dropped ("default" strategy)
    "qwen2-vl": "grid",     # dynamic resolution: t*h*w patches of 4 px / (2x2 merge)
    "idefics3": 4,          # (16/4)^2 patches / scale_factor^2
    "smolvlm": 4,           # as Idefics3
    "gemma3": 4,            # mm_tokens_per_image
    "paligemma": 16,        # (16/4)^2 SigLIP patches
    "llava-onevision": None,  # anyres: base + tiles + newline tokens, checked > 16 below
    "internvl": "tiles",    # 4 per tile ((16/4)^2 patches, pixel shuffle 0.5), tiles+thumbnail
    "qwen2.5-vl": "grid",   # as Qwen2-VL
    "llava-next": None,     # anyres: base + unpadded tile features + image_newline, > 16
    "mllama": "cross",      # ONE <|image|>; the tiles enter through cross-attention layers
    "qwen3-vl": "grid",     # as Qwen2-VL
    "mistral3": "rows",     # (h/8)*(w/8) [IMG]: 4 px patches, 2x2 merge, over image_sizes
    "glm4v": "grid",        # as Qwen2-VL (its processor expands <|image|>)
}
# what a released template writes into the text-only prompt only (Llama 3.2 Vision: a
# system turn, dated with mllmcal's fixed TEMPLATE_DATE; none next to an image)
TEXT_ONLY_EXTRA = {
    "mllama": "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
              "December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>",
}
# tokens that wrap or mark the image in each format (removed, the rest must be equal)
IMAGE_MARKUP = {"<image>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<fake_token_around_image>", "<global-img>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>", "<img>", "</img>", "<IMG_CONTEXT>",
                "<|image|>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<|begin_of_image|>",
                "<|end_of_image|>"}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    out = []
    for i in range(6):
        p = d / f"{i}.png"
        Image.new("RGB", (12 + 3 * i, 16), (40 * i, 200 - 30 * i, 90)).save(p)
        out.append(Item(f"q{i}", "What colour is the shape in the picture?",
                        tuple(COLOURS[: 3 + i % 2]), "ABCD"[i % 3], str(p)))
    return out


@pytest.fixture(scope="module", params=list(BUILDERS))
def arch(request, tmp_path_factory):
    texts = [format_question("What colour is the shape in the picture?", COLOURS)]
    path = BUILDERS[request.param](tmp_path_factory.mktemp(request.param), texts)
    return request.param, path


def _image(it):
    with Image.open(it.image) as im:
        return im.convert("RGB")


def test_image_reaches_the_model_and_confidence_equals_a_manual_forward_pass(arch, items):
    name, path = arch
    em = load_model(str(path))
    assert em.multimodal and em.use_chat_template == (name != "paligemma")
    model = tf.AutoModelForImageTextToText.from_pretrained(path).eval()
    records = [r for b in score_items(em, items, batch_size=4) for r in b.records]
    assert len(records) == len(items)
    n_answered = 0
    for it, rec in zip(items, records, strict=True):
        text = em.render(it, with_image=True)
        inputs = manual_inputs(name, path, text, _image(it))
        ids = inputs["input_ids"][0]
        image_id = model.config.image_token_id
        n_img = int((ids == image_id).sum())
        want = EXPECTED_IMAGE_TOKENS[name]
        if want == "grid":
            want = int(inputs["image_grid_thw"].prod()) // 4
            assert want >= 2
        elif want == "rows":
            h, w = (int(x) // 8 for x in inputs["image_sizes"][0])
            want = h * w
            assert want >= 1
        elif want == "tiles":
            want = 4 * inputs["pixel_values"].shape[0]
        elif want == "cross":
            want = 1
            _check_cross_attention_inputs(model, inputs, ids, image_id)
        assert n_img == want if want is not None else n_img > 16
        pixels = inputs["pixel_values"]
        assert pixels.is_floating_point() and pixels.abs().sum() > 0
        bos = em.tokenizer.bos_token_id
        if bos is not None:
            assert int((ids == bos).sum()) == 1
        # the tokens eval feeds are the manual ones (left padding removed)
        enc = em.encode([text], [_image(it)])
        assert torch.equal(enc["input_ids"][0], ids)
        with torch.no_grad():
            first = model(**inputs).logits[0, -1].double()
            # greedy continuation by the model's own generate, without mllmcal
            out = model.generate(**inputs, max_new_tokens=20, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=em.tokenizer.pad_token_id, eos_token_id=None)
        assert torch.allclose(out.logits[0][0].double(), first, atol=1e-4)
        # the first generated token that is one of THIS item's letters ("D" is no answer
        # to a 3-option item: the random weights favour every letter A-H)
        want_step = None
        for k, t in enumerate(out.sequences[0, ids.shape[0]:].tolist()):
            if 0 <= int(em.letter_of_token[t]) < len(it.options):
                want_step = k
                break
        if want_step is None:
            assert rec["pred"] is None
            continue
        n_answered += 1
        probs = out.logits[want_step][0].double().softmax(-1)
        top = int(probs.argmax())
        assert rec["step"] == want_step
        assert "ABCDEFGH"[int(em.letter_of_token[top])] == rec["pred"]
        assert rec["confidence"] == pytest.approx(float(probs[top]), rel=1e-4, abs=1e-6)
    assert n_answered >= len(items) // 2, "most items should get a letter"


def _check_cross_attention_inputs(model, inputs, ids, image_id):
    """Mllama: the text holds one <|image|>; every token from it on attends to the image's
    tiles through the cross-attention mask, and the image changes the logits."""
    mask = inputs["cross_attention_mask"]  # [batch, text, images, tiles]
    pos = int((ids == image_id).nonzero()[0, 0])
    n_tiles = int(inputs["aspect_ratio_mask"][0, 0].sum())
    assert mask.shape[:3] == (1, ids.shape[0], 1) and n_tiles >= 1
    assert bool((mask[0, pos:, 0, :n_tiles] == 1).all()) and int(mask[0, :pos].sum()) == 0
    assert int(inputs["aspect_ratio_ids"][0, 0]) >= 1
    assert inputs["pixel_values"].shape[:3] == (1, 1, model.config.vision_config.max_num_tiles)
    with torch.no_grad():
        seen = model(**inputs).logits[0, -1]
        blind = model(**{**inputs, "cross_attention_mask": torch.zeros_like(mask)}).logits[0, -1]
    assert not torch.allclose(seen, blind, atol=1e-4), "the image does not reach the logits"


def test_image_and_text_prompts_differ_only_in_the_image(arch, items):
    name, path = arch
    em = load_model(str(path))
    it = items[0]
    with_img = em.encode([em.render(it, with_image=True)], [_image(it)])["input_ids"][0]
    text_only = em.render(it, with_image=False)
    if name in TEXT_ONLY_EXTRA:  # the template's own addition, exactly once, after BOS
        extra = TEXT_ONLY_EXTRA[name]
        assert text_only.count(extra) == 1
        assert text_only.startswith(em.tokenizer.bos_token + extra)
        assert extra not in em.render(it, with_image=True)
        text_only = text_only.replace(extra, "")
    without = em.encode([text_only], None)["input_ids"][0]
    tok = em.tokenizer
    a = tok.convert_ids_to_tokens(with_img.tolist())
    b = tok.convert_ids_to_tokens(without.tolist())
    # longest common prefix and suffix; what lies between must be image markup or blank
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    # one word right after the image may tokenize differently: the released templates put
    # a newline after the placeholder ("<image>\nWhat" vs "USER: What")
    differ = b[i:len(b) - j]
    assert len(differ) <= 1, f"text-only tokens differ beyond the image: {differ}"
    middle = a[i:len(a) - j]
    assert middle, "the image prompt shows no image"
    words = {tok.convert_tokens_to_string([t]).strip() for t in differ}
    blank = {t for t in middle if tok.convert_tokens_to_string([t]).strip() in {"", *words}}
    rows = {t for t in middle if t.startswith("<row_")}
    assert set(middle) <= IMAGE_MARKUP | blank | rows, middle
    # and the rendered texts are equal once the image markup and spacing are removed
    # (all whitespace: Mistral 3 glues the image to its text, "[INST][IMG]What", where the
    # text-only prompt has "[INST]What"; Idefics3 writes "User:<image>What" / "User: What")
    def bare(s):
        for m in sorted(IMAGE_MARKUP | {em.image_token}, key=len, reverse=True):
            s = s.replace(m, " ")
        return "".join(s.split())

    assert bare(em.render(it, with_image=True)) == bare(text_only)
    if tok.bos_token_id is not None:
        assert a.count(tok.bos_token) == 1 and b.count(tok.bos_token) == 1


def test_letter_tables_follow_the_prefix_in_use(arch):
    _, path = arch
    em = load_model(str(path))
    for prefix in ("Answer", "The answer might be", "Most likely, the correct option is"):
        ids = em.answer_token_ids(prefix)
        opening = f"{prefix}: ("
        base = em.tokenizer.encode(opening, add_special_tokens=False)
        for k, letter in enumerate("ABCD"):
            full = em.tokenizer.encode(opening + letter, add_special_tokens=False)
            assert int(em.letter_of_token[ids[k]]) == k
            if full[: len(base)] == base and len(full) == len(base) + 1:
                assert ids[k] == full[-1]


def test_report_runs_end_to_end_on_each_architecture(arch, items, tmp_path):
    from mllmcal.eval.runner import EvalConfig, run_eval

    name, path = arch
    data = [{"id": it.id, "question": it.question, "options": list(it.options),
             "answer": it.answer, "image": it.image} for it in items]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(d) for d in data))
    cfg = EvalConfig(models=[str(path)], test=str(tmp_path / "test.jsonl"),
                     calib=str(tmp_path / "test.jsonl"), out=str(tmp_path / "out"),
                     progress=False, plots=False, build_idk=False, idk_variants=(),
                     batch_size=3)
    report = run_eval(cfg)
    mods = report["models"][0]["modalities"]
    assert set(mods) == {"image", "text"}
    for m in mods.values():
        assert m["test"]["n_items"] == len(items) and m["test"]["n_scored"] >= 1


@pytest.fixture(scope="module", params=list(TEXT_BUILDERS))
def text_arch(request, tmp_path_factory):
    texts = [format_question("What colour is the shape in the picture?", COLOURS)]
    return request.param, TEXT_BUILDERS[request.param](tmp_path_factory.mktemp(request.param), texts)


def test_text_llms_with_chat_templates_keep_working(text_arch, items):
    name, path = text_arch
    em = load_model(str(path))
    assert not em.multimodal and em.use_chat_template
    model = tf.AutoModelForCausalLM.from_pretrained(path).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    records = [r for b in score_items(em, items, batch_size=4) for r in b.records]
    n_answered = 0
    for it, rec in zip(items, records, strict=True):
        text = em.render(it, with_image=False)
        assert text.endswith("Answer: (")
        special = not (tok.bos_token and text.startswith(tok.bos_token))
        ids = tok(text, return_tensors="pt", add_special_tokens=special)["input_ids"]
        if tok.bos_token_id is not None:
            assert int((ids == tok.bos_token_id).sum()) == 1
        with torch.no_grad():
            probs = model(input_ids=ids).logits[0, -1].double().softmax(-1)
        if rec["step"] == 0 and rec["pred"] is not None:
            n_answered += 1
            assert rec["confidence"] == pytest.approx(float(probs.max()), rel=1e-4, abs=1e-6)
    assert n_answered >= len(items) // 2


def test_device_map_auto_gives_the_same_records(text_arch, items):
    _, path = text_arch
    plain = [r for b in score_items(load_model(str(path)), items) for r in b.records]
    mapped = [r for b in score_items(load_model(str(path), device_map="auto"), items)
              for r in b.records]
    assert [r["pred"] for r in mapped] == [r["pred"] for r in plain]
    for a, b in zip(mapped, plain, strict=True):
        assert (a["confidence"] is None) == (b["confidence"] is None)
        if a["confidence"] is not None:
            assert a["confidence"] == pytest.approx(b["confidence"], rel=1e-5)


@pytest.mark.parametrize("arch", ["qwen2-vl"], indirect=True)
def test_a_processor_needing_a_missing_package_is_a_clear_error(arch, tmp_path, capsys):
    """A checkpoint whose image processor exists only as a torchvision backend: the error
    names the package and the model, and the CLI exits 2 with it (no traceback)."""
    import shutil

    from mllmcal.cli import main
    from mllmcal.eval.models import MissingDependencyError

    _, path = arch
    broken = tmp_path / "needs-tv"
    shutil.copytree(path, broken)
    cfg = json.loads((broken / "processor_config.json").read_text())
    # an image processor that transformers 5.17 has only as a torchvision backend
    cfg["image_processor"]["image_processor_type"] = "Llama4ImageProcessor"
    (broken / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MissingDependencyError, match=r"model 'needs-tv'.*'torchvision'"):
        load_model(str(broken))
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": 1, "question": "Q?", "options": ["a", "b"],
                                                  "answer": "A"}))
    rc = main(["eval", "--model", str(broken), "--test", str(tmp_path / "t.jsonl"),
               "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs-tv" in err and "'torchvision'" in err and "Traceback" not in err


def test_without_chat_template_the_processors_own_placeholder_is_used(arch, items):
    name, path = arch
    with_template = load_model(str(path))
    em = load_model(str(path), chat_template="off")
    assert not em.use_chat_template
    it = items[1]
    text = em.render(it, with_image=True)
    if name == "paligemma":
        assert em.image_token not in text  # its processor places the image tokens itself
    else:
        assert text.startswith(em.image_placeholder)
        if em.image_token != "<image>":
            assert "<image>" not in text  # never LLaVA's literal for another architecture
    image_id = em.model.config.image_token_id
    ids_off = em.encode([text], [_image(it)])["input_ids"]
    ref = with_template.render(it, with_image=True)
    ids_on = with_template.encode([ref], [_image(it)])["input_ids"]
    assert int((ids_off == image_id).sum()) == int((ids_on == image_id).sum()) > 0
    # the image's markup (start/end markers around it) is the template's, once each
    tok = em.tokenizer
    for mark in IMAGE_MARKUP:
        mid = tok.convert_tokens_to_ids(mark)
        if isinstance(mid, int) and mid != tok.unk_token_id and mid != image_id:
            assert int((ids_off == mid).sum()) == int((ids_on == mid).sum()), (name, mark)
    recs = [r for b in score_items(em, [it]) for r in b.records]
    assert recs[0]["pred"] is not None


@pytest.mark.parametrize("arch", ["qwen2-vl"], indirect=True)
def test_cli_on_a_hugging_face_dataset_folder_with_image_bytes(arch, tmp_path, monkeypatch,
                                                               capsys):
    """`mllmcal eval --data DIR` where DIR/test and DIR/calib are save_to_disk folders
    whose images are bytes and whose columns carry other names."""
    import io

    import datasets

    from mllmcal.cli import main

    monkeypatch.setenv("MLLMCAL_CACHE", str(tmp_path / "cache"))
    _, path = arch

    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (10 + i, 16), (30 * i, 90, 200 - 20 * i)).save(buf, format="PNG")
        return {"bytes": buf.getvalue(), "path": None}

    feats = datasets.Features({"question_id": datasets.Value("string"),
                               "query": datasets.Value("string"),
                               "choices": datasets.Sequence(datasets.Value("string")),
                               "label": datasets.Value("int64"), "img": datasets.Image()})
    for split, n in (("test", 5), ("calib", 4)):
        rows = {"question_id": [f"{split}{i}" for i in range(n)],
                "query": ["What colour is the shape in the picture?"] * n,
                "choices": [COLOURS[: 2 + i % 3] for i in range(n)],
                "label": [i % 2 for i in range(n)], "img": [png(i) for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=feats).save_to_disk(str(tmp_path / "d" / split))
    rc = main(["eval", "--model", str(path), "--data", str(tmp_path / "d"), "--out",
               str(tmp_path / "out"), "--no-progress", "--no-plots", "--no-idk",
               "--question-column", "query", "--options-column", "choices",
               "--answer-column", "label", "--image-column", "img", "--id-column", "question_id"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["test"]["n_items"] == 5 and report["data"]["calib"]["n_items"] == 4
    image = report["models"][0]["modalities"]["image"]
    assert image["test"]["n_items"] == 5 and image["n_calib_rows"] >= 1


def test_a_pil_image_processor_filed_under_another_model_is_found(tmp_path):
    """Qwen2.5-VL checkpoints name "Qwen2VLImageProcessor" (model type qwen2_5_vl), whose
    PIL class lives in transformers.models.qwen2_vl: found there, without torchvision."""
    from mllmcal.eval.compat import _pil_image_processor

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    ip = _pil_image_processor(tmp_path, {"image_processor_type": "Qwen2VLImageProcessor",
                                         "patch_size": 4, "merge_size": 2,
                                         "temporal_patch_size": 2, "min_pixels": 256,
                                         "max_pixels": 256})
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil" and ip.patch_size == 4


def test_a_processor_that_writes_bos_itself_gets_no_second_one(tmp_path, items):
    """Mllama's processor puts <|begin_of_text|> after a leading <|image|> when the text has
    none (its base-model layout), so the tokenizer must not add one too."""
    from checkpoints import build_mllama

    em = load_model(str(build_mllama(tmp_path / "mllama")), chat_template="off")
    tok = em.tokenizer
    it = items[0]
    img = em.encode([em.render(it, with_image=True)], [_image(it)])["input_ids"][0].tolist()
    txt = em.encode([em.render(it, with_image=False)], None)["input_ids"][0].tolist()
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert img[:2] == [image_id, tok.bos_token_id] and img.count(tok.bos_token_id) == 1
    assert txt[0] == tok.bos_token_id and txt.count(tok.bos_token_id) == 1
    assert tok.decode(img[2:]).strip() == tok.decode(txt[1:]).strip()


def test_templates_that_print_today_render_a_fixed_date(tmp_path):
    """A prompt must not depend on the day of the run (cached scores are keyed on the
    template, not on the date): date_string (Llama 3.x) or strftime_now is pinned."""
    from checkpoints import _fast, _train_tokenizer

    from mllmcal.eval.quirks import TEMPLATE_DATE
    from mllmcal.eval.quirks import date_kwargs as _date_kwargs

    tok = _fast(_train_tokenizer(["<s>"], "bytelevel", None, []))
    msgs = [{"role": "user", "content": "hi"}]
    llama = ("{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y')"
             " %}{%- endif %}Today Date: {{ date_string }} {{ messages[0]['content'] }}")
    other = "{{ strftime_now('%Y-%m-%d') }} {{ messages[0]['content'] }}"
    for template, want in ((llama, f"Today Date: {TEMPLATE_DATE} hi"), (other, "2024-07-26 hi")):
        kw = {"chat_template": template, **_date_kwargs(template)}
        assert tok.apply_chat_template(msgs, tokenize=False, **kw) == want
        # no callable among the arguments: transformers 5.2x turns template variables into
        # plain data
        assert not any(callable(v) for v in kw.values())
    # the fallback branch of date_string templates is fixed as well
    bare = llama.replace("if not date_string is defined", "if true")
    kw = {"chat_template": bare, **_date_kwargs(bare)}
    assert tok.apply_chat_template(msgs, tokenize=False, **kw) == f"Today Date: {TEMPLATE_DATE} hi"
    assert _date_kwargs("{{ messages }}") == {}


def test_a_processor_gated_on_torchvision_is_imported_with_its_pil_helpers():
    """transformers 5.17 replaces PixtralProcessor (Mistral 3) by a placeholder without
    torchvision: its module imports one helper from the torchvision image-processor
    module. The real class is imported with the PIL module standing in, and nothing of
    that stand-in is left in sys.modules."""
    import sys

    from mllmcal.eval.compat import processor_class

    cls = processor_class("PixtralProcessor")
    assert "_backends" not in vars(cls) and "video_processor" not in cls.get_attributes()
    assert "transformers.models.pixtral.image_processing_pixtral" not in sys.modules
    assert processor_class("Qwen2VLProcessor") is tf.Qwen2VLProcessor
    assert processor_class("NoSuchProcessor") is None


def test_a_template_printing_assistant_content_as_is_gets_a_plain_string(tmp_path, items):
    """GLM-4.1V's template writes an assistant turn as {{ msg.content }} (its user branch
    takes typed parts): the open assistant turn is then a string, never a list's repr."""
    from checkpoints import build_glm4v

    em = load_model(str(build_glm4v(tmp_path / "glm4v")))
    for with_image in (True, False):
        text = em.render(items[0], with_image=with_image)
        assert "{'type'" not in text and text.endswith("<|assistant|>\nAnswer: (")
        assert ("<|begin_of_image|><|image|><|end_of_image|>" in text) == with_image


# ------------------------------------------------------------------ several images per item


@pytest.fixture(scope="module")
def multi_items(tmp_path_factory):
    """Two items with two images each (placeholders in order and reversed), one with one."""
    d = tmp_path_factory.mktemp("multi")
    paths = []
    for k, colour in enumerate([(220, 30, 30), (30, 30, 220), (30, 200, 30)]):
        paths.append(str(d / f"{k}.png"))
        Image.new("RGB", (16, 16), colour).save(paths[-1])
    opts = tuple(COLOURS[:3])
    return [Item("two", "Is <image 1> redder than <image 2>?", opts, "A", images=(paths[0], paths[1])),
            Item("swapped", "First <image 2>, then <image 1>: which colour?", opts, "B",
                 images=(paths[0], paths[2])),
            Item("one", "What colour is the shape in the picture?", opts, "C", paths[2])]


def _multi_arch(name, tmp_path_factory):
    texts = [format_question("Is redder than ? First then : which colour ?", COLOURS)]
    return BUILDERS[name](tmp_path_factory.mktemp(name), texts)


@pytest.mark.parametrize("name", ["qwen2-vl", "llava-onevision"])
def test_several_images_stand_where_their_placeholders_are(name, multi_items, tmp_path_factory):
    from mllmcal.prompting import answer_opening, user_text

    em = load_model(str(_multi_arch(name, tmp_path_factory)))
    two, swapped, one = multi_items
    assert em.image_limit_reason(2) is None and em.image_order(swapped) == [1, 0]
    # the user turn: text and image parts in the placeholders' order, rendered by the template
    q = user_text(two.question_with_options)
    head, rest = q.split("<image 1>")
    mid, tail = rest.split("<image 2>")
    want = em.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": head}, {"type": "image"},
                                      {"type": "text", "text": mid}, {"type": "image"},
                                      {"type": "text", "text": tail}]},
         {"role": "assistant", "content": [{"type": "text", "text": answer_opening()}]}],
        tokenize=False, continue_final_message=True)
    prompt = em.render(two)
    assert prompt == want and "<image 1>" not in prompt
    # the confidence is a manual forward pass's, with both images in prompt order
    ims = {p: Image.open(p).convert("RGB") for p in two.images + swapped.images}
    recs = {r["id"]: r for b in score_items(em, multi_items, method="option-softmax",
                                            batch_size=2) for r in b.records}
    assert set(recs) == {"two", "swapped", "one"}
    for it in (two, swapped):
        enc = em.processor(text=[em.render(it)], return_tensors="pt",
                           images=[[ims[it.images[k]] for k in em.image_order(it)]],
                           add_special_tokens=not em.render(it).startswith(em.tokenizer.bos_token or "\0"))
        with torch.no_grad():
            logits = em.model(**enc).logits[0, -1].double()
        ids = em.answer_token_ids()[:len(it.options)]
        p = torch.softmax(logits[ids], dim=0)
        assert recs[it.id]["confidence"] == pytest.approx(float(p.max()), rel=1e-4)
        assert recs[it.id]["option_probs"] == pytest.approx(p.tolist(), rel=1e-4, abs=1e-6)
        is_img = (enc["input_ids"][0] == em.tokenizer.convert_tokens_to_ids(em.image_token)).long()
        runs = int((is_img[1:] > is_img[:-1]).sum()) + int(is_img[0])
        # Qwen2-VL's template puts each image where its part stands; LLaVA-OneVision's
        # released template writes all image parts of a turn first, back to back
        assert runs == (2 if name == "qwen2-vl" else 1)
        n_tok = int(is_img.sum())
        one_enc = em.processor(text=[em.render(one)], images=[[ims[it.images[0]]]], return_tensors="pt")
        n_one = int((one_enc["input_ids"] == em.tokenizer.convert_tokens_to_ids(em.image_token)).sum())
        # LLaVA-OneVision shows several images without its anyres tiles: not twice one's count
        assert n_tok == 2 * n_one if name == "qwen2-vl" else n_tok > 0


def test_a_single_image_model_skips_multi_image_items_by_name(multi_items, tmp_path_factory,
                                                              tmp_path, caplog):
    """LLaVA-1.5 takes one image per prompt: items with two are skipped, named with the
    model, in the log and the report; never cut to their first image."""
    import base64

    from mllmcal.eval.runner import EvalConfig, run_eval

    llava = _multi_arch("llava-1.5", tmp_path_factory)
    qwen = _multi_arch("qwen2-vl", tmp_path_factory)
    em = load_model(str(llava), name="llava")
    assert "at most 1 image" in em.image_limit_reason(2)
    with caplog.at_level("WARNING", logger="mllmcal.eval"):
        recs = [r for b in score_items(em, multi_items) for r in b.records]
    assert [r["id"] for r in recs] == ["one"]
    assert "model 'llava' cannot take item two: it shows 2 images" in caplog.text
    # end to end from a VLMEvalKit TSV whose multi-image rows hold a list of base64 images
    def b64(p):
        return base64.b64encode(open(p, "rb").read()).decode()
    rows = ["index\timage\tquestion\tA\tB\tC\tanswer"]
    for it in multi_items:
        img = str([b64(p) for p in it.images]) if len(it.images) > 1 else b64(it.image)
        rows.append("\t".join([it.id, img, it.question, *it.options, it.answer]))
    (tmp_path / "t.tsv").write_text("\n".join(rows) + "\n")
    cfg = EvalConfig(models=[str(qwen), f"{llava},name=llava"], test=str(tmp_path / "t.tsv"),
                     calib=str(tmp_path / "t.tsv"), out=str(tmp_path / "out"), progress=False,
                     plots=False, build_idk=False, idk_variants=(), method="option-softmax")
    report = run_eval(cfg)
    q, lv = report["models"]
    assert q["modalities"]["image"]["skipped_items"] == []
    assert q["modalities"]["image"]["test"]["n_items"] == 3
    skipped = lv["modalities"]["image"]["skipped_items"]
    assert sorted((s, i) for s, i, _ in skipped) == [("calib", "swapped"), ("calib", "two"),
                                                    ("test", "swapped"), ("test", "two")]
    assert lv["modalities"]["image"]["test"]["n_items"] == 1
    assert lv["modalities"]["text"]["test"]["n_items"] == 3  # text only: nothing to skip
    md = (tmp_path / "out" / "report.md").read_text()
    assert "- llava / image, test: `two`: model 'llava' cannot take item two" in md
    from mllmcal.eval.runner import fit_calib_temperature

    fit = fit_calib_temperature(f"{llava},name=llava", str(tmp_path / "t.tsv"),
                                str(tmp_path / "fit"), method="option-softmax")
    assert fit["n_items"] == 1 and fit["n_skipped_items"] == 2


def test_a_processor_refusing_several_images_skips_the_item_by_name(
        multi_items, tmp_path_factory, monkeypatch, caplog):
    """An architecture without a listed limit is tried: a processor that refuses a prompt
    with two images makes the model skip two-image items, with its message."""
    from mllmcal.eval.confidence import split_supported
    from mllmcal.eval.models import EvalModel

    em = load_model(str(_multi_arch("qwen2-vl", tmp_path_factory)), name="qwen")
    real = EvalModel.encode

    def refuse(self, prompts, images):
        if images and any(isinstance(im, list) and len(im) > 1 for im in images):
            raise ValueError("Mismatch in `image` token count between text and `input_ids`")
        return real(self, prompts, images)

    monkeypatch.setattr(EvalModel, "encode", refuse)
    with caplog.at_level("WARNING", logger="mllmcal.eval"):
        kept, skipped = split_supported(em, multi_items)
    assert [it.id for it in kept] == ["one"]
    assert [it.id for it, _ in skipped] == ["two", "swapped"]
    assert "its processor (qwen2_vl) refused a prompt with 2 images (Mismatch" in skipped[0][1]
    assert "model 'qwen' cannot take item swapped" in caplog.text
    assert split_supported(em, multi_items, with_image=False)[1] == []  # text only
