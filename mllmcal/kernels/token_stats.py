"""Triton kernels for the fused token-statistics op (``backend="triton"``).

One pass over a ``[N, V]`` logits tensor fills every field of ``mllmcal._contract``:
logsumexp, confidence, entropy, E_p[z], Var_p[z], argmax, label log-prob, Brier, the
valid/correct flags, optionally the temperature-scaled logits ``z = x / T`` (written in the
same pass, possibly in place) and optionally integer adds to a calibration histogram.

Two launch paths (when and why: :mod:`mllmcal._backends.launch`, shared with the CUDA
launcher): **row**, one program per row looping over the vocabulary in ``BLOCK_V`` chunks,
a single launch; **split**, a ``(N, splits)`` grid whose programs each scan one slice of a
row and write a partial state ``(max, argmax, S, A, B, Q)`` to a small fp32/int64
workspace (``N * splits * 6`` words), then a second kernel merges each row's partials and
finishes the statistics, label terms and histogram.

Bandwidth arithmetic. A call reads ``N * V * itemsize`` bytes (plus ``N * V * itemsize``
written when ``scaled_out`` is given) and writes ``37 * N`` bytes of results; the split
workspace adds ``~28 * N * splits`` bytes, negligible against ``V``. For ``[64, 131072]``
that is 33.6 MB in fp32 and 16.8 MB in bf16, i.e. 7.0 us / 3.5 us at the H200's
~4.8 TB/s. Per element: convert, divide by T (skipped when T == 1), subtract, one ``exp``
(one MUFU ``ex2``), a clamp, four mul/fma-adds for S, A, B, Q and a share of the per-chunk
block max (the only cross-lane work in the loop; the accumulators are rescaled only in
chunks that raise the running max, rare after the first few): ~20 SASS instructions, ~155
per chunk iteration of the bf16 row kernel (8 elements per thread, two barriers, the max
not growing). The H200 issues ~33e12 thread-instructions/s and ~4e12 ex2/s: fp32 at full
bandwidth (1.2e12 elements/s) needs ~24e12, so it is memory-bound; 16-bit input (2.4e12
elements/s) would need ~48e12, so there the instruction count, not HBM, is the limit
unless tuning trims it (about 3 of the 20 are the block max, which a larger ``BLOCK_V``
amortises).

What the sm_90 lowering shows (``tools/aot.py``, Triton 3.6, ptxas 12.8, no GPU needed):
with 16-byte-aligned rows and V % 16 == 0 the logits load is ``ld.global.v4.b32`` (one per
thread per chunk for 16-bit input, two for fp32 at ``BLOCK_V=2048``, 8 warps; unaligned
rows fall back to scalar loads); the scaled write is ``st.global.v4``; ``row * stride`` is
a 64-bit multiply; 64 registers without labels/histogram/scaled write, 80 with all of
them, merge kernel 30, no spills. Block size, warps and split count are knobs of
:func:`token_stats_into`, not yet tuned on an H200. Starting points: the loop is not
software-pipelined, so a thread has one 16-byte load in flight per iteration;
``BLOCK_V=4096`` with 8 warps doubles that (110-137 registers, no spills), and 8192 with
16 warps spills once every feature is on.

Kernels use only ``tl.exp``/``tl.log``/``tl.math.div_rn`` (no libdevice, no inline asm), so
they run under ``TRITON_INTERPRET=1`` on the CPU and lower for sm_90 ahead of time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._backends import launch
from .._contract import BRIER, CONF, ENT, LABEL_LOGPROB, LSE, MEAN, VAR
from ._interpreter import interpreting as _interpreting

__all__ = ["token_stats_into", "unavailable_reason", "default_block_v", "KERNELS", "MAX_SPLITS"]

# The interpreter pays per operation, not per element, so larger blocks are faster there.
_INTERPRET_BLOCK_V = 4096
_GPU_BLOCK_V = 2048
MAX_SPLITS = 1024  # the merge kernel takes any count; this bounds the workspace
# Below this d = z - max, exp(d) is 0 in fp32 (exp(-104) is already below the smallest
# denormal); clamping d here keeps d and d**2 finite so that 0 * inf never appears.
_D_FLOOR = tl.constexpr(-200.0)
_TWO_POW_32 = tl.constexpr(4294967296.0)
# Larger than any column index; loses every "lowest index" contest.
_INDEX_SENTINEL = tl.constexpr(2**31 - 1)
# Rows of fstats (jit code may only read globals that are constexpr).
_LSE, _CONF, _ENT = tl.constexpr(LSE), tl.constexpr(CONF), tl.constexpr(ENT)
_LABEL_LOGPROB, _BRIER = tl.constexpr(LABEL_LOGPROB), tl.constexpr(BRIER)
_MEAN, _VAR = tl.constexpr(MEAN), tl.constexpr(VAR)


# ----------------------------------------------------------------------------- maths
#
# Online-softmax state of a set of scaled logits {z_i}, relative to a reference max m:
#
#   S = sum_i e_i,  A = sum_i e_i d_i,  B = sum_i e_i d_i^2,  Q = sum_i e_i^2,
#   with d_i = z_i - m and e_i = exp(d_i).
#
# Final statistics (p_i = e_i / S):
#   logsumexp = m + log S            confidence = max p = exp(0) / S = 1 / S
#   E_p[z]    = m + A / S            Var_p[z] = B / S - (A / S)^2
#   entropy   = -sum p (d - log S) = log S - A / S
#   sum p^2   = Q / S^2              p_y = exp(z_y - m) / S
#   brier     = sum p^2 - 2 p_y + 1
#
# Rescaling when the reference max grows from m to m' (delta = m - m' <= 0,
# alpha = exp(delta)); every d_i becomes d_i + delta and every e_i becomes alpha e_i:
#
#   S' = alpha S
#   A' = sum alpha e (d + delta)   = alpha (A + delta S)
#   B' = sum alpha e (d + delta)^2 = alpha (B + delta (2 A + delta S))
#   Q' = sum alpha^2 e^2           = alpha^2 Q
#
# Merging two partial states (m1, S1, A1, B1, Q1) and (m2, ...) is rescaling both to
# M = max(m1, m2) and adding. When alpha underflows to 0 (or m = -inf, nothing seen yet)
# delta may be -inf or so large that delta^2 overflows; delta is then replaced by 0, which
# is exact because the rescaled terms are alpha * (finite) = 0.


@triton.jit
def _scan_columns(
    x_ptr, out_ptr, c_begin, c_end, t, y,
    WANT_LABEL: tl.constexpr, WRITE_SCALED: tl.constexpr, APPLY_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Online-softmax state of columns [c_begin, c_end) of one row (pointers at column 0).

    Returns (m, idx, S, A, B, Q, z_y): running max, lowest index attaining it, the four
    sums relative to m, and z at column y if y lies in the range (else 0).
    """
    offs = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    idx = tl.full((), _INDEX_SENTINEL, tl.int32)
    zy = tl.full((), 0.0, tl.float32)
    # Per-lane accumulators sharing one scalar max: the sums cost no cross-lane work until
    # the single reduction after the loop.
    s_v = tl.zeros((BLOCK_V,), tl.float32)
    a_v = tl.zeros((BLOCK_V,), tl.float32)
    b_v = tl.zeros((BLOCK_V,), tl.float32)
    q_v = tl.zeros((BLOCK_V,), tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = c0 + offs
        inb = cols < c_end
        x = tl.load(x_ptr + cols, mask=inb, other=float("-inf"))
        # The contract's z = x / T is a correctly rounded fp32 division (as torch does it),
        # so the scaled write and the statistics see exactly the reference's z.
        # T == 1 (the common decode case) skips the division: x / 1 is exact.
        if APPLY_T:
            z = tl.math.div_rn(x.to(tl.float32), t)
        else:
            z = x.to(tl.float32)
        if WRITE_SCALED:
            tl.store(out_ptr + cols, z.to(out_ptr.dtype.element_ty), mask=inb)
        if WANT_LABEL:
            # Take z_y from registers rather than reloading x[y] later: with an in-place
            # scaled write, x[y] may already hold z_y by then.
            if (y >= c0) & (y < c0 + BLOCK_V):
                zy = tl.sum(tl.where(cols == y, z, 0.0), axis=0)
        c_max = tl.max(z, axis=0)
        # Strict '>' keeps the earlier chunk on ties across chunks; within the chunk the
        # min over maximal columns picks the lowest index. NaN compares false and is
        # caught by S below (exp(NaN) poisons S).
        if c_max > m:
            idx = tl.min(tl.where(z == c_max, cols, _INDEX_SENTINEL), axis=0)
            alpha = tl.exp(m - c_max)
            delta = tl.where(alpha > 0.0, m - c_max, 0.0)
            b_v = alpha * (b_v + delta * (2.0 * a_v + delta * s_v))
            a_v = alpha * (a_v + delta * s_v)
            q_v = (alpha * alpha) * q_v
            s_v = alpha * s_v
            m = c_max
        # m = -inf means every column so far is -inf (or NaN): use 0 as reference so that
        # d = -inf - 0 = -inf, exp(d) = 0, instead of -inf - (-inf) = NaN.
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        d = z - m_ref
        e = tl.exp(d)
        d = tl.maximum(d, _D_FLOOR)
        ed = e * d
        s_v += e
        a_v += ed
        b_v += ed * d
        q_v += e * e
    return (
        m, idx, tl.sum(s_v, axis=0), tl.sum(a_v, axis=0), tl.sum(b_v, axis=0),
        tl.sum(q_v, axis=0), zy,
    )


@triton.jit
def _finalize(
    row, m, idx, s, a, b, q, zy, y,
    fstats_ptr, pred_ptr, flags_ptr, hist_ptr, n_rows, n_bins, ignore_index, mask,
    HAS_LABELS: tl.constexpr, HAS_HIST: tl.constexpr,
):
    """Turn one row's merged state into the contract's outputs (see the maths above).
    ``row`` and the state may also be vectors of rows (``mask``: the rows that exist; None
    for one row)."""
    # Valid: finite max (excludes +inf and all -inf) and no NaN (a NaN makes S NaN).
    valid = (m > float("-inf")) & (m < float("inf")) & (s == s)
    nan = float("nan")
    inv_s = 1.0 / s
    log_s = tl.log(s)
    mean_d = a * inv_s
    var = tl.maximum(b * inv_s - mean_d * mean_d, 0.0)  # rounding can dip below 0
    tl.store(fstats_ptr + _LSE * n_rows + row, tl.where(valid, m + log_s, nan), mask=mask)
    tl.store(fstats_ptr + _CONF * n_rows + row, tl.where(valid, inv_s, nan), mask=mask)
    tl.store(fstats_ptr + _ENT * n_rows + row, tl.where(valid, log_s - mean_d, nan), mask=mask)
    tl.store(fstats_ptr + _MEAN * n_rows + row, tl.where(valid, m + mean_d, nan), mask=mask)
    tl.store(fstats_ptr + _VAR * n_rows + row, tl.where(valid, var, nan), mask=mask)
    pred = tl.where(valid, idx.to(tl.int64), -1)
    tl.store(pred_ptr + row, pred, mask=mask)
    if HAS_LABELS:
        keep = valid & (y != ignore_index)
        dy = zy - m
        lp = dy - log_s
        p_y = tl.exp(dy) * inv_s
        brier = q * inv_s * inv_s - 2.0 * p_y + 1.0
        tl.store(fstats_ptr + _LABEL_LOGPROB * n_rows + row, tl.where(keep, lp, nan), mask=mask)
        tl.store(fstats_ptr + _BRIER * n_rows + row, tl.where(keep, brier, nan), mask=mask)
        correct = keep & (pred == y)
        tl.store(flags_ptr + row, (valid.to(tl.int32) + 2 * correct.to(tl.int32)).to(tl.uint8),
                 mask=mask)
        if HAS_HIST:
            conf = tl.where(keep, inv_s, 0.0)
            # bin = min(floor(conf * n_bins), n_bins - 1), product in fp32; conf >= 0 so
            # truncation is floor.
            bin_ = tl.minimum((conf * n_bins.to(tl.float32)).to(tl.int32), n_bins - 1)
            # rint(conf * 2^32), half to even: the product is exact (power-of-two scale);
            # truncate, then round on the exact fractional part.
            fx = conf * _TWO_POW_32
            ti = fx.to(tl.int64)
            frac = fx - ti.to(tl.float32)
            up = (frac > 0.5) | ((frac == 0.5) & ((ti & 1) == 1))
            fixed = ti + up.to(tl.int64)
            tl.atomic_add(hist_ptr + bin_, keep.to(tl.int64), mask=keep, sem="relaxed")
            tl.atomic_add(hist_ptr + n_bins + bin_, fixed, mask=keep, sem="relaxed")
            tl.atomic_add(
                hist_ptr + 2 * n_bins + bin_, correct.to(tl.int64), mask=keep, sem="relaxed"
            )
    else:
        tl.store(fstats_ptr + _LABEL_LOGPROB * n_rows + row, nan, mask=mask)
        tl.store(fstats_ptr + _BRIER * n_rows + row, nan, mask=mask)
        tl.store(flags_ptr + row, valid.to(tl.uint8), mask=mask)


@triton.jit
def _row_params(row, labels_ptr, t_ptr, t_scalar, ignore_index,
                HAS_LABELS: tl.constexpr, HAS_T_ROWS: tl.constexpr):
    if HAS_T_ROWS:
        t = tl.load(t_ptr + row)
    else:
        t = t_scalar
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
    else:
        y = ignore_index.to(tl.int64)
    return t, y


@triton.jit
def token_stats_row_kernel(
    x_ptr, stride_x, out_ptr, stride_out, labels_ptr, t_ptr, t_scalar,
    fstats_ptr, pred_ptr, flags_ptr, hist_ptr,
    n_rows, n_cols, n_bins, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_T_ROWS: tl.constexpr, WRITE_SCALED: tl.constexpr,
    HAS_HIST: tl.constexpr, APPLY_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Path "row": program r computes every output of row r. Grid ``(N,)``."""
    row = tl.program_id(0).to(tl.int64)  # row * stride can exceed 2^31
    t, y = _row_params(row, labels_ptr, t_ptr, t_scalar, ignore_index, HAS_LABELS, HAS_T_ROWS)
    m, idx, s, a, b, q, zy = _scan_columns(
        x_ptr + row * stride_x, out_ptr + row * stride_out, 0, n_cols, t, y,
        HAS_LABELS, WRITE_SCALED, APPLY_T, BLOCK_V,
    )
    _finalize(row, m, idx, s, a, b, q, zy, y, fstats_ptr, pred_ptr, flags_ptr, hist_ptr,
              n_rows, n_bins, ignore_index, None, HAS_LABELS, HAS_HIST)


@triton.jit
def token_stats_split_kernel(
    x_ptr, stride_x, out_ptr, stride_out, labels_ptr, t_ptr, t_scalar,
    ws_f_ptr, ws_i_ptr, ws_zy_ptr,
    n_cols, split_len, n_splits, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_T_ROWS: tl.constexpr, WRITE_SCALED: tl.constexpr,
    APPLY_T: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Path "split", step 1: program (r, k) scans columns [k*L, min((k+1)*L, V)) of row r.

    Writes the partial state to ``ws_f[r, k, 0:5] = (m, S, A, B, Q)`` (fp32),
    ``ws_i[r, k] = argmax`` (int64) and, from the one program whose slice holds the label,
    ``ws_zy[r] = z_y``. The scaled write happens here. Grid ``(N, splits)``.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    t, y = _row_params(row, labels_ptr, t_ptr, t_scalar, ignore_index, HAS_LABELS, HAS_T_ROWS)
    c_begin = split * split_len
    c_end = tl.minimum(c_begin + split_len, n_cols)
    m, idx, s, a, b, q, zy = _scan_columns(
        x_ptr + row * stride_x, out_ptr + row * stride_out, c_begin, c_end, t, y,
        HAS_LABELS, WRITE_SCALED, APPLY_T, BLOCK_V,
    )
    slot = row * n_splits + split
    tl.store(ws_f_ptr + slot * 5 + 0, m)
    tl.store(ws_f_ptr + slot * 5 + 1, s)
    tl.store(ws_f_ptr + slot * 5 + 2, a)
    tl.store(ws_f_ptr + slot * 5 + 3, b)
    tl.store(ws_f_ptr + slot * 5 + 4, q)
    tl.store(ws_i_ptr + slot, idx.to(tl.int64))
    if HAS_LABELS:
        tl.store(ws_zy_ptr + row, zy, mask=(y >= c_begin) & (y < c_end))


@triton.jit
def token_stats_merge_kernel(
    ws_f_ptr, ws_i_ptr, ws_zy_ptr, labels_ptr,
    fstats_ptr, pred_ptr, flags_ptr, hist_ptr,
    n_rows, n_splits, n_bins, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_HIST: tl.constexpr, SPLITS_P2: tl.constexpr,
):
    """Path "split", step 2: merge row r's partial states and finish it. Grid ``(N,)``."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, SPLITS_P2)
    ok = k < n_splits
    slot = row * n_splits + k
    pm = tl.load(ws_f_ptr + slot * 5 + 0, mask=ok, other=float("-inf"))
    ps = tl.load(ws_f_ptr + slot * 5 + 1, mask=ok, other=0.0)
    pa = tl.load(ws_f_ptr + slot * 5 + 2, mask=ok, other=0.0)
    pb = tl.load(ws_f_ptr + slot * 5 + 3, mask=ok, other=0.0)
    pq = tl.load(ws_f_ptr + slot * 5 + 4, mask=ok, other=0.0)
    pidx = tl.load(ws_i_ptr + slot, mask=ok, other=_INDEX_SENTINEL)
    # Partial maxima are never NaN (a chunk max only replaces m when it compares greater),
    # so the plain max is the row max; NaN inputs travel in S.
    m = tl.max(pm, axis=0)
    # Splits are in column order, so the lowest index among maximal splits is the lowest
    # index attaining the row max.
    idx = tl.min(tl.where(pm == m, pidx, _INDEX_SENTINEL), axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    # Merge = rescale every partial to the common max m and add (see the maths above).
    alpha = tl.exp(pm - m_ref)
    delta = tl.where(alpha > 0.0, pm - m_ref, 0.0)
    s = tl.sum(alpha * ps, axis=0)
    a = tl.sum(alpha * (pa + delta * ps), axis=0)
    b = tl.sum(alpha * (pb + delta * (2.0 * pa + delta * ps)), axis=0)
    q = tl.sum((alpha * alpha) * pq, axis=0)
    if HAS_LABELS:
        y = tl.load(labels_ptr + row)
        zy = tl.load(ws_zy_ptr + row, mask=y != ignore_index, other=0.0)
    else:
        y = ignore_index.to(tl.int64)
        zy = 0.0
    _finalize(row, m, idx, s, a, b, q, zy, y, fstats_ptr, pred_ptr, flags_ptr, hist_ptr,
              n_rows, n_bins, ignore_index, None, HAS_LABELS, HAS_HIST)


KERNELS = {
    "row": token_stats_row_kernel,
    "split": token_stats_split_kernel,
    "merge": token_stats_merge_kernel,
}


# ----------------------------------------------------------------------------- launch


def unavailable_reason() -> str | None:
    """Why this backend cannot run in this process (None when it can).

    Triton itself imported (this module would not exist otherwise); it still needs either
    a CUDA device or the interpreter.
    """
    if torch.cuda.is_available() or _interpreting():
        return None
    return "Triton is installed but there is no CUDA device and TRITON_INTERPRET is not 1"


def default_block_v(n_cols: int) -> int:
    """Columns per chunk: the vocabulary rounded up to a power of two, capped (a bigger
    cap under the interpreter, whose cost is per operation, not per element)."""
    cap = _INTERPRET_BLOCK_V if _interpreting() else _GPU_BLOCK_V
    return min(cap, max(16, triton.next_power_of_2(n_cols)))


def token_stats_into(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float,
    temperature_rows: torch.Tensor | None,
    fstats: torch.Tensor,
    pred: torch.Tensor,
    flags: torch.Tensor,
    scaled_out: torch.Tensor | None,
    hist: torch.Tensor | None,
    ignore_index: int,
    *,
    path: str | None = None,
    block_v: int | None = None,
    num_warps: int | None = None,
    splits: int | None = None,
) -> None:
    """Fill ``fstats``/``pred``/``flags`` (and ``scaled_out``/``hist``) for ``x``.

    Arguments follow ``mllmcal._contract``: ``x`` is ``[N, V]`` fp32/fp16/bf16 with
    ``stride(1) == 1``; ``labels`` int64 ``[N]`` or None; ``temperature`` a float used when
    ``temperature_rows`` (fp32 ``[N]``) is None; ``fstats`` fp32 ``[7, N]``, ``pred`` int64
    ``[N]``, ``flags`` uint8 ``[N]``; ``scaled_out`` ``[N, V]`` of ``x``'s dtype (may be
    ``x``) or None; ``hist`` int64 ``[3, n_bins]`` (added to) or None. All on one device
    (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    Keyword knobs (None = automatic): ``path`` ``"row"`` or ``"split"``; ``block_v`` columns
    per chunk (a power of two); ``num_warps``; ``splits`` slices per row on the split path.
    """
    n, v = x.shape
    if n == 0:
        return
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the triton backend reads fp32/fp16/bf16 logits, got {x.dtype}")
    if block_v is None:
        block_v = default_block_v(v)
    if block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if path is None:
        auto_splits = launch.plan_splits(n, v, launch.sm_count(x.device), block_v, MAX_SPLITS)
        path = "row" if auto_splits == 1 else "split"
        splits = splits or auto_splits
    if path not in ("row", "split"):
        raise ValueError(f"path must be 'row' or 'split', got {path!r}")
    if num_warps is None:
        num_warps = max(1, min(8, block_v // 256))
    has_labels = labels is not None
    has_t_rows = temperature_rows is not None
    write_scaled = scaled_out is not None
    has_hist = hist is not None
    if has_hist and not has_labels:
        raise ValueError("a histogram needs labels")
    # Unused pointer arguments still need a tensor; the constexpr flags keep them untouched.
    dummy = fstats
    labels_arg = labels if has_labels else dummy
    t_arg = temperature_rows if has_t_rows else dummy
    out_arg = scaled_out if write_scaled else x
    stride_out = scaled_out.stride(0) if write_scaled else 0
    hist_arg = hist if has_hist else dummy
    n_bins = hist.shape[1] if has_hist else 1
    t_scalar = float(temperature)
    apply_t = has_t_rows or t_scalar != 1.0

    if path == "row":
        token_stats_row_kernel[(n,)](
            x, x.stride(0), out_arg, stride_out, labels_arg, t_arg, t_scalar,
            fstats, pred, flags, hist_arg, n, v, n_bins, ignore_index,
            HAS_LABELS=has_labels, HAS_T_ROWS=has_t_rows, WRITE_SCALED=write_scaled,
            HAS_HIST=has_hist, APPLY_T=apply_t, BLOCK_V=block_v, num_warps=num_warps,
        )
        return

    if splits is None:
        splits = launch.plan_splits(n, v, launch.sm_count(x.device), block_v, MAX_SPLITS)
    splits = max(1, min(int(splits), math.ceil(v / block_v)))
    # Slices are whole chunks so every program but the last runs unmasked-full chunks;
    # recount so that no slice is empty.
    split_len = math.ceil(math.ceil(v / splits) / block_v) * block_v
    splits = math.ceil(v / split_len)
    ws_f = torch.empty(n * splits * 5, dtype=torch.float32, device=x.device)
    ws_i = torch.empty(n * splits, dtype=torch.int64, device=x.device)
    ws_zy = torch.empty(n, dtype=torch.float32, device=x.device)
    token_stats_split_kernel[(n, splits)](
        x, x.stride(0), out_arg, stride_out, labels_arg, t_arg, t_scalar,
        ws_f, ws_i, ws_zy, v, split_len, splits, ignore_index,
        HAS_LABELS=has_labels, HAS_T_ROWS=has_t_rows, WRITE_SCALED=write_scaled,
        APPLY_T=apply_t, BLOCK_V=block_v, num_warps=num_warps,
    )
    splits_p2 = max(16, triton.next_power_of_2(splits))
    token_stats_merge_kernel[(n,)](
        ws_f, ws_i, ws_zy, labels_arg, fstats, pred, flags, hist_arg,
        n, splits, n_bins, ignore_index,
        HAS_LABELS=has_labels, HAS_HIST=has_hist, SPLITS_P2=splits_p2,
        num_warps=max(1, min(4, splits_p2 // 32)),
    )
