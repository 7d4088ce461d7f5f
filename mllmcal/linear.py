"""Token statistics straight from hidden states: ``linear_token_stats``.

``linear_token_stats(hidden, weight, ...)`` returns the :class:`~mllmcal.TokenStats` of the
logits ``hidden @ weight.T (+ bias)`` without ever holding those ``[N, V]`` logits. For a
152k vocabulary, 32k tokens of fp32 logits are 19.5 GB; here the extra memory is one
cache-sized tile.

Two routes, both exact in the sense of the contract (tile logits stay fp32, never rounded
to a 16-bit input dtype):

* **tiled** (CPU, and CUDA without Triton): rows in chunks, the vocabulary in tiles; each
  tile's logits go through torch's GEMM into one preallocated fp32 buffer, the fused
  ``token_stats`` op (C++ on the CPU) reads the buffer while it is in cache, and the
  per-tile results are merged exactly (below). bf16 inputs on a CPU with AVX512-BF16 go
  through ``mllmcal._C``'s bf16 GEMM with fp32 output (``csrc/cpu/gemm_bf16.h``: products
  exact, sums fp32), at the speed of a bf16 GEMM; other 16-bit inputs are widened to fp32
  one chunk/tile at a time, which is also the fast GEMM on CPUs without bf16 units.
* **triton** (:mod:`mllmcal.kernels.linear_token_stats`): one kernel in the Cut
  Cross-Entropy style, ``tl.dot`` per vocabulary tile with an online merge in registers.

Merging tiles. Tile t of a row gives, for z restricted to its columns: its max ``m_t``
(read back from the buffer at the tile's argmax, so it is the exact fp32 value), its sum
``S_t = 1 / conf_t`` relative to ``m_t``, entropy ``H_t``, ``E_t[z]``, ``Var_t[z]`` and,
with a label inside every tile (the real one where the tile holds it, else column 0),
``Σ p_t² = brier_t - 1 + 2 p_t,y``. With ``M = max_t m_t`` and, in float64,

    S = Σ_t S_t e^(m_t - M)          logsumexp = M + log S,   confidence = 1 / S
    w_t = S_t e^(m_t - M) / S        (the tile's probability mass)
    entropy = Σ w_t (H_t - log w_t)  E[z] = Σ w_t E_t[z]
    Var[z] = Σ w_t (Var_t[z] + (E_t[z] - E[z])²)      Σ p² = Σ w_t² Σ p_t²
    prediction = the first tile's argmax with m_t = M  (tiles are in column order)
    label_logprob = z_y - M - log S  (z_y read from the buffer of the label's tile)

Tiles where every z is ``-inf`` (a masked block of the vocabulary) carry no mass; a NaN or
``+inf`` anywhere makes the row invalid, as in ``token_stats``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from . import _contract as C
from ._checks import check_histogram, check_labels, check_temperature
from .ops import (
    TokenStats,
    _linear_token_stats_op,
    available_backends,
    resolve_backend,
)

__all__ = [
    "DEFAULT_ROW_CHUNK", "DEFAULT_VOCAB_TILE", "DEFAULT_VOCAB_TILE_FP32", "LogitTiles", "check_linear_inputs",
    "linear_token_stats", "linear_token_stats_into",
]

# Measured on a 2-core Xeon (4 MiB L2 per core, 260 MiB L3) at H = 896: 1024 x 3072 fp32
# (12 MiB, in L3) keeps the GEMM as fast as one big GEMM; 256-row chunks were ~1.5x
# slower in the GEMM. The statistics then read the tile from L3 while it is hot. 3072
# rather than 4096 columns: at N = 8192, V = 151936 the bf16 path's buffers (the tile, and
# the hidden chunk and weight tile widened to fp32) are 44 MiB = 1.9% of the bf16 logits
# (4096: 51 MiB, 2.1%), at the same speed (fused / materialised 0.88x fp32, 0.23x bf16).
# fp32 inputs need no widened copies, so their tile is wider: on a 2-vCPU AMD EPYC (Zen 4,
# 32 MiB L3) MKL's fp32 GEMM ran 1024 x 3072 tiles at 154 GFLOP/s against 170 for
# 1024 x 6144 and 167 for one [1024, 151936] GEMM, and the fused / materialised time at
# N = 8192 went from 1.16x to 1.03x (extra memory 0.82% of the fp32 logits).
# bf16 through mllmcal._C's bf16 GEMM needs no widened copies either, so it takes the
# fp32 tile too: at N = 8192 its 24 MiB buffer is 0.97% of the bf16 logits.
DEFAULT_ROW_CHUNK = 1024
DEFAULT_VOCAB_TILE = 3072  # 16-bit inputs widened to fp32
DEFAULT_VOCAB_TILE_FP32 = 6144  # fp32 inputs, and bf16 through the bf16 GEMM
# bf16 inputs on the CPU use mllmcal._C's bf16 GEMM where the CPU has AVX512-BF16 (False:
# always widen; for tests comparing the two).
USE_BF16_GEMM = True
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Threads of the C++ statistics of each tile (None: torch's count; one OpenMP runtime is
# loaded, torch's libgomp, whose soname the extension links). One is faster here: a helper
# woken after every tile competes with the next tile's GEMM team (best of 5 at N=1024,
# H=896, V=151936 fp32: 2.50 s with 1, 2.75 s with 2, load 3.6).
STATS_THREADS: int | None = 1


# --------------------------------------------------------------------------- tiled route


def _tile_z(buf: torch.Tensor, cols: torch.Tensor, t_col: torch.Tensor | None) -> torch.Tensor:
    """z = x / T (fp32, correctly rounded as the kernels do it) at one column per row."""
    x = buf.gather(1, cols[:, None]).squeeze(1)
    return x if t_col is None else x / t_col


def _merge_chunk(
    m: torch.Tensor, fs: torch.Tensor, pred_t: torch.Tensor, starts: torch.Tensor,
    zy: torch.Tensor | None, poison: torch.Tensor, labelled: torch.Tensor | None,
    y: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-tile states of one row chunk (see the module docstring).

    ``m`` fp64 ``[T, c]`` tile maxima (-inf for tiles with no mass), ``fs`` fp32
    ``[T, 7, c]`` per-tile fstats, ``pred_t`` int64 ``[T, c]`` in-tile argmax, ``starts``
    int64 ``[T]`` first column of each tile, ``zy`` fp64 ``[c]`` scaled label logit,
    ``poison`` bool ``[c]`` (a NaN or +inf seen). Returns fstats fp32 ``[7, c]``, pred
    int64 ``[c]`` and flags uint8 ``[c]``.
    """
    n_tiles, c = m.shape
    big_m = m.max(0).values
    valid = torch.isfinite(big_m) & ~poison
    mref = torch.where(valid, big_m, torch.zeros_like(big_m))
    live = m > float("-inf")
    f = fs.double()
    s_t = torch.where(live, 1.0 / f[:, C.CONF], torch.zeros_like(m))
    rel = torch.where(live, m - mref, torch.full_like(m, float("-inf")))
    a = torch.exp(rel) * s_t
    s = a.sum(0)
    log_s = torch.log(s)
    w = a / s
    pos = w > 0
    logw = torch.where(pos, rel + torch.log(s_t) - log_s, torch.zeros_like(w))
    zero = torch.zeros_like(w)
    ent = torch.where(pos, w * (f[:, C.ENT] - logw), zero).sum(0)
    mean_t = torch.where(pos, f[:, C.MEAN], zero)
    mean = (w * mean_t).sum(0)
    dev = mean_t - mean
    var = torch.where(pos, w * (f[:, C.VAR] + dev * dev), zero).sum(0)
    first = (m == big_m).to(torch.uint8).argmax(0)  # lowest tile attaining the max
    pred = (starts[first] + pred_t.gather(0, first[None]).squeeze(0))
    pred = torch.where(valid, pred, torch.full_like(pred, -1))
    nan = torch.full_like(s, float("nan"))
    out = torch.empty((C.N_FSTATS, c), dtype=torch.float32, device=m.device)
    out[C.LSE] = torch.where(valid, mref + log_s, nan)
    out[C.CONF] = torch.where(valid, 1.0 / s, nan)
    out[C.ENT] = torch.where(valid, ent, nan)
    out[C.MEAN] = torch.where(valid, mean, nan)
    out[C.VAR] = torch.where(valid, var.clamp_min(0.0), nan)
    flags = valid.to(torch.uint8)
    if y is None:
        out[C.LABEL_LOGPROB] = nan
        out[C.BRIER] = nan
    else:
        lp = zy - mref - log_s
        # Σ p_t² of each tile from its Brier score against the label given to it.
        sq_t = f[:, C.BRIER] - 1.0 + 2.0 * torch.exp(f[:, C.LABEL_LOGPROB])
        sq = torch.where(pos, w * w * sq_t, zero).sum(0)
        keep = valid & labelled
        out[C.LABEL_LOGPROB] = torch.where(keep, lp, nan)
        out[C.BRIER] = torch.where(keep, sq - 2.0 * torch.exp(lp) + 1.0, nan)
        flags = flags | ((keep & (pred == y)).to(torch.uint8) << 1)
    return out, pred, flags


class LogitTiles:
    """The fp32 logits ``h @ weight.T + bias`` one ``[rows, cols]`` tile at a time, each
    computed by torch's GEMM into one reused buffer (the tiled route's only memory that
    scales with the problem; shared by :func:`linear_token_stats` and
    :meth:`mllmcal.calibration.TemperatureFitAccumulator.update_hidden`).

    ``h`` ``[N, H]`` and ``weight`` ``[V, H]`` (fp32/bf16/fp16, same dtype and device),
    ``bias`` ``[V]`` or None. Iterating yields ``(r0, r1, tiles)`` per row chunk; ``tiles``
    yields ``(c0, c1, x)`` with ``x`` fp32 ``[r1 - r0, c1 - c0]``, a view of the buffer that
    the next tile overwrites (consume each before asking for the next); 16-bit inputs are
    widened as the module docstring says. ``row_chunk``/``vocab_tile`` default to the
    module's ``DEFAULT_*`` at construction time.
    """

    def __init__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 row_chunk: int | None = None, vocab_tile: int | None = None) -> None:
        self.h, self.weight = h, weight
        self.n, self.hd = h.shape
        self.v = weight.shape[0]
        dev = h.device
        self.gemm = _bf16_gemm(h, weight)
        self.widen = h.dtype != torch.float32 and self.gemm is None
        self.chunk = max(1, min(row_chunk or DEFAULT_ROW_CHUNK, self.n))
        default = DEFAULT_VOCAB_TILE if self.widen else DEFAULT_VOCAB_TILE_FP32
        self.tile = max(1, min(vocab_tile or default, self.v))
        self.starts = list(range(0, self.v, self.tile))
        self.buf = torch.empty(self.chunk * self.tile, dtype=torch.float32, device=dev)
        self.hbuf = (torch.empty(self.chunk * self.hd, dtype=torch.float32, device=dev)
                     if self.widen else None)
        self.wbuf = (torch.empty(self.tile * self.hd, dtype=torch.float32, device=dev)
                     if self.widen else None)
        self.bias32 = None if bias is None else bias.to(torch.float32)

    def _tiles(self, hc: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        c, hd = hc.shape
        for c0 in self.starts:
            c1 = min(self.v, c0 + self.tile)
            wdt = c1 - c0
            x = self.buf[: c * wdt].view(c, wdt)
            if self.widen:
                wt = self.wbuf[: wdt * hd].view(wdt, hd)
                wt.copy_(self.weight[c0:c1])
            else:
                wt = self.weight[c0:c1]
            if self.gemm is not None:
                self.gemm(hc.data_ptr(), hc.stride(0) if c > 1 else hd,  # one row: any stride
                          wt.data_ptr(), wt.stride(0) if wdt > 1 else hd,
                          x.data_ptr(), wdt, c, wdt, hd,
                          0 if self.bias32 is None else self.bias32[c0:c1].data_ptr(),
                          torch.get_num_threads())
            elif self.bias32 is None:
                torch.matmul(hc, wt.T, out=x)
            else:
                torch.addmm(self.bias32[c0:c1], hc, wt.T, out=x)
            yield c0, c1, x

    def __iter__(self) -> Iterator[tuple[int, int, Iterator[tuple[int, int, torch.Tensor]]]]:
        for r0 in range(0, self.n, self.chunk):
            r1 = min(self.n, r0 + self.chunk)
            if self.widen:
                hc = self.hbuf[: (r1 - r0) * self.hd].view(r1 - r0, self.hd)
                hc.copy_(self.h[r0:r1])
            else:
                hc = self.h[r0:r1]
            yield r0, r1, self._tiles(hc)


def _bf16_gemm(h: torch.Tensor, weight: torch.Tensor):
    """``mllmcal._C.gemm_bf16_nt`` where it serves these inputs (bf16 CPU tensors whose
    rows are contiguous along H, a CPU with AVX512-BF16, ``USE_BF16_GEMM``), else None."""
    if not (USE_BF16_GEMM and h.dtype == torch.bfloat16 and h.is_cpu and h.stride(1) == 1
            and weight.stride(1) == 1 and (h.shape[0] < 2 or h.stride(0) >= h.shape[1])
            and (weight.shape[0] < 2 or weight.stride(0) >= weight.shape[1])):
        return None
    from ._backends.registry import load

    try:
        ext = load("cpu").ext
    except RuntimeError:  # no mllmcal._C: widen instead
        return None
    return ext.gemm_bf16_nt if getattr(ext, "gemm_bf16_supported", lambda: False)() else None


def _tiled_into(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor | None,
    t_scalar: float, t_rows: torch.Tensor | None, ignore_index: int, stats_backend: str,
    fstats: torch.Tensor, pred: torch.Tensor, flags: torch.Tensor,
) -> None:
    """Fill ``fstats``/``pred``/``flags`` for ``h`` ``[N, H]``, chunk by chunk, tile by tile
    (of the module's ``DEFAULT_*`` sizes at call time)."""
    tiler = LogitTiles(h, weight, bias)
    dev = h.device
    n_tiles = len(tiler.starts)
    starts_t = torch.tensor(tiler.starts, dtype=torch.int64, device=dev)
    op = torch.ops.mllmcal.token_stats.default
    # The C++ statistics of a hot tile are written straight into this chunk's per-tile
    # slots, with STATS_THREADS threads (None: torch's count).
    cpp = None
    if stats_backend == "cpu":
        from ._backends.compiled import cpu as cpp
    tile_flags = torch.empty(tiler.chunk, dtype=torch.uint8, device=dev)
    for r0, r1, tiles in tiler:
        c = r1 - r0
        t_chunk = None if t_rows is None else t_rows[r0:r1]
        t_col = t_chunk if t_chunk is not None else (
            None if t_scalar == 1.0 else torch.full((c,), t_scalar, dtype=torch.float32, device=dev)
        )
        m = torch.empty((n_tiles, c), dtype=torch.float64, device=dev)
        fs = torch.empty((n_tiles, C.N_FSTATS, c), dtype=torch.float32, device=dev)
        pt = torch.empty((n_tiles, c), dtype=torch.int64, device=dev)
        poison = torch.zeros(c, dtype=torch.bool, device=dev)
        yc = labelled = zy = None
        if y is not None:
            yc = y[r0:r1]
            labelled = yc != ignore_index
            zy = torch.zeros(c, dtype=torch.float64, device=dev)
        for k, (c0, c1, x) in enumerate(tiles):
            y_loc = None
            if yc is not None:
                inside = labelled & (yc >= c0) & (yc < c1)
                # Every row gets a label inside the tile (column 0 where its own is
                # elsewhere or ignored): the tile's Brier score then yields Σ p_t².
                y_loc = torch.where(inside, yc - c0, torch.zeros_like(yc))
            if cpp is not None:
                f, p, fl = fs[k], pt[k], tile_flags[:c]
                cpp.token_stats_into(x, y_loc, t_scalar, t_chunk, f, p, fl, None, None, -1,
                                     num_threads=STATS_THREADS)
            else:
                f, p, fl = op(x, y_loc, t_scalar, t_chunk, None, None, -1, stats_backend)
                fs[k] = f
                pt[k] = p
            mk = _tile_z(x, p.clamp_min(0), t_col).double()
            bad = (fl & C.FLAG_VALID) == 0
            if bool(bad.any()):
                # No finite max or a NaN in this tile: a fully -inf tile only carries no
                # mass; anything else (NaN, +inf) makes the row invalid.
                rows = bad.nonzero().squeeze(1)
                zb = x[rows] if t_col is None else x[rows] / t_col[rows, None]
                masked = (zb == float("-inf")).all(1)
                poison[rows[~masked]] = True
                mk[rows] = float("-inf")
            m[k] = mk
            if yc is not None:
                zk = _tile_z(x, y_loc, t_col).double()
                zy = torch.where(inside, zk, zy)
        o, pr, fg = _merge_chunk(m, fs, pt, starts_t, zy, poison, labelled, yc)
        fstats[:, r0:r1] = o
        pred[r0:r1] = pr
        flags[r0:r1] = fg


def linear_token_stats_into(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor | None, temperature: float, temperature_rows: torch.Tensor | None,
    ignore_index: int, backend: str, fstats: torch.Tensor, pred: torch.Tensor,
    flags: torch.Tensor,
) -> None:
    """The computation behind the torch op ``mllmcal::linear_token_stats`` (registered with
    its fake in :mod:`mllmcal.ops`): fill fstats fp32 ``[7, N]``, pred int64 ``[N]`` and
    flags uint8 ``[N]`` for ``hidden`` ``[N, H]``; ``backend`` is ``"triton"`` (the fused
    kernel) or the ``token_stats`` backend of the tiled route."""
    if backend == "triton":
        from .kernels import linear_token_stats as K

        K.linear_token_stats_into(hidden, weight, bias, labels, temperature, temperature_rows,
                                  fstats, pred, flags, ignore_index)
    else:
        _tiled_into(hidden, weight, bias, labels, temperature, temperature_rows, ignore_index,
                    backend, fstats, pred, flags)


@torch.compiler.assume_constant_result  # under torch.compile: chosen once, at trace time
def _choose(backend: str, device: torch.device, dtype: torch.dtype, n: int, v: int) -> str:
    """``"triton"`` (fused kernel) or the ``token_stats`` backend the tiled route uses."""
    if backend == "triton":
        if "triton" not in available_backends(device):
            resolve_backend("triton", device, dtype, n, v)  # raises, naming what is missing
        return "triton"
    name = resolve_backend(backend, device, dtype, n, v)
    if backend == "auto" and device.type == "cuda" and "triton" in available_backends(device):
        return "triton"  # the fused kernel: no tile round trip through global memory
    return name


def check_linear_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Validate a head's inputs: ``hidden`` ``[..., H]`` and ``weight`` ``[V, H]`` of one
    dtype (fp32/bf16/fp16) and device, ``bias`` a float ``[V]`` there or None (errors name
    the problem). Returns detached ``(h [N, H], weight, bias (contiguous) or None, lead)``
    with ``lead = hidden.shape[:-1]``."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected hidden [..., H] and weight [V, H], got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    v, hd = weight.shape
    if v == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    device = hidden.device
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {device}")
    if bias is not None:
        if bias.shape != (v,) or bias.device != device or not bias.is_floating_point():
            raise ValueError(f"bias must be a float [{v}] tensor on {device}, got "
                             f"{bias.dtype} {tuple(bias.shape)} on {bias.device}")
        bias = bias.detach().contiguous()
    return hidden.detach().reshape(-1, hd), weight.detach(), bias, tuple(hidden.shape[:-1])


# --------------------------------------------------------------------------- public op


def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float | torch.Tensor = 1.0,
    bias: torch.Tensor | None = None,
    histogram: torch.Tensor | None = None,
    ignore_index: int = C.IGNORE_INDEX,
    backend: str = "auto",
) -> TokenStats:
    """Token statistics of the logits ``hidden @ weight.T + bias``, never materialised.

    Returns the same :class:`~mllmcal.TokenStats` as
    ``mllmcal.token_stats(hidden.float() @ weight.float().T + bias.float(), labels,
    temperature)``: the logits of each vocabulary tile are computed and kept in fp32 (for
    bf16/fp16 inputs that is more exact than materialised half-precision logits), and the
    tiles' statistics are merged exactly. Peak extra memory is one tile of logits
    (``DEFAULT_ROW_CHUNK x DEFAULT_VOCAB_TILE_FP32`` fp32 on the CPU for fp32 inputs and
    bf16 ones through the bf16 GEMM; ``DEFAULT_ROW_CHUNK x DEFAULT_VOCAB_TILE`` and the
    widened inputs' tiles for 16-bit inputs that are widened), not ``[N, V]``.

    Args:
        hidden: ``[..., H]`` fp32, bf16 or fp16 (leading dims flattened to N rows).
        weight: ``[V, H]``, the output head (for a tied head, the embedding matrix), same
            dtype and device as ``hidden``.
        labels, temperature, histogram, ignore_index: as for :func:`mllmcal.token_stats`
            (``labels`` shaped ``hidden.shape[:-1]``; ``histogram`` on ``hidden``'s device).
        bias: optional ``[V]`` (any float dtype); ``-inf`` entries mask tokens.
        backend: ``"auto"`` (C++ statistics on CPU tiles; the Triton kernel on CUDA),
            ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpu"``, ``"cuda"``
            or ``"torch"`` (the ``token_stats`` backend used on each tile).

    Returns:
        :class:`~mllmcal.TokenStats` with fields shaped ``hidden.shape[:-1]`` on
        ``hidden``'s device; no field requires grad.

    Runs as the torch op ``torch.ops.mllmcal.linear_token_stats`` (with a fake
    implementation), so ``torch.compile(fullgraph=True)`` traces through it.

    Example:
        >>> import torch, mllmcal
        >>> h, w = torch.randn(2, 3, 16), torch.randn(50, 16)
        >>> s = mllmcal.linear_token_stats(h, w, torch.tensor([[1, 2, -100], [0, 4, 7]]))
        >>> ref = mllmcal.token_stats(h @ w.T, torch.tensor([[1, 2, -100], [0, 4, 7]]))
        >>> bool(torch.allclose(s.entropy, ref.entropy, atol=1e-4)), s.prediction.shape
        (True, torch.Size([2, 3]))
    """
    h, w, bias, lead = check_linear_inputs(hidden, weight, bias)
    n, v = h.shape[0], w.shape[0]
    device = h.device
    t_scalar, t_rows = check_temperature(temperature, n, device, True)
    y = check_labels(labels, lead, n, v, device, ignore_index, True)
    if histogram is not None:
        check_histogram(histogram, y, device)
    name = _choose(backend, device, h.dtype, n, v)
    fstats, pred, flags = _linear_token_stats_op(
        h, w, bias, y, t_scalar, t_rows, histogram, int(ignore_index), name
    )
    return TokenStats.from_kernel(fstats, pred, flags, lead, y is not None, name)
