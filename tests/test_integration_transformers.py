"""CalibratedLogitsProcessor and score_tokens on tiny models built from configs.

The oracle for generated-token log-probabilities is ``log_softmax(raw_logits / T)`` at the
generated tokens, with ``raw_logits`` taken from the *same* ``generate`` call
(``output_logits=True``), computed in float64.

The same file runs on the pinned transformers and, by subprocess from
``test_integration_transformers_latest.py``, on the newest 5.x release.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LogitsProcessor,
)

import mllmcal
from mllmcal.integrations.transformers import (
    CalibratedLogitsProcessor,
    StopAtAnswer,
    score_tokens,
    sequence_scores,
)

V = 160
EOS = 3
PAD = 0


def _llama_config(vocab: int = V) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD,
    )


def _sharpen(model: torch.nn.Module, seed: int) -> None:
    # Random tiny models give nearly uniform next-token distributions; a larger output
    # embedding makes confidences spread over (0, 1) so that the tests see varied values.
    g = torch.Generator().manual_seed(seed)
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * 0.6)


def _tiny_llama(dtype: torch.dtype = torch.float32, vocab: int = V, seed: int = 0):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(_llama_config(vocab)).eval()
    _sharpen(m, seed)
    return m.to(dtype)


@pytest.fixture(scope="module")
def llama():
    return _tiny_llama()


@pytest.fixture(scope="module")
def llama_bf16():
    return _tiny_llama(torch.bfloat16, seed=1)


def _left_padded_batch(seed: int = 0, lengths=(7, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(4, V, (n,), generator=g)
        mask[r, width - n:] = 1
    return ids, mask


def _expected_logprobs(out, prompt_len: int, temperature: float) -> torch.Tensor:
    """float64 log_softmax(raw / T) at each generated token, [B, new]."""
    raw = torch.stack(out.logits, dim=1).double()  # [B, new, V]
    tok = out.sequences[:, prompt_len:]
    return torch.log_softmax(raw / temperature, -1).gather(2, tok[..., None]).squeeze(2)


def _after_first_eos(tokens: torch.Tensor, eos_ids) -> torch.Tensor:
    """True at positions strictly after a row's first EOS."""
    is_eos = torch.isin(tokens, torch.as_tensor(eos_ids))
    seen = torch.cumsum(is_eos.long(), dim=1)
    return (seen - is_eos.long()) > 0


def _check_against_raw(proc, out, prompt_len, temperature, eos_ids):
    lp = proc.token_logprobs(out.sequences)
    exp = _expected_logprobs(out, prompt_len, temperature)
    assert lp.shape == exp.shape == (out.sequences.shape[0], out.sequences.shape[1] - prompt_len)
    masked = _after_first_eos(out.sequences[:, prompt_len:], eos_ids)
    assert torch.equal(torch.isnan(lp), masked)
    torch.testing.assert_close(lp[~masked].double(), exp[~masked], rtol=0, atol=1e-5)
    return lp, masked


def _greedy_eos_for_row(model, ids, mask, row: int, step: int) -> int:
    """A token id that greedy decoding emits in `row` at `step`: used as EOS, it makes
    that row (at least) finish in the middle of the batch."""
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=step + 1, do_sample=False,
        eos_token_id=None, pad_token_id=PAD,
    )
    return int(out[row, ids.shape[1] + step])


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_greedy_token_logprobs_equal_log_softmax_of_raw_logits_left_padded_eos_mid_batch(
    llama, temperature
):
    ids, mask = _left_padded_batch(seed=1)
    eos = _greedy_eos_for_row(llama, ids, mask, row=1, step=2)
    proc = CalibratedLogitsProcessor(temperature=temperature, eos_token_id=eos)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=8,
        do_sample=False, eos_token_id=eos, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True, output_scores=True,
    )
    _, masked = _check_against_raw(proc, out, ids.shape[1], temperature, [eos])
    # Observe-only: what the processor returned (out.scores) is the raw logits, untouched.
    for sc, raw in zip(out.scores, out.logits, strict=True):
        assert torch.equal(sc, raw)
    assert masked[1].any() and not masked.all(), "row 1 must finish early, not every row"


@pytest.mark.parametrize("temperature", [0.8, 2.5])
def test_sampled_token_logprobs_equal_log_softmax_of_raw_logits(llama, temperature):
    ids, mask = _left_padded_batch(seed=2, lengths=(5, 3, 5, 2))
    eos_ids = list(range(3, 3 + 12))  # several EOS ids so that some rows stop early
    proc = CalibratedLogitsProcessor(temperature=temperature, eos_token_id=eos_ids)
    torch.manual_seed(123)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=10,
        do_sample=True, top_k=0, eos_token_id=eos_ids, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )
    _check_against_raw(proc, out, ids.shape[1], temperature, eos_ids)


def test_warpers_after_it_do_not_change_recorded_full_distribution(llama):
    ids, mask = _left_padded_batch(seed=3)
    proc = CalibratedLogitsProcessor(temperature=1.4)
    torch.manual_seed(7)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=8,
        do_sample=True, top_k=5, top_p=0.9, temperature=0.7, eos_token_id=None,
        pad_token_id=PAD, return_dict_in_generate=True, output_logits=True, output_scores=True,
    )
    lp, _ = _check_against_raw(proc, out, ids.shape[1], 1.4, [])
    # The warped scores transformers sampled from are different from what was recorded:
    # the sampled tokens lie in the top-5 of the raw logits.
    raw = torch.stack(out.logits, 1)
    top5 = raw.topk(5, dim=-1).indices
    assert (top5 == out.sequences[:, ids.shape[1]:, None]).any(-1).all()
    assert torch.isinf(torch.stack(out.scores)).any(), "top-k must have masked the scores"
    s = proc.step_records()
    exp_conf = torch.softmax(raw.double() / 1.4, -1).amax(-1)
    torch.testing.assert_close(s["confidence"].double(), exp_conf, rtol=0, atol=1e-6)


class _Recorder(LogitsProcessor):
    """Test-only: keeps a copy of the scores it sees (what reaches the next processor)."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


def test_scale_scores_after_repetition_penalty_and_min_new_tokens(llama):
    ids, mask = _left_padded_batch(seed=4)
    rec, after = _Recorder(), _Recorder()
    proc = CalibratedLogitsProcessor(temperature=1.9, eos_token_id=EOS, scale_scores=True)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[rec, proc, after],
        max_new_tokens=6, min_new_tokens=3, repetition_penalty=1.5, do_sample=False,
        eos_token_id=EOS, pad_token_id=PAD, return_dict_in_generate=True, output_scores=True,
        output_logits=True,
    )
    seen = torch.stack(rec.seen, 1).double()  # after repetition penalty and min_new_tokens
    # It returned z = scores / T as a new tensor; the tensor it received was not written.
    torch.testing.assert_close(torch.stack(out.scores, 1).double(), seen / 1.9, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack(after.seen, 1).double(), seen / 1.9, rtol=1e-6, atol=1e-6)
    assert not torch.equal(torch.stack(out.logits, 1), torch.stack(out.scores, 1))
    assert torch.isneginf(seen[:, :3, EOS]).all(), "min_new_tokens masks EOS before step 3"
    tok = out.sequences[:, ids.shape[1]:]
    exp = torch.log_softmax(seen / 1.9, -1).gather(2, tok[..., None]).squeeze(2)
    lp = proc.token_logprobs(out.sequences)
    keep = ~_after_first_eos(tok, [EOS])
    torch.testing.assert_close(lp[keep].double(), exp[keep], rtol=0, atol=1e-5)


def test_bf16_model(llama_bf16):
    ids, mask = _left_padded_batch(seed=5)
    proc = CalibratedLogitsProcessor.for_model(llama_bf16, temperature=1.3)
    assert proc.eos_token_id == [EOS]
    torch.manual_seed(3)
    out = llama_bf16.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=6,
        do_sample=True, top_k=0, eos_token_id=EOS, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )
    _check_against_raw(proc, out, ids.shape[1], 1.3, [EOS])


def _tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=16, patch_size=8, projection_dim=32,
    )
    text = _llama_config()
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=V - 1,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    m = LlavaForConditionalGeneration(cfg).eval()
    _sharpen(m, 5)
    return m


def _llava_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(9)
    n_img = (16 // 8) ** 2  # patches; the CLS feature is dropped by the "default" strategy
    text = torch.randint(4, V - 1, (batch, 5), generator=g)
    ids = torch.cat([text[:, :1], torch.full((batch, n_img), V - 1), text[:, 1:]], dim=1)
    pixels = torch.randn(batch, 3, 16, 16, generator=g)
    return ids, torch.ones_like(ids), pixels


def test_llava_with_pixel_values():
    model = _tiny_llava()
    ids, mask, pixels = _llava_inputs()
    proc = CalibratedLogitsProcessor(temperature=1.2, eos_token_id=EOS)
    out = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixels, logits_processor=[proc],
        max_new_tokens=6, do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )
    _check_against_raw(proc, out, ids.shape[1], 1.2, [EOS])
    # The image really is used: other pixels give other raw logits at the first step.
    out2 = model.generate(
        input_ids=ids, attention_mask=mask, pixel_values=-pixels, max_new_tokens=1,
        do_sample=False, return_dict_in_generate=True, output_logits=True, pad_token_id=PAD,
    )
    assert not torch.allclose(out2.logits[0], out.logits[0])


# --------------------------------------------------------------------------- behaviour


def test_installed_transformers_is_the_one_this_run_was_asked_for():
    """The subprocess run on the newest transformers sets MLLMCAL_EXPECT_TRANSFORMERS."""
    import transformers

    want = os.environ.get("MLLMCAL_EXPECT_TRANSFORMERS")
    if want is None:
        pytest.skip("the main run tests whichever transformers constraints.txt pins")
    assert transformers.__version__ == want


def test_beam_search_is_refused_with_a_clear_error(llama):
    """Fewer sequences than rows (num_return_sequences < num_beams): refused at the second
    step already (the rows come from a buffer beam search rebuilds), or, with one step, when
    the results are read."""
    ids, mask = _left_padded_batch(seed=6)
    proc = CalibratedLogitsProcessor(temperature=1.5)
    with pytest.raises(ValueError, match="beam search"):
        llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], num_beams=2,
                       max_new_tokens=3, pad_token_id=PAD, return_dict_in_generate=True)
    with pytest.raises(ValueError, match="beam search"):
        proc.step_records()  # the refused run's records are refused too
    out = llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                         num_beams=2, max_new_tokens=1, pad_token_id=PAD)
    with pytest.raises(ValueError, match="beam search"):
        proc.token_logprobs(out)


class _InPlaceEditor(LogitsProcessor):
    """A processor that edits the scores it gets in place (a hostile neighbour)."""

    def __call__(self, input_ids, scores):
        scores.mul_(3.0).add_(20.0)
        scores[:, 5] = 1e4
        return scores


class _FreshFirstStep(LogitsProcessor):
    """Returns a new tensor at the first step only, the same tensor afterwards."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores * 1.0 if self.calls == 1 else scores


class _ReusedOutput(LogitsProcessor):
    """Writes its result into one preallocated buffer every step (and so overwrites the
    tensor it handed on at the previous step)."""

    def __init__(self):
        self.buf = None

    def __call__(self, input_ids, scores):
        if self.buf is None or self.buf.shape != scores.shape:
            self.buf = torch.empty_like(scores)
        torch.sub(scores, 0.25, out=self.buf)
        return self.buf


class _Wrapper(LogitsProcessor):
    def __init__(self, inner):
        self.inner = inner

    def __call__(self, input_ids, scores):
        return self.inner(input_ids, scores)


def _exact_against_recorded(proc, rec, out, prompt_len, temperature, eos_ids):
    """Oracle: log_softmax(seen / T) at the generated tokens, `seen` being a copy of what
    reached the processor (kept by a _Recorder placed right before it)."""
    seen = torch.stack(rec.seen, 1).double()
    tok = out.sequences[:, prompt_len:]
    exp = torch.log_softmax(seen / temperature, -1).gather(2, tok[..., None]).squeeze(2)
    lp = proc.token_logprobs(out.sequences)
    keep = ~_after_first_eos(tok, eos_ids)
    torch.testing.assert_close(lp[keep].double(), exp[keep], rtol=0, atol=1e-5)
    assert torch.isnan(lp[~keep]).all()


@pytest.mark.parametrize("do_sample", [False, True])
def test_exact_whatever_the_neighbours_do_to_the_scores(llama, do_sample):
    """In-place editors after it, stacked processors, a neighbour that returns a
    new tensor at step 1 only, one that reuses its output buffer, wrapping."""
    ids, mask = _left_padded_batch(seed=20)
    rec_a, rec_b, rec_c = _Recorder(), _Recorder(), _Recorder()
    a = CalibratedLogitsProcessor(temperature=1.7, eos_token_id=EOS)
    b = CalibratedLogitsProcessor(temperature=0.8, eos_token_id=EOS)
    c = CalibratedLogitsProcessor(temperature=1.1, eos_token_id=EOS)
    plist = [
        _FreshFirstStep(), rec_a, a, _InPlaceEditor(), _ReusedOutput(), rec_b, _Wrapper(b),
        _ReusedOutput(), rec_c, c, _InPlaceEditor(),
    ]
    torch.manual_seed(5)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=plist, max_new_tokens=7,
        do_sample=do_sample, top_k=0, eos_token_id=EOS, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )
    for proc, rec, t in ((a, rec_a, 1.7), (b, rec_b, 0.8), (c, rec_c, 1.1)):
        _exact_against_recorded(proc, rec, out, ids.shape[1], t, [EOS])
    # The first step's raw logits reached `a` through a new tensor and stay raw (from step
    # 2 on, the in-place editor after `a` edits transformers' stored copy itself).
    assert torch.equal(out.logits[0], rec_a.seen[0])


def test_reuse_across_generate_calls(llama):
    proc = CalibratedLogitsProcessor(temperature=1.6)
    ids, mask = _left_padded_batch(seed=7)
    out1 = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=5,
        do_sample=False, eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True,
        output_logits=True,
    )
    lp1 = proc.token_logprobs(out1.sequences).clone()
    torch.testing.assert_close(lp1.double(), _expected_logprobs(out1, ids.shape[1], 1.6),
                               rtol=0, atol=1e-5)
    # A new call with another prompt length starts a new run.
    ids2, mask2 = _left_padded_batch(seed=8, lengths=(3, 2, 3))
    out2 = llama.generate(
        input_ids=ids2, attention_mask=mask2, logits_processor=[proc], max_new_tokens=4,
        do_sample=True, top_k=0, eos_token_id=None, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )
    _check_against_raw(proc, out2, ids2.shape[1], 1.6, [])
    with pytest.raises(ValueError, match="latest run"):
        proc.token_logprobs(out1.sequences)
    other = out2.sequences.clone()
    other[0, -2] = (other[0, -2] + 1) % V
    with pytest.raises(ValueError, match="do not match"):
        proc.token_logprobs(other)
    snap = proc.snapshot()
    assert snap["runs"] == 2 and snap["steps"] == 5 + 4
    assert snap["tokens"] == 3 * 5 + 3 * 4


def test_a_call_fed_the_previous_sequences_is_grouped_with_it_and_stays_exact(llama):
    proc = CalibratedLogitsProcessor(temperature=1.6)
    ids, mask = _left_padded_batch(seed=7)
    out1 = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=5,
        do_sample=False, eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True,
        output_logits=True,
    )
    seq = out1.sequences  # no token_logprobs call in between: the continuation resolves it
    out2 = llama.generate(
        input_ids=seq, attention_mask=torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1),
        logits_processor=[proc], max_new_tokens=3, do_sample=True, top_k=0,
        eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True, output_logits=True,
    )
    lp = proc.token_logprobs(out2.sequences)
    assert lp.shape == (3, 5 + 3), "one run: every token since the first prompt"
    torch.testing.assert_close(lp[:, :5].double(), _expected_logprobs(out1, ids.shape[1], 1.6),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(lp[:, 5:].double(), _expected_logprobs(out2, seq.shape[1], 1.6),
                               rtol=0, atol=1e-5)
    assert proc.snapshot()["runs"] == 1


def test_a_merged_call_with_another_prompt_is_detected(llama):
    proc = CalibratedLogitsProcessor()
    ids, mask = _left_padded_batch(seed=7)
    out1 = llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                          max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    fresh = torch.randint(4, V, out1.shape, generator=torch.Generator().manual_seed(1))
    out2 = llama.generate(input_ids=fresh, logits_processor=[proc], max_new_tokens=2,
                          do_sample=False, pad_token_id=PAD)
    with pytest.raises(ValueError, match="reset"):
        proc.token_logprobs(out2)
    proc.reset()
    llama.generate(input_ids=fresh, logits_processor=[proc], max_new_tokens=2,
                   do_sample=False, pad_token_id=PAD)


def test_monitoring_summaries_match_definitions(llama):
    ids, mask = _left_padded_batch(seed=8)
    proc = CalibratedLogitsProcessor(temperature=0.9, n_bins=10)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=7,
        do_sample=False, eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True,
        output_logits=True,
    )
    p = torch.softmax(torch.stack(out.logits, 1).double() / 0.9, -1)
    conf = p.amax(-1)
    ent = -(p * torch.log(p)).sum(-1)
    summ = proc.token_summary()
    assert summ["tokens"] == conf.numel()
    assert summ["mean_confidence"] == pytest.approx(float(conf.mean()), abs=1e-6)
    assert summ["mean_entropy"] == pytest.approx(float(ent.mean()), abs=1e-5)
    hist = torch.bincount(torch.clamp((conf * 10).floor().long(), max=9).reshape(-1), minlength=10)
    assert summ["confidence_histogram"] == hist.tolist()
    lp = _expected_logprobs(out, ids.shape[1], 0.9)
    s = proc.sequence_scores(out.sequences)
    torch.testing.assert_close(s["mean_logprob"].double(), lp.mean(1), rtol=0, atol=1e-5)
    torch.testing.assert_close(s["min_prob"].double(), lp.exp().amin(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s["product"].double(), lp.sum(1).exp(), rtol=1e-4, atol=1e-12)
    assert torch.equal(proc.sequence_confidence(kind="min"), s["min_prob"])
    rec = proc.step_records()
    torch.testing.assert_close(rec["confidence"].double(), conf, rtol=0, atol=1e-6)


def test_sequence_scores_ignore_masked_positions():
    lp = torch.tensor([[-0.5, -1.0, float("nan")], [float("nan")] * 3, [-2.0, -0.1, -0.3]])
    s = sequence_scores(lp)
    torch.testing.assert_close(s["mean_logprob"][[0, 2]], torch.tensor([-0.75, -0.8]))
    torch.testing.assert_close(s["min_prob"][[0, 2]], torch.exp(torch.tensor([-1.0, -2.0])))
    torch.testing.assert_close(s["product"][[0, 2]], torch.exp(torch.tensor([-1.5, -2.4])))
    assert torch.isnan(s["mean_logprob"][1]) and torch.isnan(s["product"][1])
    assert s["n_tokens"].tolist() == [2, 0, 3]


def test_manual_decode_loop_with_growing_input_ids(llama):
    ids, _ = _left_padded_batch(seed=9, lengths=(4, 4))
    proc = CalibratedLogitsProcessor(temperature=2.0, eos_token_id=EOS)
    expected = []
    with torch.no_grad():
        for _ in range(4):
            raw = llama(ids).logits[:, -1].float()
            expected.append(torch.log_softmax(raw.double() / 2.0, -1))
            proc(ids, raw.clone())
            tok = raw.argmax(-1)
            ids = torch.cat([ids, tok[:, None]], 1)
    lp = proc.token_logprobs(ids)
    exp = torch.stack(expected, 1).gather(2, ids[:, -4:, None]).squeeze(2)
    keep = ~_after_first_eos(ids[:, -4:], [EOS])
    torch.testing.assert_close(lp[keep].double(), exp[keep], rtol=0, atol=1e-5)


def test_manual_loop_with_record_tokens_and_a_deferred_extra_step():
    """record_tokens gives the tokens when input_ids do not grow; an extra step that is
    later undone (transformers' deferred stop check) is not part of the results."""
    g = torch.Generator().manual_seed(3)
    proc = CalibratedLogitsProcessor(temperature=0.7)
    ids = torch.randint(0, 50, (2, 3), generator=g)
    seen = []
    for _ in range(4):  # 3 real steps + 1 extra
        scores = torch.randn(2, 50, generator=g) * 3
        seen.append(torch.log_softmax(scores.double() / 0.7, -1))
        proc(ids, scores)
        ids = torch.cat([ids, torch.randint(0, 50, (2, 1), generator=g)], 1)
    seq = ids[:, :-1]  # the extra step's token is undone
    lp = proc.token_logprobs(seq)
    exp = torch.stack(seen[:3], 1).gather(2, seq[:, 3:, None]).squeeze(2)
    torch.testing.assert_close(lp.double(), exp, rtol=0, atol=1e-5)

    proc.reset()
    scores = torch.randn(2, 50, generator=g)
    proc(ids, scores)
    with pytest.raises(RuntimeError, match="record_tokens"):
        proc.token_logprobs()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        proc.record_tokens(torch.tensor([3, 50]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        proc.record_tokens(torch.tensor([-1, 0]))
    proc.record_tokens(torch.tensor([3, 49]))
    exp = torch.log_softmax(scores.double() / 0.7, -1)[[0, 1], [3, 49]]
    torch.testing.assert_close(proc.token_logprobs()[:, 0].double(), exp, rtol=0, atol=1e-5)


def test_bf16_scores_in_a_manual_loop_stay_exact():
    """generate hands processors fp32; a hand-written loop may not. With T != 1 the
    buffer then keeps the raw scores (z rounded to bf16 would not be exact)."""
    g = torch.Generator().manual_seed(4)
    proc = CalibratedLogitsProcessor(temperature=1.9, scale_scores=True)
    ids = torch.randint(0, 99, (3, 2), generator=g)
    seen = []
    for _ in range(3):
        scores = (torch.randn(3, 99, generator=g) * 8).bfloat16()
        seen.append(torch.log_softmax(scores.double() / 1.9, -1))
        z = proc(ids, scores)
        torch.testing.assert_close(z, (scores.float() / 1.9).bfloat16(), rtol=0, atol=0)
        ids = torch.cat([ids, torch.multinomial(z.float().softmax(-1), 1, generator=g)], 1)
    exp = torch.stack(seen, 1).gather(2, ids[:, 2:, None]).squeeze(2)
    torch.testing.assert_close(proc.token_logprobs(ids).double(), exp, rtol=0, atol=2e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="temperature"):
        CalibratedLogitsProcessor(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        CalibratedLogitsProcessor(temperature=float("nan"))
    with pytest.raises(ValueError, match="fp32"):
        CalibratedLogitsProcessor(temperature=1e39)
    with pytest.raises(ValueError, match="sequence_confidence"):
        CalibratedLogitsProcessor(sequence_confidence="median")
    with pytest.raises(RuntimeError, match="generate"):
        CalibratedLogitsProcessor().token_logprobs()


def test_stop_at_answer_gives_the_first_answer_step_and_stops_early(llama):
    """What the eval needs: per row the first step whose token is an answer token, that
    token's probability at that step, early stop once every row has answered."""
    ids, mask = _left_padded_batch(seed=21)
    with torch.no_grad():
        probe = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                               do_sample=False, eos_token_id=None, pad_token_id=PAD)
    gen = probe[:, ids.shape[1]:]
    # Answer tokens: what rows 0 and 1 emit at steps 1 and 3; row 2 may never answer.
    answers = torch.unique(torch.stack([gen[0, 1], gen[1, 3]]))
    proc = CalibratedLogitsProcessor(temperature=1.0)
    stop = StopAtAnswer(proc, answers.tolist(), keep_rows=True)
    out = llama.generate(
        input_ids=ids, attention_mask=mask, logits_processor=[proc], stopping_criteria=[stop],
        max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=PAD,
        return_dict_in_generate=True, output_logits=True,
    )
    tok = out.sequences[:, ids.shape[1]:]
    is_ans = torch.isin(tok, answers)
    first = torch.where(is_ans.any(1), is_ans.float().argmax(1), torch.full((3,), -1))
    assert torch.equal(stop.found, is_ans.any(1)) and torch.equal(stop.step, first)
    assert stop.found[0] and stop.found[1] and int(stop.step[0]) <= 1 and int(stop.step[1]) <= 3
    raw = torch.stack(out.logits, 1).double()
    for r in range(3):
        if stop.found[r]:
            t = int(stop.step[r])
            assert int(stop.token[r]) == int(tok[r, t])
            exp = torch.log_softmax(raw[r, t], -1)[tok[r, t]]
            assert float(stop.logprob[r]) == pytest.approx(float(exp), abs=1e-5)
            assert torch.equal(stop.rows[r], out.logits[t][r])
            # The same value as the processor's token log-probability at that step.
            lp = proc.token_logprobs(out.sequences)
            assert float(lp[r, t]) == pytest.approx(float(stop.logprob[r]), abs=1e-6)
        else:
            assert torch.isnan(stop.logprob[r]) and int(stop.token[r]) == -1
    if bool(stop.found.all()):
        assert tok.shape[1] == int(stop.step.max()) + 1, "generation stops once all answered"


def test_stop_at_answer_with_a_mask_per_row(llama):
    """Rows with different answer sets (items with different option counts): row r stops
    at the first token in ITS row of the mask; a token that answers another row does not."""
    ids, mask = _left_padded_batch(seed=21)
    with torch.no_grad():
        probe = llama.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                               do_sample=False, eos_token_id=None, pad_token_id=PAD)
    gen = probe[:, ids.shape[1]:]
    assert gen[1, 0] != gen[1, 2], "fixture: row 1's first token must not be its answer"
    v = llama.config.vocab_size
    answers = torch.zeros(3, v, dtype=torch.bool)
    answers[0, gen[0, 3]] = True
    answers[0, gen[1, 0]] = True  # answers row 0, not row 1 (which writes it at step 0)
    answers[1, gen[1, 2]] = True
    # row 2: no answer at all
    proc = CalibratedLogitsProcessor(temperature=1.0)
    stop = StopAtAnswer(proc, answers)
    out = llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                         stopping_criteria=[stop], max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD, return_dict_in_generate=True)
    tok = out.sequences[:, ids.shape[1]:]
    is_ans = answers.gather(1, tok)
    first = torch.where(is_ans.any(1), is_ans.float().argmax(1), torch.full((3,), -1))
    assert torch.equal(stop.found, is_ans.any(1)) and torch.equal(stop.step, first)
    assert int(stop.step[1]) >= 1 and int(stop.token[1]) == int(gen[1, 2])
    assert not stop.found[2] and int(stop.step[2]) == -1
    with pytest.raises(ValueError, match="per-row answer mask for 2 rows"):
        StopAtAnswer(proc, answers[:2])(tok[:, :1], torch.zeros(3, v))
    with pytest.raises(TypeError, match="bool"):
        StopAtAnswer(proc, torch.zeros(3, v))
    with pytest.raises(ValueError, match=">= 0"):
        StopAtAnswer(proc, [3, -1])


# --------------------------------------------------------------------------- hot-path rules

_PKG_DIR = os.path.dirname(os.path.abspath(mllmcal.__file__))
_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def _called_from_mllmcal() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if os.path.abspath(f.f_code.co_filename).startswith(_PKG_DIR + os.sep):
            return True
        f = f.f_back
    return False


class _NoSync:
    """Make host-synchronising tensor methods raise when called from mllmcal code."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}
        self.calls = []
        for name, orig in self.saved.items():
            def guard(t, *a, _orig=orig, _name=name, **k):
                if _called_from_mllmcal():
                    self.calls.append(_name)
                    raise AssertionError(f"host sync: Tensor.{_name} called from mllmcal")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, guard)
        return self

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(torch.Tensor, name, orig)


def test_guard_catches_a_host_sync_in_mllmcal():
    x = torch.randn(4, 9)
    with _NoSync() as g, pytest.raises(AssertionError, match="host sync"):
        # Per-row temperature validation reads a device tensor on the host.
        mllmcal.token_stats(x, temperature=torch.full((4,), 2.0), validate=True)
    assert g.calls


@pytest.mark.parametrize("do_sample", [False, True])
def test_no_host_sync_during_generate(llama, do_sample):
    ids, mask = _left_padded_batch(seed=10)
    proc = CalibratedLogitsProcessor(temperature=1.3, eos_token_id=EOS)
    with _NoSync() as g:
        torch.manual_seed(0)
        out = llama.generate(
            input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=6,
            do_sample=do_sample, eos_token_id=EOS, pad_token_id=PAD,
            return_dict_in_generate=True, output_logits=True,
        )
    assert g.calls == []
    _check_against_raw(proc, out, ids.shape[1], 1.3, [EOS])


def _held_tensors(obj, seen=None, out=None):
    """Every tensor reachable from obj through attributes and containers (not weakrefs)."""
    seen = set() if seen is None else seen
    out = {} if out is None else out
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None), type)):
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        out[st.data_ptr()] = (st.nbytes(), obj.numel(), tuple(obj.shape))
        return out
    if isinstance(obj, dict):
        items = list(obj.values()) + list(obj.keys())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif dataclasses.is_dataclass(obj):
        items = [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type(sys)):
        items = list(vars(obj).values())
    elif hasattr(type(obj), "__slots__"):
        items = [getattr(obj, k, None) for k in type(obj).__slots__]
    else:
        items = []
    for it in items:
        _held_tensors(it, seen, out)
    return out


@pytest.mark.parametrize("vocab", [160, 640])
def test_memory_held_is_o_of_batch_times_steps_and_never_b_by_v(vocab):
    model = _tiny_llama(vocab=vocab, seed=2)
    ids, mask = _left_padded_batch(seed=11)
    held = {}
    for steps in (3, 11):
        proc = CalibratedLogitsProcessor(temperature=1.5)
        model.generate(
            input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=steps,
            min_new_tokens=steps, do_sample=True, eos_token_id=EOS, pad_token_id=PAD,
        )
        tensors = _held_tensors(proc)
        # Exactly one tensor that grows with V: the [B, 2, V] buffer with the last step's z
        # (its token is known only from out.sequences) and the column ids.
        big = [shape for _, n, shape in tensors.values() if n >= vocab]
        assert big == [(ids.shape[0], 2, vocab)], tensors
        held[steps] = sum(b for b, _, _ in tensors.values())
        assert proc.nbytes() == held[steps]
    per_step = (held[11] - held[3]) / 8
    b = ids.shape[0]
    # fp32 [7, B] stats, int64 prediction, uint8 flags, fp32 z and id of the chosen token.
    assert 0 < per_step <= b * (7 * 4 + 8 + 1 + 2 * 4)
    assert held[3] < 3 * per_step + b * 2 * vocab * 4 + 4096


def test_finish_releases_the_buffer(llama):
    ids, mask = _left_padded_batch(seed=11)
    proc = CalibratedLogitsProcessor(temperature=1.5)
    out = llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                         max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    lp = proc.finish(out)
    assert lp.shape == (3, 4)
    assert max(n for _, n, _ in _held_tensors(proc).values()) < V
    torch.testing.assert_close(proc.token_logprobs(out), lp, rtol=0, atol=0)


class _OpCounter:
    """Counts what one processor call dispatches to torch (TorchDispatchMode), by kind."""

    ALLOC = {"empty", "empty_like", "empty_strided", "new_empty"}

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.ops.append((func.overloadpacket.__name__, func.is_view,
                                    str(func.namespace)))
                return func(*args, **(kwargs or {}))

        self.mode = _Mode()
        self.ops = []

    def device_ops(self):
        """Ops that do work on the device: not views, not bare allocations."""
        return [name for name, view, _ in self.ops if not view and name not in self.ALLOC]


@pytest.mark.parametrize("scale_scores", [False, True])
def test_one_fused_op_and_one_gather_per_decode_step(llama, scale_scores):
    """An earlier, frame-walking processor did 9 device ops per decode step: 2 in the
    processor (plus 3 allocations), 6 in its companion stopping criterion, and the
    raw-pointer kernel launch that no dispatch mode saw. Now: the mllmcal.token_stats op
    and one gather; a copy more when it returns scaled scores."""
    counts = []

    class Counted(CalibratedLogitsProcessor):
        def __call__(self, input_ids, scores):
            c = _OpCounter()
            with c.mode:
                r = super().__call__(input_ids, scores)
            counts.append(c)
            return r

    ids, mask = _left_padded_batch(seed=12)
    proc = Counted(temperature=1.4, eos_token_id=EOS, scale_scores=scale_scores)
    out = llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                         max_new_tokens=6, do_sample=True, eos_token_id=EOS, pad_token_id=PAD,
                         return_dict_in_generate=True, output_logits=True)
    first, steps = counts[0], counts[1:]
    assert len(steps) >= 3
    want = ["token_stats", "gather"] + (["clone"] if scale_scores else [])
    for c in steps:
        assert sorted(c.device_ops()) == sorted(want), c.ops
        assert ("token_stats", False, "mllmcal") in c.ops
    # The first step allocates the run's buffer, writes its plane of column ids once
    # (arange, copy_), and has no previous token to gather.
    assert sorted(first.device_ops()) == sorted([w for w in want if w != "gather"]
                                                + ["arange", "copy_"])
    _check_against_raw(proc, out, ids.shape[1], 1.4, [EOS])


# --------------------------------------------------------------------------- score_tokens


@dataclasses.dataclass
class _CollectingState:
    """Stands in for CalibrationState: keeps what update_logits receives."""

    label_logprob: list = dataclasses.field(default_factory=list)
    widths: list = dataclasses.field(default_factory=list)

    def update_logits(self, logits, labels, temperature=1.0, ignore_index=-100):
        self.widths.append(logits.shape[1])
        s = mllmcal.token_stats(logits, labels=labels, temperature=temperature,
                                ignore_index=ignore_index)
        self.label_logprob.append(s.label_logprob)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_score_tokens_chunks_positions_and_matches_full_forward(llama, chunk_size):
    ids, mask = _left_padded_batch(seed=12)
    st = score_tokens(llama, ids, mask, state=_CollectingState(), chunk_size=chunk_size,
                      temperature=1.4)
    if chunk_size is not None:
        assert max(st.widths) <= chunk_size and sum(st.widths) == ids.shape[1]
    got = torch.cat(st.label_logprob, dim=1)
    with torch.no_grad():
        logits = llama(input_ids=ids, attention_mask=mask).logits.double()
    target = ids[:, 1:]
    exp = torch.log_softmax(logits[:, :-1] / 1.4, -1).gather(2, target[..., None]).squeeze(2)
    keep = mask[:, 1:].bool()
    torch.testing.assert_close(got[:, :-1][keep].double(), exp[keep], rtol=0, atol=1e-5)
    assert torch.isnan(got[:, :-1][~keep]).all() and torch.isnan(got[:, -1]).all()


def test_score_tokens_llava_skips_image_tokens():
    model = _tiny_llava()
    ids, mask, pixels = _llava_inputs()
    st = score_tokens(model, ids, mask, state=_CollectingState(), chunk_size=2,
                      pixel_values=pixels)
    got = torch.cat(st.label_logprob, dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits.double()
    exp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
    keep = ids[:, 1:] != V - 1
    torch.testing.assert_close(got[:, :-1][keep].double(), exp[keep], rtol=0, atol=1e-5)
    assert torch.isnan(got[:, :-1][~keep]).all()


def test_score_tokens_rejects_mismatched_shapes(llama):
    ids, mask = _left_padded_batch(seed=13)
    with pytest.raises(ValueError, match="attention_mask"):
        score_tokens(llama, ids, mask[:, 1:], state=_CollectingState())
    with pytest.raises(ValueError, match="temperature"):
        score_tokens(llama, ids, mask, state=_CollectingState(), temperature=-1.0)


# --------------------------------------------------------------------------- feedback


def test_delayed_feedback_by_request_id_and_row_feeds_the_calibration_state(llama):
    from mllmcal.calibration import CalibrationState

    proc = CalibratedLogitsProcessor(temperature=1.2, n_bins=10, eos_token_id=EOS)
    outs = []
    for seed, rids in ((14, ["a", "b", "c"]), (15, ["d", "e", "f"])):
        ids, mask = _left_padded_batch(seed=seed)
        proc.request_ids = rids
        torch.manual_seed(seed)
        outs.append((ids.shape[1], llama.generate(
            input_ids=ids, attention_mask=mask, logits_processor=[proc], max_new_tokens=5,
            do_sample=True, top_k=0, eos_token_id=EOS, pad_token_id=PAD,
            return_dict_in_generate=True, output_logits=True,
        )))
        proc.finish(outs[-1][1].sequences)  # the last tokens become known
    proc.add_feedback("b", True)
    proc.add_feedback(["a", "f"], [False, True])
    proc.add_feedback(0, True)  # row 0 of the latest run, i.e. request "d"
    with pytest.raises(KeyError, match="'b'"):
        proc.add_feedback("b", True)

    def product(run: int, row: int) -> float:
        plen, out = outs[run]
        lp = _expected_logprobs(out, plen, 1.2)[row]
        keep = ~_after_first_eos(out.sequences[row:row + 1, plen:], [EOS])[0]
        return float(lp[keep].sum().exp())

    ref = CalibrationState(n_bins=10)
    ref.update(
        torch.tensor([product(0, 1), product(0, 0), product(1, 2), product(1, 0)]),
        torch.tensor([True, False, True, True]),
    )
    assert proc.state.count == 4
    torch.testing.assert_close(proc.state.hist[0], ref.hist[0], rtol=0, atol=0)
    torch.testing.assert_close(proc.state.hist[2], ref.hist[2], rtol=0, atol=0)
    assert proc.state.mean_confidence() == pytest.approx(ref.mean_confidence(), abs=1e-6)
    snap = proc.snapshot()
    assert snap["pending_feedback"] == 2 and snap["feedback"] == 4
    assert snap["calibration"]["count"] == 4
    assert snap["calibration"]["ece"] == pytest.approx(ref.ece(), abs=1e-6)


def test_rows_of_a_run_ended_without_its_last_tokens_are_dropped_with_a_warning(llama):
    ids, mask = _left_padded_batch(seed=16)
    proc = CalibratedLogitsProcessor()
    proc.request_ids = ["x", "y", "z"]
    llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                   max_new_tokens=2, do_sample=False, pad_token_id=PAD)
    with pytest.raises(RuntimeError, match="finish"):
        proc.add_feedback("x", True)
    with pytest.warns(RuntimeWarning, match="finish"):
        proc.reset()
    with pytest.raises(KeyError):
        proc.add_feedback("y", True)


def test_request_ids_must_match_the_batch(llama):
    ids, mask = _left_padded_batch(seed=16)
    proc = CalibratedLogitsProcessor()
    proc.request_ids = ["only-one"]
    with pytest.raises(ValueError, match="request_ids"):
        llama.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                       max_new_tokens=2, pad_token_id=PAD)


def test_score_tokens_into_calibration_state_equals_one_full_pass(llama):
    from mllmcal.calibration import CalibrationState

    ids, mask = _left_padded_batch(seed=17)
    st = score_tokens(llama, ids, mask, chunk_size=2, temperature=0.8, n_bins=12)
    with torch.no_grad():
        logits = llama(input_ids=ids, attention_mask=mask).logits
    target = torch.where(mask.bool(), ids, torch.full_like(ids, -100))[:, 1:]
    ref = CalibrationState(n_bins=12)
    ref.update_logits(logits[:, :-1], target, temperature=0.8)
    assert st.count == int(mask[:, 1:].sum()) > 0
    # Counts and correctness are exact; Σ confidence may differ in the last bits because
    # lm_head on a chunk of positions is a different matmul shape than the full forward.
    assert torch.equal(st.hist[0], ref.hist[0]) and torch.equal(st.hist[2], ref.hist[2])
    torch.testing.assert_close(st.hist[1].double(), ref.hist[1].double(), rtol=1e-5, atol=2**32 * 1e-6)
    assert st.nll() == pytest.approx(ref.nll(), rel=1e-6)


# --------------------------------------------------------------------------- runs


def _prompts(seed: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, V, (batch, length), generator=g)


def _teacher_forced(model, sequences: torch.Tensor, prompt_len: int, temperature: float):
    """float64 log_softmax(model(sequences) / T) at each generated token, [B, new]: the
    oracle that needs nothing from the generate call (unpadded prompts)."""
    with torch.no_grad():
        logits = model(input_ids=sequences).logits.double()
    lp = torch.log_softmax(logits[:, prompt_len - 1:-1] / temperature, -1)
    return lp.gather(2, sequences[:, prompt_len:, None]).squeeze(2)


def test_beam_search_is_refused_every_time_or_exact(llama):
    """num_return_sequences == num_beams gives as many rows as the processor saw, so the
    row-count check cannot catch it: over many seeds, each run is a clear error or (one
    step, where every beam of a prompt saw the same distribution) exact."""
    refused = exact = 0
    for seed in range(80):
        beams, steps = 2 + seed % 2, 1 + seed % 7
        t = (0.7, 1.0, 1.6)[seed % 3]
        ids = _prompts(seed, 2, 3 + seed % 4)
        proc = CalibratedLogitsProcessor(temperature=t)
        torch.manual_seed(seed)
        try:
            out = llama.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=[proc],
                num_beams=beams, num_return_sequences=beams, do_sample=seed % 4 == 3,
                max_new_tokens=steps, eos_token_id=None, pad_token_id=PAD,
                return_dict_in_generate=True,
            )
            lp = proc.token_logprobs(out.sequences)
        except ValueError as e:
            assert "beam search" in str(e), e
            refused += 1
            continue
        exp = _teacher_forced(llama, out.sequences, ids.shape[1], t)
        torch.testing.assert_close(lp.double(), exp, rtol=0, atol=1e-4, msg=f"seed {seed}")
        exact += 1
    assert refused > 60 and exact > 0


def test_request_ids_set_between_calls_stay_with_their_call(llama):
    """Set ["a","b"], generate(P), set ["c","d"], generate(out1.sequences), finish(out2):
    "c" and "d" belong to the second call, nothing is left for a later call to take."""
    proc = CalibratedLogitsProcessor(temperature=1.3)
    ids = _prompts(30, 2, 4)
    proc.request_ids = ["a", "b"]
    out1 = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                          logits_processor=[proc], max_new_tokens=3, do_sample=False,
                          eos_token_id=None, pad_token_id=PAD)
    proc.request_ids = ["c", "d"]
    with pytest.warns(RuntimeWarning, match="finish"):  # "a", "b" never got their last token
        out2 = llama.generate(input_ids=out1, attention_mask=torch.ones_like(out1),
                              logits_processor=[proc], max_new_tokens=4, do_sample=True,
                              top_k=0, eos_token_id=None, pad_token_id=PAD,
                              return_dict_in_generate=True, output_logits=True)
    lp = proc.finish(out2.sequences)
    exp = _expected_logprobs(out2, out1.shape[1], 1.3)
    assert lp.shape == exp.shape == (2, 4)
    torch.testing.assert_close(lp.double(), exp, rtol=0, atol=1e-5)
    proc.add_feedback("c", True)
    assert proc.monitor.n_pending == 1
    # An unrelated later call takes nothing; "d" is still the second call's row 1.
    llama.generate(input_ids=_prompts(31, 2, 6), logits_processor=[proc], max_new_tokens=2,
                   do_sample=False, eos_token_id=None, pad_token_id=PAD)
    proc.add_feedback("d", False)
    conf = torch.tensor([float(exp[0].sum().exp()), float(exp[1].sum().exp())])
    from mllmcal.calibration import CalibrationState

    ref = CalibrationState(n_bins=proc.n_bins)
    ref.update(conf, torch.tensor([True, False]))
    assert proc.state.count == 2
    torch.testing.assert_close(proc.state.hist.double(), ref.hist.double(), rtol=0, atol=2**32 * 1e-5)
    with pytest.raises(KeyError):
        proc.add_feedback("a", True)


def test_a_second_prompt_of_the_first_prompt_plus_other_tokens_is_never_merged_silently(llama):
    """The second prompt is the first plus k other tokens, k = the first call's steps: it
    has exactly the length of the first call's next step."""
    k = 5
    ids = _prompts(32, 2, 4)
    other = torch.cat([ids, _prompts(33, 2, k)], 1)
    for scoped in (False, True):
        proc = CalibratedLogitsProcessor(temperature=1.2)
        gen = dict(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=PAD,
                   return_dict_in_generate=True, output_logits=True)
        if scoped:
            with proc.run():
                llama.generate(input_ids=ids, logits_processor=[proc], max_new_tokens=k,
                               do_sample=False, eos_token_id=None, pad_token_id=PAD)
            with proc.run() as run:
                out2 = llama.generate(input_ids=other, logits_processor=[proc], **gen)
            lp = run.finish(out2.sequences)
            assert lp.shape == (2, 4)
            torch.testing.assert_close(lp.double(), _expected_logprobs(out2, other.shape[1], 1.2),
                                       rtol=0, atol=1e-5)
        else:
            llama.generate(input_ids=ids, logits_processor=[proc], max_new_tokens=k,
                           do_sample=False, eos_token_id=None, pad_token_id=PAD)
            out2 = llama.generate(input_ids=other, logits_processor=[proc], **gen)
            with pytest.raises(ValueError, match=r"proc\.run"):
                proc.token_logprobs(out2.sequences)


@pytest.mark.parametrize("scoped", [False, True])
def test_a_processor_reused_across_batches_never_flips_with_the_lengths(llama, scoped):
    """Batches whose padded prompt length equals the previous one plus its steps, and
    batches whose length does not: the same calls give the same outcome, exact."""
    proc = CalibratedLogitsProcessor(temperature=0.9)
    prev = None
    coincided = 0
    for i, (plen, steps) in enumerate([(4, 3), (7, 2), (9, 5), (5, 4), (9, 3), (12, 3)]):
        ids, mask = _left_padded_batch(seed=40 + i, lengths=(plen, max(plen - 2, 1), plen))
        coincided += prev is not None and plen == prev
        kw = dict(input_ids=ids, attention_mask=mask, logits_processor=[proc],
                  max_new_tokens=steps, do_sample=bool(i % 2), top_k=0, eos_token_id=None,
                  pad_token_id=PAD, return_dict_in_generate=True,
                  output_logits=True)
        torch.manual_seed(i)
        if scoped:
            with proc.run() as run:
                out = llama.generate(**kw)
            lp = run.finish(out.sequences)
        else:
            out = llama.generate(**kw)
            lp = proc.token_logprobs(out.sequences)
        torch.testing.assert_close(lp.double(), _expected_logprobs(out, plen, 0.9), rtol=0, atol=1e-5)
        prev = plen + steps
    assert coincided == 4


def test_run_scope_rules(llama):
    proc = CalibratedLogitsProcessor(temperature=1.1)
    ids, ids2 = _prompts(50, 2, 4), _prompts(51, 2, 6)
    gen = dict(logits_processor=[proc], max_new_tokens=3, do_sample=False, eos_token_id=None,
               pad_token_id=PAD)
    with proc.run() as run, pytest.raises(ValueError, match="one generate call"):
        out = llama.generate(input_ids=ids, **gen)
        run.finish(out)  # read inside the block: the run is over
        llama.generate(input_ids=out, **gen)
    # One generate call per scope: another prompt inside the same scope is an error.
    with proc.run(request_ids=["a", "b"]), pytest.raises(ValueError, match="one generate call"):
        out = llama.generate(input_ids=ids, **gen)
        llama.generate(input_ids=ids2, **gen)
    with pytest.raises(RuntimeError, match="already open"), proc.run(), proc.run():
        pass
    # A scope's run is finished after the block; the next scope's first call starts afresh
    # even when its prompt is the previous output (which a shape could not tell apart).
    with proc.run(request_ids=["a", "b"]) as r1, pytest.warns(RuntimeWarning, match="finish"):
        out1 = llama.generate(input_ids=ids, **gen)  # the refused scope's rows are dropped
    with pytest.raises(RuntimeError, match="request_ids"), proc.run():
        proc.request_ids = ["x", "y"]
    with proc.run(request_ids=["c", "d"]) as r2, pytest.warns(RuntimeWarning, match="finish"):
        out2 = llama.generate(input_ids=out1, **gen)  # "a", "b" were never finished
    with pytest.raises(RuntimeError, match="before the next generate"):
        r1.finish(out1)  # too late: r2 released r1's buffer (and dropped its rows)
    assert r2.n_steps == 3 and r2.finish(out2).shape == (2, 3)
    assert proc.monitor.n_pending == 2 and proc.monitor.get("a") is None
    with pytest.raises(RuntimeError, match="no decode step"):
        with proc.run() as empty:
            pass
        empty.token_logprobs(out)


def test_telling_runs_apart_by_shapes_warns_once(llama):
    proc = CalibratedLogitsProcessor()
    gen = dict(logits_processor=[proc], max_new_tokens=2, do_sample=False, eos_token_id=None,
               pad_token_id=PAD)
    llama.generate(input_ids=_prompts(52, 2, 4), **gen)  # never read
    with pytest.warns(FutureWarning, match=r"proc\.run"):
        out = llama.generate(input_ids=_prompts(53, 2, 7), **gen)
    proc.finish(out)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = llama.generate(input_ids=_prompts(54, 2, 3), **gen)  # the previous was read
        proc.finish(out)
