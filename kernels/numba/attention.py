"""attention on the CPU: softmax(soft_cap(q k^T * scale) + bias, masked) @ v, grouped-query heads.

Decode and short prompts run one fused kernel in two passes (flash-decoding): softmax statistics
per block of keys, then one merge per query row. Long prompts, or a call that asks for the
attention weights, use BLAS for q k^T and weights @ v and compile only the masked softmax.

Softmax follows `minilm.nn.softmax`: subtract the row max (0 if the max is not finite),
exponentiate, divide by the sum (by 1 if the sum is 0). A query row whose mask allows no key
attends uniformly to all keys, as `ops.attention_reference` does (transformers' behaviour). The
fused kernel computes the same softmax over blocks of keys and merges them, so its rounding
differs from the reference's within the tolerance. Precision rules: `compile.py`.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from minilm import ops
from minilm.errors import InputError

from .compile import (
    _SUM_IN_ANY_ORDER,
    _add_scaled,
    _as_float32,
    _kernel_array,
    _last_axis_unit_stride,
    _launch,
    _matmul_dtype,
    _to_f32,
)

# ---------------------------------------------------------------------------------------------
# attention: softmax(soft_cap(q k^T * scale) + bias, masked) @ v, grouped-query heads
# ---------------------------------------------------------------------------------------------


# From this many query positions on (long prefill), or when the weights are asked for, q k^T and
# weights @ v go to BLAS and only the masked softmax is compiled (BLAS's blocked matmuls beat one
# dot product per (query, key) once the switch between OpenBLAS's and numba's threads is paid
# for); below it (decode, short prompts) the fused kernel below runs.
ATTENTION_BLAS_MIN_SEQ = 128
# Keys per task of the fused kernel: decode against a long cache is split over the keys.
ATTENTION_KEY_BLOCK = 256


@njit(cache=True)
def _softmax_row(p, mask_row, bias_row, has_bias, scale, cap, has_cap):
    """One query row: raw scores q.k in `p`, attention weights out, in place (float32).

    p        (kv_seq,) float32: q . k_j for every key the mask allows (other entries are ignored)
    mask_row (kv_seq,) bool, True = may attend;  bias_row (kv_seq,) float32

    s_j = soft_cap(p_j * scale) + bias_j, then the softmax of `nn.softmax` over the allowed keys:
    subtract the max (0 if not finite), exponentiate, divide by the sum (by 1 if it is 0); masked
    keys get 0. A row whose mask allows no key gets 1 / kv_seq everywhere (the reference's rule,
    from transformers' additive mask).
    """
    kv_seq = p.shape[0]
    sees_nothing = True
    for j in range(kv_seq):
        if mask_row[j]:
            sees_nothing = False
            break
    if sees_nothing:
        p[:] = np.float32(1.0) / np.float32(kv_seq)  # softmax of a row of zeros
        return
    row_max = np.float32(-np.inf)
    for j in range(kv_seq):
        if mask_row[j]:
            s = p[j] * scale
            if has_cap:
                s = cap * np.tanh(s / cap)
            if has_bias:
                s += bias_row[j]
            p[j] = s
            row_max = max(row_max, s)
    if not np.isfinite(row_max):
        row_max = np.float32(0.0)
    total = np.float32(0.0)
    for j in range(kv_seq):
        if mask_row[j]:
            e = np.exp(p[j] - row_max)
            p[j] = e
            total += e
        else:
            p[j] = 0.0
    if total == 0.0:
        total = np.float32(1.0)
    for j in range(kv_seq):
        p[j] = p[j] / total


@njit(cache=True, inline="always")
def _load_row(dst, src, b, h, j):
    """dst[:] = src[b, h, j, :] widened to float32. dst: (head_dim,) float32; src: 4-D, float32
    or bf16 bits, any layout (the unit-stride branch lets the usual case vectorise)."""
    if _last_axis_unit_stride(src):
        for d in range(dst.shape[0]):
            dst[d] = _to_f32(src[b, h, j, d])
    else:
        for d in range(dst.shape[0]):
            dst[d] = _to_f32(src[b, h, j, d])


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _attention_blocks_kernel(
    q, k, v, mask, sees_nothing, bias, has_bias, scale, cap, has_cap, key_block, block_max, block_sum, block_out
):
    """Fused attention, pass 1 of 2 (decode): softmax statistics per block of keys.

    q            (batch, num_heads, seq, head_dim)        float32 or bf16 bits
    k, v         (batch, num_kv_heads, kv_seq, head_dim)  float32 or bf16 bits, read in place
    mask         (batch, 1, seq, kv_seq) bool             broadcast view, True = may attend
    sees_nothing (batch, seq) bool                        rows whose mask allows no key: those
                                                         attend to every key with score 0 (the
                                                         reference's rule, from transformers)
    bias         (batch, num_heads, seq, kv_seq) float32  broadcast view
    block_max, block_sum (batch, num_heads, seq, n_blocks) float32, written:
                     m = max_j s_j and l = sum_j exp(s_j - m) over the allowed keys j of the block
    block_out    (batch, num_heads, seq, n_blocks, head_dim) float32, written: sum_j exp(s_j - m) v_j
    where s_j = soft_cap(q . k_j * scale) + bias_j, j over keys c * key_block .. (c+1) * key_block - 1
    of block c; a block with no allowed key (or only -inf scores) has m = -inf, l = 0, out = 0.

    prange over (batch, kv head, query position, key block): a long cache is split over the
    threads, masked keys cost nothing (a sliding window reads only the window), and each k_j, v_j
    is loaded once (into `row`, widened to float32) for all `groups` query heads of its kv head
    (GQA). Sums in this kernel may be reassociated (dot products, the softmax sums).
    """
    batch, num_heads, seq, head_dim = q.shape
    num_kv_heads, kv_seq = k.shape[1], k.shape[2]
    groups = num_heads // num_kv_heads
    n_blocks = block_max.shape[3]
    for task in prange(batch * num_kv_heads * seq * n_blocks):
        blk = task % n_blocks
        i = (task // n_blocks) % seq
        kv_h = (task // (n_blocks * seq)) % num_kv_heads
        b = task // (n_blocks * seq * num_kv_heads)
        lo = blk * key_block
        hi = min(lo + key_block, kv_seq)
        everything = sees_nothing[b, i]
        qg = np.empty((groups, head_dim), np.float32)  # the group's query rows
        for g in range(groups):
            _load_row(qg[g], q, b, kv_h * groups + g, i)
        row = np.empty(head_dim, np.float32)  # k_j, then v_j
        s = np.empty((groups, hi - lo), np.float32)  # (groups, block) scores, then exp(s - m)
        # 1. scores s_j of the allowed keys, for every query head of the group
        for j in range(lo, hi):
            if everything:
                s[:, j - lo] = 0.0
            elif mask[b, 0, i, j]:
                _load_row(row, k, b, kv_h, j)
                for g in range(groups):
                    x = np.float32(0.0)
                    for d in range(head_dim):
                        x += qg[g, d] * row[d]
                    x = x * scale
                    if has_cap:
                        x = cap * np.tanh(x / cap)
                    if has_bias:
                        x += bias[b, kv_h * groups + g, i, j]
                    s[g, j - lo] = x
        # 2. per head: block max m, then s_j -> exp(s_j - m) and their sum l
        for g in range(groups):
            h = kv_h * groups + g
            m = np.float32(-np.inf)
            for j in range(lo, hi):
                if everything or mask[b, 0, i, j]:
                    m = max(m, s[g, j - lo])
            total = np.float32(0.0)
            for j in range(lo, hi):
                if (everything or mask[b, 0, i, j]) and m != -np.inf:
                    e = np.exp(s[g, j - lo] - m)
                    s[g, j - lo] = e
                    total += e
                else:
                    s[g, j - lo] = 0.0
            block_max[b, h, i, blk] = m
            block_sum[b, h, i, blk] = total
        # 3. weighted values: each v_j once for all heads of the group
        acc = np.zeros((groups, head_dim), np.float32)
        for j in range(lo, hi):
            if everything or mask[b, 0, i, j]:
                _load_row(row, v, b, kv_h, j)
                for g in range(groups):
                    e = s[g, j - lo]
                    if e != 0.0:
                        for d in range(head_dim):
                            acc[g, d] += e * row[d]
        for g in range(groups):
            block_out[b, kv_h * groups + g, i, blk, :] = acc[g]


@njit(parallel=True, cache=True)
def _attention_combine_kernel(block_max, block_sum, block_out, out):
    """Fused attention, pass 2 of 2: merge the key blocks of each query row (flash-decoding).

    block_max, block_sum (batch, num_heads, seq, n_blocks), block_out (..., n_blocks, head_dim) from
    pass 1; out (batch, num_heads, seq, head_dim) float32, written:
        M = max_c m_c (0 if not finite, as nn.softmax),  f_c = exp(m_c - M),
        out = sum_c f_c out_c / sum_c f_c l_c            (the sum taken as 1 if it is 0)
    which is softmax(s) @ v over all keys. prange over (batch, head, query position).
    """
    batch, num_heads, seq, n_blocks = block_max.shape
    for r in prange(batch * num_heads * seq):
        b = r // (num_heads * seq)
        h = (r // seq) % num_heads
        i = r % seq
        row_max = np.float32(-np.inf)
        for c in range(n_blocks):
            row_max = max(row_max, block_max[b, h, i, c])
        if not np.isfinite(row_max):
            row_max = np.float32(0.0)
        total = np.float32(0.0)
        o = out[b, h, i]  # (head_dim,)
        o[:] = 0.0
        for c in range(n_blocks):
            if block_sum[b, h, i, c] != 0.0:
                f = np.exp(block_max[b, h, i, c] - row_max)
                total += f * block_sum[b, h, i, c]
                _add_scaled(o, f, block_out[b, h, i, c])
        if total == 0.0:
            total = np.float32(1.0)
        for d in range(o.shape[0]):
            o[d] = o[d] / total


@njit(parallel=True, cache=True)
def _softmax_kernel(mask, bias, has_bias, scale, cap, has_cap, scores):
    """The masked softmax of the BLAS path, in place: scores (batch, num_heads, seq, kv_seq) float32
    holds q k^T on entry and the attention weights on return. mask and bias as in _attention_kernel.
    prange over the batch * num_heads * seq query rows; each row is `_softmax_row`."""
    batch, num_heads, seq, _ = scores.shape
    for r in prange(batch * num_heads * seq):
        b = r // (num_heads * seq)
        h = (r // seq) % num_heads
        i = r % seq
        _softmax_row(scores[b, h, i], mask[b, 0, i], bias[b, h, i], has_bias, scale, cap, has_cap)


def attention(q, k, v, mask=None, *, scale, bias=None, soft_cap=None, return_weights=False):
    """Numba version of `ops.attention_reference` (same arguments, same result)."""
    q, k, v = np.asarray(q), np.asarray(k), np.asarray(v)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise InputError(
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} must all be 4-D (batch, heads, seq, head_dim)"
        )
    batch, num_heads, seq, head_dim = q.shape
    _, num_kv_heads, kv_seq, _ = k.shape
    if k.shape != (batch, num_kv_heads, kv_seq, head_dim) or v.shape != k.shape:
        raise InputError(
            f"attention: k {k.shape} and v {v.shape} must both be "
            f"(batch={batch}, num_kv_heads, kv_seq, head_dim={head_dim})"
        )
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise InputError(f"attention: num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    kq, kk, kv = _kernel_array(q), _kernel_array(k), _kernel_array(v)
    if kq is None or kk is None or kv is None:
        return ops.attention_reference(
            q, k, v, mask, scale=scale, bias=bias, soft_cap=soft_cap, return_weights=return_weights
        )  # float64 / float16: the reference
    if kk.dtype != kv.dtype:  # one of k, v bf16 and the other float32: compile for one pair only
        kk, kv = _as_float32(k), _as_float32(v)
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)  # small before broadcasting (e.g. ALiBi's (1, heads, 1, kv_seq))
    try:
        if mask is None:
            mask_view = np.broadcast_to(np.True_, (batch, 1, seq, kv_seq))
        else:
            mask_view = np.broadcast_to(np.asarray(mask, dtype=bool), (batch, 1, seq, kv_seq))
        if bias is None:
            bias_view = np.broadcast_to(np.float32(0.0), (batch, num_heads, seq, kv_seq))
        else:
            bias_view = np.broadcast_to(bias, (batch, num_heads, seq, kv_seq))
    except ValueError as err:
        raise InputError(
            f"attention: mask {None if mask is None else np.shape(mask)} must broadcast to "
            f"(batch, 1, seq, kv_seq) = {(batch, 1, seq, kv_seq)} and bias "
            f"{None if bias is None else bias.shape} to {(batch, num_heads, seq, kv_seq)}"
        ) from err
    scale, cap, has_cap = np.float32(scale), np.float32(0.0 if soft_cap is None else soft_cap), soft_cap is not None
    if seq < ATTENTION_BLAS_MIN_SEQ and not return_weights:
        # Fused (decode): per key block statistics, then one merge per query row.
        key_block = ATTENTION_KEY_BLOCK
        n_blocks = max(-(-kv_seq // key_block), 1)
        sees_nothing = ~mask_view.any(axis=-1)[:, 0]  # (batch, seq)
        block_max = np.empty((batch, num_heads, seq, n_blocks), np.float32)
        block_sum = np.empty((batch, num_heads, seq, n_blocks), np.float32)
        block_out = np.empty((batch, num_heads, seq, n_blocks, head_dim), np.float32)
        _launch(
            _attention_blocks_kernel, kq, kk, kv, mask_view, sees_nothing, bias_view, bias is not None,
            scale, cap, has_cap, key_block, block_max, block_sum, block_out, outputs=3,
        )  # fmt: skip
        out = np.empty((batch, num_heads, seq, head_dim), np.float32)
        _launch(_attention_combine_kernel, block_max, block_sum, block_out, out)
        weights = None
    else:
        groups = num_heads // num_kv_heads
        # GQA without repeating k/v: the query heads of a kv head stacked as rows (copies q only)
        qg = _as_float32(q).reshape(batch, num_kv_heads, groups * seq, head_dim)
        weights = np.matmul(qg, _as_float32(k).swapaxes(-1, -2))  # (batch, num_kv_heads, groups * seq, kv_seq)
        weights = weights.reshape(batch, num_heads, seq, kv_seq)  # scores; weights after the softmax
        _launch(_softmax_kernel, mask_view, bias_view, bias is not None, scale, cap, has_cap, weights)
        wg = weights.reshape(batch, num_kv_heads, groups * seq, kv_seq)
        out = np.matmul(wg, _as_float32(v)).reshape(batch, num_heads, seq, head_dim)
    out = out.astype(_matmul_dtype(q.dtype, v.dtype), copy=False)
    return out, (weights.astype(q.dtype, copy=False) if return_weights else None)
