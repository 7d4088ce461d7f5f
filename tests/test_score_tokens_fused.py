"""``score_tokens``'s fused route (hidden states + the head's weight through
``linear_token_stats``) against its chunked-logits route, on tiny real checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from checkpoints import TEXT_BUILDERS

from mllmcal.calibration import CalibrationState
from mllmcal.integrations.transformers import score_tokens

TEXTS = ["What colour is the shape in the picture? (A) red (B) blue (C) green"]


@pytest.fixture(scope="module", params=list(TEXT_BUILDERS))
def checkpoint(request, tmp_path_factory):
    return TEXT_BUILDERS[request.param](tmp_path_factory.mktemp(request.param), TEXTS)


def _batch(vocab: int, seed: int = 0, b: int = 3, length: int = 11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, :2] = 0
    return ids, mask


class _HeadCalls:
    """Counts calls of the model's output embedding (the chunked route calls it)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, *args):
        self.n += 1


def _both_routes(model, ids, mask, **kw):
    calls = _HeadCalls(model)
    fused = score_tokens(model, ids, mask, n_bins=10, **kw)
    n_fused = calls.n
    chunked = score_tokens(model, ids, mask, n_bins=10, fused=False, chunk_size=3, **kw)
    calls.handle.remove()
    return fused, chunked, n_fused, calls.n - n_fused


def _assert_same_state(a: CalibrationState, b: CalibrationState, rel: float) -> None:
    assert a.count == b.count > 0
    assert torch.equal(a.hist[0], b.hist[0]) and torch.equal(a.hist[2], b.hist[2])
    assert a.mean_confidence() == pytest.approx(b.mean_confidence(), rel=rel)
    assert a.nll() == pytest.approx(b.nll(), rel=rel)
    assert a.brier() == pytest.approx(b.brier(), rel=rel)


@pytest.mark.parametrize("temperature, tied", [(1.0, False), (0.7, False), (1.0, True)])
def test_fused_route_equals_logits_route_fp32(checkpoint, temperature, tied):
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    if tied:  # a tied head: the output embedding IS the input embedding matrix
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (head.data_ptr() == model.get_input_embeddings().weight.data_ptr()) == tied
    ids, mask = _batch(model.config.vocab_size, seed=1)
    fused, chunked, n_fused, n_chunked = _both_routes(model, ids, mask, temperature=temperature)
    assert n_fused == 0 and n_chunked == 4  # the fused route never runs the head
    _assert_same_state(fused, chunked, rel=1e-5)


def test_fused_route_bf16_is_the_fp32_logits_of_the_bf16_model(checkpoint):
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=torch.bfloat16).eval()
    ids, mask = _batch(model.config.vocab_size, seed=2)
    calls = _HeadCalls(model)
    fused = score_tokens(model, ids, mask, n_bins=10)
    assert calls.n == 0
    # The reference: the same bf16 hidden states through the head in fp32.
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = hidden.float() @ model.get_output_embeddings().weight.float().T
    target = torch.where(mask.bool(), ids, -100)[:, 1:]
    ref = CalibrationState(n_bins=10)
    ref.update_logits(logits[:, :-1], target)
    _assert_same_state(fused, ref, rel=1e-5)


def test_logit_scale_is_folded_and_softcapping_falls_back(checkpoint):
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids, mask = _batch(model.config.vocab_size, seed=3)
    model.config.logit_scale = 0.5  # as Cohere's config: logits * 0.5 after the head
    fused, chunked, n_fused, _ = _both_routes(model, ids, mask, temperature=0.8)
    assert n_fused == 0
    _assert_same_state(fused, chunked, rel=1e-5)
    chunked_scaled = score_tokens(model, ids, mask, n_bins=10, temperature=0.4, fused=False)
    model.config.logit_scale = None
    # x * 0.5 / 0.8 == x / 1.6 and x * 0.5 / 0.4 == x / 0.8: the scale really is applied.
    _assert_same_state(fused, score_tokens(model, ids, mask, n_bins=10, temperature=1.6),
                       rel=1e-5)
    _assert_same_state(chunked_scaled, score_tokens(model, ids, mask, n_bins=10, temperature=0.8),
                       rel=1e-5)
    model.config.final_logit_softcapping = 2.0  # a tanh: the fused route cannot apply it
    calls = _HeadCalls(model)
    capped = score_tokens(model, ids, mask, n_bins=10)
    assert calls.n > 0
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    ref = CalibrationState(n_bins=10)
    ref.update_logits(torch.tanh(logits[:, :-1] / 2.0) * 2.0,
                      torch.where(mask.bool(), ids, -100)[:, 1:])
    _assert_same_state(capped, ref, rel=1e-5)


def test_llava_fused_route_equals_logits_route():
    from test_integration_transformers import _llava_inputs, _tiny_llava

    model = _tiny_llava()
    ids, mask, pixels = _llava_inputs()
    fused, chunked, n_fused, n_chunked = _both_routes(model, ids, mask, pixel_values=pixels)
    assert n_fused == 0 and n_chunked > 0
    _assert_same_state(fused, chunked, rel=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_a_custom_ignore_index_reaches_every_route(checkpoint, fused):
    # The chunked route used to pass the default ignore_index to update_logits, so the
    # padding that score_tokens itself marked with ignore_index=-1 was read as a label -1.
    model = tf.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    ids, mask = _batch(model.config.vocab_size, seed=2)
    ref = score_tokens(model, ids, mask, n_bins=10, fused=fused, chunk_size=3)
    got = score_tokens(model, ids, mask, n_bins=10, fused=fused, chunk_size=3, ignore_index=-1)
    assert got.count == ref.count > 0
    assert torch.equal(got.hist, ref.hist)
    assert got.nll() == pytest.approx(ref.nll(), rel=1e-12)
