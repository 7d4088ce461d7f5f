"""Triton kernel for one-pass temperature fitting (``backend="triton"``).

For each logits row x (label y) and each of K inverse temperatures β_k it writes the NLL of
``softmax(β_k x)`` and its first two derivatives in β: with m = max x, d_i = x_i − m and
e_i = exp(β d_i), S = Σ e_i, A = Σ e_i d_i, B = Σ e_i d_i², ℓ = log S − β d_y,
dℓ/dβ = A/S − d_y and d²ℓ/dβ² = B/S − (A/S)² (derivation and references next to the C++
kernel, ``csrc/cpu/temperature_fit.h``). Since β > 0, max(βx) = β·m at every temperature,
so one max pass serves all K and no online rescaling is needed.

Launch: a ``(N, ceil(K / BLOCK_K))`` grid. Program (row, kb) reads its row twice in
``BLOCK_V`` chunks (max and validity first, then the K-block's sums over a
``[BLOCK_K, BLOCK_V]`` tile of exps). A row is read ``2 · ceil(K / BLOCK_K)`` times from
memory or L2; the *stream* of batches is still read once, which is what the one-pass fit
needs (a second pass over the data would mean running the model again). Exps dominate:
K per element, against one per element per Newton pass.

Output contract (every backend's): :func:`mllmcal.ops.temperature_fit_rows`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._interpreter import interpreting as _interpreting

__all__ = ["temperature_fit_into"]

# The interpreter pays per operation, not per element: big tiles there, GPU-sized ones else.
_INTERPRET_BLOCKS = (4096, 64)
_GPU_BLOCKS = (512, 16)
# exp(β d) is 0 in fp32 below this; such terms are dropped from A and B (0 · inf guard).
_LIVE_FLOOR = tl.constexpr(-87.0)


@triton.jit
def _fit_kernel(
    x_ptr, stride_x, labels_ptr, betas_ptr, out_ptr, status_ptr, n_cols, n_temps,
    ignore_index, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0)
    kb = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_x  # 64-bit row offset: N·V may exceed 2**31
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: max, and whether the row holds a NaN or +inf (then it is invalid).
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    bad_vec = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        xv = tl.load(base + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)
        bad_vec = bad_vec | ((xv != xv) | (xv == float("inf"))).to(tl.int32)
        m_vec = tl.maximum(m_vec, xv)
    m = tl.max(m_vec, axis=0)
    y = tl.load(labels_ptr + row)
    valid = (tl.max(bad_vec, axis=0) == 0) & (m > float("-inf")) & (y != ignore_index)
    y_safe = tl.where(y == ignore_index, 0, y)
    m_safe = tl.where(valid, m, 0.0)
    dy = tl.load(base + y_safe).to(tl.float32) - m_safe
    used = valid & (dy > float("-inf"))

    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < n_temps
    beta = tl.load(betas_ptr + ks, mask=k_ok, other=1.0)
    s = tl.zeros([BLOCK_K], tl.float32)
    a = tl.zeros([BLOCK_K], tl.float32)
    b = tl.zeros([BLOCK_K], tl.float32)
    # Pass 2: for the K-block's temperatures, S, A, B over the row.
    for start in range(0, n_cols, BLOCK_V):
        c = start + cols
        xv = tl.load(base + c, mask=c < n_cols, other=float("-inf")).to(tl.float32)
        d = tl.where(used, xv - m_safe, float("-inf"))
        t = beta[:, None] * d[None, :]
        live = t >= _LIVE_FLOOR  # false for d = -inf (masked entries, padding)
        e = tl.where(live, tl.exp(tl.maximum(t, _LIVE_FLOOR)), 0.0)
        dd = tl.where(live, d[None, :], 0.0)
        ed = e * dd
        s += tl.sum(e, axis=1)
        a += tl.sum(ed, axis=1)
        b += tl.sum(ed * dd, axis=1)

    s_safe = tl.where(used, s, 1.0)
    mean = a / s_safe
    nll = tl.log(s_safe) - beta * dy
    grad = mean - dy
    curv = tl.maximum(b / s_safe - mean * mean, 0.0)
    o = out_ptr + row.to(tl.int64) * 3 * n_temps + ks
    tl.store(o, tl.where(used, nll, 0.0), mask=k_ok)
    tl.store(o + n_temps, tl.where(used, grad, 0.0), mask=k_ok)
    tl.store(o + 2 * n_temps, tl.where(used, curv, 0.0), mask=k_ok)
    status = tl.where(used, 1, tl.where(valid, 2, 0)).to(tl.uint8)
    tl.store(status_ptr + row, status, mask=kb == 0)


def temperature_fit_into(
    x: torch.Tensor, labels: torch.Tensor, betas: torch.Tensor, out: torch.Tensor,
    status: torch.Tensor, ignore_index: int, *, block_v: int | None = None,
    block_k: int | None = None, num_warps: int = 8,
) -> None:
    """Launch the kernel. ``x``: CUDA (or interpreted CPU) ``[N, V]`` fp32/fp16/bf16 with
    ``stride(1) == 1``; ``labels`` int64 ``[N]`` (in range or ``ignore_index``); ``betas``
    fp32 ``[K]`` > 0; ``out`` fp32 ``[N, 3, K]`` and ``status`` uint8 ``[N]``, contiguous and
    fully overwritten. Block sizes are powers of two (defaults depend on interpretation)."""
    n, v = x.shape
    k = betas.numel()
    if n == 0:
        return
    dv, dk = _INTERPRET_BLOCKS if _interpreting() else _GPU_BLOCKS
    bv = block_v or min(dv, triton.next_power_of_2(v))
    bk = block_k or min(dk, triton.next_power_of_2(k))
    grid = (n, triton.cdiv(k, bk))
    _fit_kernel[grid](
        x, x.stride(0), labels, betas, out, status, v, k, ignore_index,
        BLOCK_V=bv, BLOCK_K=bk, num_warps=num_warps,
    )
