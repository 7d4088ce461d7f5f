"""Triton kernel for :func:`mllmcal.linear_token_stats` (``backend="triton"``).

Cut Cross-Entropy style: program ``p`` owns rows ``[p*BLOCK_M, (p+1)*BLOCK_M)`` of the hidden
states and walks the vocabulary in ``BLOCK_V`` tiles. Each tile of logits is
``tl.dot(hidden block, weight tile^T)`` accumulated in fp32 over ``BLOCK_K`` slices of H
(``input_precision="ieee"``: fp32 inputs get fp32 products, not TF32), plus the bias, divided
by T; it lives only in registers. The tile is folded into a per-row online-softmax state
(max, argmax, S, A, B, Q, z_y: the same state and rescaling rules as
:mod:`mllmcal.kernels.token_stats`), and the final statistics are written per row. No
``[N, V]`` tensor exists at any point, not even in global scratch.

Global traffic: each program reads the whole weight once, so the weight is read
``ceil(N / BLOCK_M)`` times (from L2 when programs run abreast); the hidden block is read
once per vocabulary tile. ``BLOCK_M`` trades that against registers.

Only ``tl.exp``/``tl.log``/``tl.math.div_rn`` and ``tl.dot`` are used (no libdevice, no inline
asm), so the kernel runs under ``TRITON_INTERPRET=1`` on the CPU and lowers for sm_90 ahead
of time (``tools/aot.py``). ``tl.dot`` needs every block dimension >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import interpreting as _interpreting
from .token_stats import _D_FLOOR, _INDEX_SENTINEL, _finalize

__all__ = ["linear_token_stats_into", "linear_token_stats_kernel"]


@triton.jit
def linear_token_stats_kernel(
    h_ptr, stride_h, w_ptr, stride_w, bias_ptr, labels_ptr, t_ptr, t_scalar,
    fstats_ptr, pred_ptr, flags_ptr,
    n_rows, n_cols, n_hidden, ignore_index,
    HAS_BIAS: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_T_ROWS: tl.constexpr,
    APPLY_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr, WIDEN_DOT: tl.constexpr,
):
    """Grid ``(cdiv(N, BLOCK_M),)``; fills fstats ``[7, N]``, pred ``[N]``, flags ``[N]``."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    if HAS_T_ROWS:
        t = tl.load(t_ptr + rows, mask=row_ok, other=1.0)
    else:
        t = tl.full((BLOCK_M,), 1.0, tl.float32) * t_scalar
    if HAS_LABELS:
        y = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    else:
        y = tl.full((BLOCK_M,), 0, tl.int64) + ignore_index
    offs_v = tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    idx = tl.full((BLOCK_M,), _INDEX_SENTINEL, tl.int32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    a = tl.zeros((BLOCK_M,), tl.float32)
    b = tl.zeros((BLOCK_M,), tl.float32)
    q = tl.zeros((BLOCK_M,), tl.float32)
    zy = tl.zeros((BLOCK_M,), tl.float32)
    h_rows = h_ptr + rows[:, None] * stride_h
    for c0 in range(0, n_cols, BLOCK_V):
        cols = c0 + offs_v
        col_ok = cols < n_cols
        w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k0 in range(0, n_hidden, BLOCK_K):
            ks = k0 + offs_k
            k_ok = ks < n_hidden
            hb = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            wb = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if WIDEN_DOT:
                # Triton 3.6's interpreter multiplies bf16 operands of tl.dot as raw
                # 16-bit integers; widened first, the products are the same (exact in fp32).
                hb = hb.to(tl.float32)
                wb = wb.to(tl.float32)
            acc = tl.dot(hb, wb, acc, input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        # z = x / T correctly rounded in fp32, as every backend computes it.
        if APPLY_T:
            z = tl.math.div_rn(acc, t[:, None])
        else:
            z = acc
        z = tl.where(col_ok[None, :], z, float("-inf"))
        if HAS_LABELS:
            zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        c_max = tl.max(z, axis=1)
        # Strict '>' keeps the earlier tile on ties; in the tile the lowest maximal column.
        grow = c_max > m
        c_idx = tl.min(tl.where(z == c_max[:, None], cols[None, :], _INDEX_SENTINEL), axis=1)
        idx = tl.where(grow, c_idx, idx)
        alpha = tl.where(grow, tl.exp(m - c_max), 1.0)
        delta = tl.where(grow & (alpha > 0.0), m - c_max, 0.0)
        b = alpha * (b + delta * (2.0 * a + delta * s))
        a = alpha * (a + delta * s)
        q = (alpha * alpha) * q
        s = alpha * s
        m = tl.where(grow, c_max, m)
        # All -inf so far: reference 0 so that d = -inf, exp(d) = 0 (not -inf - -inf).
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        d = z - m_ref[:, None]
        e = tl.exp(d)
        d = tl.maximum(d, _D_FLOOR)
        ed = e * d
        s += tl.sum(e, axis=1)
        a += tl.sum(ed, axis=1)
        b += tl.sum(ed * d, axis=1)
        q += tl.sum(e * e, axis=1)
    # Finish: the maths of mllmcal.kernels.token_stats, one row per lane.
    _finalize(rows, m, idx, s, a, b, q, zy, y, fstats_ptr, pred_ptr, flags_ptr, fstats_ptr,
              n_rows, 1, ignore_index, row_ok, HAS_LABELS, False)


def _blocks(n_hidden: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps): small under the interpreter (cost per op and
    per element alike there), register-sized tiles on the GPU."""
    if _interpreting():
        return 16, 64, max(16, min(64, triton.next_power_of_2(n_hidden))), 4
    return 64, 128, 64, 8


def linear_token_stats_into(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    labels: torch.Tensor | None, temperature: float, temperature_rows: torch.Tensor | None,
    fstats: torch.Tensor, pred: torch.Tensor, flags: torch.Tensor, ignore_index: int, *,
    block_m: int | None = None, block_v: int | None = None, block_k: int | None = None,
    num_warps: int | None = None,
) -> None:
    """Fill ``fstats`` fp32 ``[7, N]``, ``pred`` int64 ``[N]``, ``flags`` uint8 ``[N]``.

    ``hidden`` ``[N, H]`` and ``weight`` ``[V, H]`` (fp32/fp16/bf16, same dtype, stride 1 in
    H), ``bias`` ``[V]`` or None, ``labels`` int64 ``[N]`` or None, ``temperature`` a float
    used when ``temperature_rows`` (fp32 ``[N]``) is None. All on one device (CUDA, or CPU
    under ``TRITON_INTERPRET=1``). Block knobs: None = automatic; each a power of two >= 16.
    """
    n, hd = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    bm, bv, bk, nw = _blocks(hd)
    bm, bv, bk, nw = block_m or bm, block_v or bv, block_k or bk, num_warps or nw
    for name, blk in (("block_m", bm), ("block_v", bv), ("block_k", bk)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {blk}")
    dummy = fstats
    t_scalar = float(temperature)
    linear_token_stats_kernel[(triton.cdiv(n, bm),)](
        hidden, hidden.stride(0), weight, weight.stride(0),
        dummy if bias is None else bias, dummy if labels is None else labels,
        dummy if temperature_rows is None else temperature_rows, t_scalar,
        fstats, pred, flags, n, v, hd, ignore_index,
        HAS_BIAS=bias is not None, HAS_LABELS=labels is not None,
        HAS_T_ROWS=temperature_rows is not None,
        APPLY_T=temperature_rows is not None or t_scalar != 1.0,
        BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=bk,
        WIDEN_DOT=_interpreting() and hidden.dtype != torch.float32, num_warps=nw,
    )
