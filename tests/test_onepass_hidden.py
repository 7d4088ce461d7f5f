"""``TemperatureFitAccumulator.update_hidden``: the one-pass fit's sums from hidden states
and the head, against ``update`` on the materialised float64 logits.

Tiles are made small (8 rows x 48 columns) so every test crosses several row chunks and
vocabulary tiles, with H and V not multiples of them.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LargestTensor, backends_with_triton

from mllmcal import linear as L
from mllmcal.calibration import TemperatureFitAccumulator

NEG = float("-inf")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


BACKENDS = backends_with_triton("mllmcal.kernels.temperature_fit")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(L, "DEFAULT_ROW_CHUNK", 8)
    monkeypatch.setattr(L, "DEFAULT_VOCAB_TILE", 48)
    monkeypatch.setattr(L, "DEFAULT_VOCAB_TILE_FP32", 48)


def head_data(n=70, v=131, hd=37, dtype=torch.float32, seed=0, scale=2.0, t_true=1.7,
              bias=False):
    """hidden [n, hd], weight [v, hd] (cast to dtype), optional bias, labels drawn from
    softmax(logits / t_true) with every 7th row (from row 3) ignored."""
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hd, generator=g) * scale / math.sqrt(hd) * 3).to(dtype)
    w = torch.randn(v, hd, generator=g).to(dtype)
    b = torch.randn(v, generator=g) if bias else None
    z = logits64(h, w, b)
    y = torch.multinomial(torch.softmax(z / t_true, 1).float(), 1, generator=g).squeeze(1)
    y[3::7] = -100
    return h, w, b, y


def logits64(h, w, bias=None):
    z = h.double() @ w.double().T
    return z if bias is None else z + bias.double()


def assert_same_sums(a, b, rtol=1e-5, fit_rtol=1e-6):
    """Same counts; sums equal to ``rtol`` of each entry (the fit kernels return fp32 per
    row, so ~1e-6 relative is what even ``update`` on fp32 logits achieves; a floor at 1e-3
    of the largest entry, for terms near 0 such as the gradient's sign change); fits equal."""
    assert (a.n_rows, a.n_masked) == (b.n_rows, b.n_masked)
    for key in ("nll", "grad", "curv"):
        x, y = getattr(a, key), getattr(b, key)
        floor = 1e-3 * float(x.abs().max()) + 1e-300  # all-zero sums compare equal
        err = ((x - y).abs() / (x.abs() + floor)).max()
        assert float(err) <= rtol, (key, float(err))
    if a.n_rows:
        ta, tb = a.fit(), b.fit()
        assert abs(ta - tb) <= fit_rtol * ta, (ta, tb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_equals_update_on_float64_logits(backend, dtype, bias):
    h, w, b, y = head_data(dtype=dtype, bias=bias, seed=1 + bias)
    ref = TemperatureFitAccumulator(backend="torch").update(logits64(h, w, b), y)
    got = TemperatureFitAccumulator(backend=backend).update_hidden(h, w, y, bias=b)
    assert got.n_rows == int((y != -100).sum())
    assert_same_sums(ref, got)


@pytest.mark.parametrize("n, v, hd", [(1, 1, 1), (3, 47, 5), (9, 49, 3), (17, 200, 65)])
def test_odd_shapes_and_leading_dims(n, v, hd):
    h, w, _, y = head_data(n=n, v=v, hd=hd, seed=n + v)
    ref = TemperatureFitAccumulator(backend="torch").update(logits64(h, w), y)
    # [..., H] with leading dims: the same rows as a flat batch.
    got = TemperatureFitAccumulator(backend="cpu").update_hidden(
        h.reshape(1, n, hd), w, y.reshape(1, n))
    assert_same_sums(ref, got)


def test_tied_embedding_head():
    # The head is the embedding matrix and the hidden states are near its rows: peaked
    # logits (confidence near 1), labels mostly the next token.
    v, hd = 150, 40
    emb = torch.nn.Embedding(v, hd)
    torch.nn.init.normal_(emb.weight, std=0.6, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, v, (4, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = emb(ids) + 0.3 * torch.randn(4, 30, hd, generator=torch.Generator().manual_seed(5))
    y = torch.roll(ids, -1, dims=1)
    y[:, -1] = -100
    y[::2, 3] = ids[::2, 3]  # some labels are the token itself, the head's favourite
    ref = TemperatureFitAccumulator(backend="torch").update(
        logits64(hidden.reshape(-1, hd), emb.weight), y.reshape(-1))
    got = TemperatureFitAccumulator().update_hidden(hidden, emb.weight, y)
    assert_same_sums(ref, got)


def test_hostile_rows_masks_nan_and_huge_norms():
    h, w, b, y = head_data(n=64, v=130, hd=24, bias=True, seed=7)
    b[48:96] = NEG           # one whole tile of the vocabulary masked: no mass there
    b[5] = NEG               # a masked token
    g = torch.Generator().manual_seed(70)  # labels redrawn where there is mass
    y = torch.multinomial(torch.softmax(logits64(h, w, b), 1).float(), 1, generator=g).squeeze(1)
    y[::9] = -100
    y[3] = 5                 # the masked token as a label: counted in n_masked
    y[4] = 60                # a label inside the masked tile: masked too
    h[10, 2] = float("nan")  # a NaN hidden state: the row is invalid, skipped
    h[20:30] *= 400.0        # huge norms: logits ~1e3-1e4, one-hot softmax at small T
    ref = TemperatureFitAccumulator(backend="torch").update(logits64(h, w, b), y)
    got = TemperatureFitAccumulator().update_hidden(h, w, y, bias=b)
    assert got.n_masked == 2 and got.n_rows == int((y != -100).sum()) - 3
    assert_same_sums(ref, got)


def test_posinf_bias_makes_every_row_invalid_and_all_ignored_adds_nothing():
    h, w, b, y = head_data(n=12, v=60, hd=8, bias=True, seed=8)
    b[50] = float("inf")
    acc = TemperatureFitAccumulator().update_hidden(h, w, y, bias=b)
    assert (acc.n_rows, acc.n_masked) == (0, 0) and not acc.nll.any()
    acc.update_hidden(h, w, torch.full_like(y, -100))
    acc.update_hidden(torch.zeros(0, 8), w, torch.zeros(0, dtype=torch.long))
    acc.update_hidden(torch.zeros(2, 0, 8), w, torch.zeros(2, 0, dtype=torch.long))
    assert (acc.n_rows, acc.n_masked) == (0, 0) and not acc.nll.any()


def test_grid_mode_and_merge_and_dict_round_trip():
    h, w, _, y = head_data(n=90, seed=9)
    temps = [0.5 + 0.1 * i for i in range(30)]
    ref = TemperatureFitAccumulator(temps, derivatives=False, backend="torch").update(
        logits64(h, w), y)
    got = TemperatureFitAccumulator(temps, derivatives=False).update_hidden(h, w, y)
    assert ref.fit() == got.fit()
    # Two shards merged, and a resumed dict, equal one pass. The cut falls after 40 counted
    # rows (five row chunks of 8), so each shard's GEMMs see the one pass's row chunks: MKL
    # gives a row other last bits in a chunk of another height (M), which the 1e-12 below
    # would catch (it did on an AMD EPYC runner with a cut at row 40).
    one = TemperatureFitAccumulator().update_hidden(h, w, y)
    cut = int(torch.nonzero(y != -100)[40])
    a = TemperatureFitAccumulator().update_hidden(h[:cut], w, y[:cut])
    b = TemperatureFitAccumulator().update_hidden(h[cut:], w, y[cut:])
    a = TemperatureFitAccumulator.from_dict(a.to_dict()).merge(b)
    assert_same_sums(one, a, rtol=1e-12, fit_rtol=1e-12)
    # update and update_hidden mix in one accumulator.
    mixed = TemperatureFitAccumulator().update(logits64(h[:cut], w).float(), y[:cut])
    mixed.update_hidden(h[cut:], w, y[cut:])
    assert_same_sums(one, mixed)


def test_validation_errors():
    h, w, _, y = head_data(n=6, v=20, hd=4, seed=10)
    acc = TemperatureFitAccumulator()
    with pytest.raises(ValueError, match="outside"):
        acc.update_hidden(h, w, torch.full_like(y, 20))
    with pytest.raises(ValueError, match="leading shape"):
        acc.update_hidden(h, w, y[:5])
    with pytest.raises(TypeError, match="integer"):
        acc.update_hidden(h, w, y.float())
    with pytest.raises(TypeError, match="bfloat16 but weight"):
        acc.update_hidden(h.bfloat16(), w, y)
    with pytest.raises(ValueError, match="expected hidden"):
        acc.update_hidden(h, w[:, :3], y)
    with pytest.raises(ValueError, match="bias"):
        acc.update_hidden(h, w, y, bias=torch.zeros(19))
    assert acc.n_rows == 0


def test_never_allocates_n_by_v():
    n, v, hd = 64, 2000, 4
    h, w, _, y = head_data(n=n, v=v, hd=hd, seed=11)
    acc = TemperatureFitAccumulator()
    with LargestTensor() as largest:
        acc.update_hidden(h, w, y)
    assert acc.n_rows > 0
    # The largest tensor any op made is the weight (8000 numbers) or one chunk's fit output
    # [8, 3, K] / tile [8, 48]; the logits would be N x V = 128000.
    k = len(acc.betas)
    assert largest.numel <= max(v * hd, 8 * 3 * k, 8 * 48), largest.numel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_update_on_float64_logits(dtype):
    h, w, b, y = head_data(n=300, v=1000, hd=64, dtype=dtype, bias=True, seed=12)
    ref = TemperatureFitAccumulator(backend="torch").update(logits64(h, w, b), y)
    got = TemperatureFitAccumulator().update_hidden(h.cuda(), w.cuda(), y.cuda(), bias=b.cuda())
    assert_same_sums(ref, got)
