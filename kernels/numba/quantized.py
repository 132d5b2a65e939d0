"""linear on a weight kept as GGUF blocks (`minilm.io.quants.QuantizedWeight`): no float32 copy.

A GGUF matrix stays in its file's bytes (memory-mapped) and the kernels here rebuild each block's
float32 values on the fly, with the float32 arithmetic of the NumPy reference in
`minilm/io/quants.py` (`dequantize_<type>`), so every weight value is the reference's bit for bit:

    Q8_0   32 values / 34 bytes    w = d * q                        q int8
    Q5_0   32 values / 22 bytes    w = d * (q - 16)                 q 5 bits (4 in qs, 1 in qh)
    Q4_K  256 values / 144 bytes   w = (d * sc[s]) * q - dmin * m[s]  8 sub-blocks of 32, q 4 bits
    Q6_K  256 values / 210 bytes   w = (d * sc[s]) * (q - 32)       16 sub-blocks of 16, q 6 bits

(the byte layouts are drawn in quants.py). `_decode_block` writes one block's values into a small
float32 buffer; both paths use it:

  * decode (rows of x <= GEMV_MAX_ROWS): `_gemv_<type>` (`_gemv_rows`), prange over output rows; each
    block is decoded once into the buffer (L1 cache) and dotted with every row of x. Memory
    traffic is the blocks only (Q4_K: 0.14 of the float32 bytes). Sums are reassociated (SIMD),
    as in the float32 gemv: results equal dequantize-then-matmul to 1e-5 * max|ref|.
  * prefill (more rows): `_dequantize_rows_kernel` turns a tile of output rows (TILE_VALUES) into a
    float32 buffer and BLAS multiplies it, tile after tile: the full float32 matrix never exists.

float16 scales are read from the bytes (`_f16`, exact, no NumPy float16 in compiled code); the Q8_0
gemv looks each one up in a table of all 65 536 float16 values (`F16_TO_F32`).
"""

from __future__ import annotations

import ctypes
import math
import mmap
import os

import numpy as np
from numba import njit, prange

from minilm.io.array_cache import cached_array
from minilm.io.quants import BLOCK_LAYOUT, QuantizedWeight

from .compile import _SUM_IN_ANY_ORDER, _prefetch

# ggml types with kernels here, and the number `_decode_block` knows each one by.
KERNEL_TYPES = {"Q8_0": 0, "Q5_0": 1, "Q4_K": 2, "Q6_K": 3}
GEMV_MAX_ROWS = 8  # as the float32 gemv: up to this many rows of x, the kernel; above, BLAS on tiles
# Values dequantized per BLAS call on the prefill path (16 MB of float32: a whole layer matrix of
# the 270M, 1/40 of its embedding). Few, large tiles: each switch between the numba threads that
# dequantize and OpenBLAS's threads costs a scheduler tick on a small machine (compile.py).
TILE_VALUES = 1 << 22

# 2**(e - 25) for the 5-bit exponent e of a float16 (e = 0: subnormal, uses 2**-24 as e = 1)
_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)


@njit(inline="always")
def _f16(b, i):
    """The little-endian float16 at bytes b[i], b[i + 1] as float32 (exact).
    Normal: (1024 + mantissa) * 2**(e - 25); subnormal: mantissa * 2**-24; e = 31: inf / nan."""
    bits = np.int32(b[i]) | (np.int32(b[i + 1]) << 8)
    e = (bits >> 10) & 31
    mantissa = bits & 1023
    if e == 31:
        value = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    else:
        value = np.float32(mantissa + (1024 if e > 0 else 0)) * _POW2[e]
    return -value if bits & 0x8000 else value


@njit(inline="always")
def _q4_k_scale_min(b, sc, s):
    """Sub-block s's 6-bit scale and min of a Q4_K block whose 12 packed bytes start at b[sc]:
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7; 4-7 split into a nibble of bytes 8-11 and
    the top 2 bits of bytes 0-3 / 4-7 (quants.py draws the layout)."""
    if s < 4:
        return np.int32(b[sc + s]) & 63, np.int32(b[sc + s + 4]) & 63
    scale = (np.int32(b[sc + s + 4]) & 15) | ((np.int32(b[sc + s - 4]) >> 6) << 4)
    low_min = (np.int32(b[sc + s + 4]) >> 4) | ((np.int32(b[sc + s]) >> 6) << 4)
    return scale, low_min


@njit(inline="always")
def _decode_block(kind, b, start, w):
    """The values of the block at bytes b[start:] (one row's bytes, uint8) into w[:values_per_block],
    with the reference's float32 operations (quants.py `dequantize_<type>`)."""
    if kind == 0:  # Q8_0: | d f16 | q[32] int8 |
        d = _f16(b, start)
        for j in range(32):
            q = b[start + 2 + j]
            w[j] = d * np.float32(np.int8(q))  # the byte read as int8
    elif kind == 1:  # Q5_0: | d f16 | qh u32 | qs[16] |   value j: low nibble, j + 16: high nibble
        d = _f16(b, start)
        qh = np.uint32(b[start + 2]) | (np.uint32(b[start + 3]) << 8)
        qh |= (np.uint32(b[start + 4]) << 16) | (np.uint32(b[start + 5]) << 24)
        for j in range(16):
            byte = np.int32(b[start + 6 + j])
            lo = (byte & 15) | (np.int32((qh >> j) & 1) << 4)
            hi = (byte >> 4) | (np.int32((qh >> (j + 16)) & 1) << 4)
            w[j] = d * np.float32(lo - 16)
            w[j + 16] = d * np.float32(hi - 16)
    elif kind == 2:  # Q4_K: | d | dmin | scales[12] | qs[128] |   chunk c: sub-blocks 2c (low), 2c + 1 (high)
        d = _f16(b, start)
        dmin = _f16(b, start + 2)
        sc = start + 4
        for s in range(8):
            scale, low_min = _q4_k_scale_min(b, sc, s)
            sub_scale = d * np.float32(scale)
            offset = dmin * np.float32(low_min)
            qs = start + 16 + 32 * (s >> 1)  # the chunk of sub-block s
            shift = 4 * (s & 1)  # low nibbles for even s, high for odd
            for j in range(32):
                w[32 * s + j] = sub_scale * np.float32((np.int32(b[qs + j]) >> shift) & 15) - offset
    else:  # Q6_K: | ql[128] | qh[64] | scales[16] int8 | d f16 |
        d = _f16(b, start + 208)
        for half in range(2):
            ql, qh = start + 64 * half, start + 128 + 32 * half
            for group in range(4):  # values 128 half + 32 group + l
                sub = 8 * half + 2 * group
                s0 = np.int32(b[start + 192 + sub])
                s1 = np.int32(b[start + 193 + sub])
                scale0 = d * np.float32(s0 - 256 if s0 > 127 else s0)
                scale1 = d * np.float32(s1 - 256 if s1 > 127 else s1)
                low_at = ql + 32 * (group & 1)
                low_shift = 4 * (group >> 1)
                high_shift = 2 * group
                for j in range(32):
                    low = (np.int32(b[low_at + j]) >> low_shift) & 15
                    high = (np.int32(b[qh + j]) >> high_shift) & 3
                    scale = scale0 if j < 16 else scale1
                    w[128 * half + 32 * group + j] = scale * np.float32((low | (high << 4)) - 32)


# The decode gemv, one kernel per type: out[r, o] = sum_i x[r, i] * weight[o, i] (+ bias[o]).
#   x (rows, in_features) float32 C-contiguous; blocks (out_features, row_bytes) uint8, the GGUF
#   bytes of each weight row; bias (out_features,) float32 (ignored unless has_bias);
#   out (rows, out_features) float32.
# prange over chunks of output rows (`_gemv`); `_row_dot_<type>` rebuilds each value in registers
# with the reference's operations (the same as `_decode_block`) and adds value * x into 32 lanes of
# partial sums, so the loops vectorise; the lanes are summed once per output (`_finish_row`).


@njit(inline="always", fastmath=_SUM_IN_ANY_ORDER)
def _row_dot_q8_0(x, row, acc):
    """acc[r, j] += sum over blocks of w[32 blk + j] * x[r, 32 blk + j] for one Q8_0 row."""
    codes = row.view(np.int8)
    for blk in range(x.shape[1] // 32):
        d, start, base = _f16(row, 34 * blk), 34 * blk + 2, 32 * blk
        for r in range(x.shape[0]):
            for j in range(32):
                acc[r, j] += (d * np.float32(codes[start + j])) * x[r, base + j]


@njit(inline="always", fastmath=_SUM_IN_ANY_ORDER)
def _row_dot_q5_0(x, row, acc, q):
    """As _row_dot_q8_0 for Q5_0; q: (32,) int32, room for one block's codes."""
    for blk in range(x.shape[1] // 32):
        start, base = 22 * blk, 32 * blk
        d = _f16(row, start)
        qh = np.int32(row[start + 2]) | (np.int32(row[start + 3]) << 8)
        qh |= (np.int32(row[start + 4]) << 16) | (np.int32(row[start + 5]) << 24)  # bit 31: the sign, never used as one
        for j in range(16):  # value j: low nibble of qs[j]; value j + 16: its high nibble
            byte = np.int32(row[start + 6 + j])
            q[j] = ((byte & 15) | (((qh >> j) & 1) << 4)) - 16
            q[j + 16] = ((byte >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16
        for r in range(x.shape[0]):
            for j in range(32):
                acc[r, j] += (d * np.float32(q[j])) * x[r, base + j]


@njit(inline="always", fastmath=_SUM_IN_ANY_ORDER)
def _row_dot_q4_k(x, row, acc):
    for blk in range(x.shape[1] // 256):
        start = 144 * blk
        d, dmin, sc = _f16(row, start), _f16(row, start + 2), start + 4
        for s in range(8):
            scale, low_min = _q4_k_scale_min(row, sc, s)
            sub_scale, offset = d * np.float32(scale), dmin * np.float32(low_min)
            qs, shift, base = start + 16 + 32 * (s >> 1), 4 * (s & 1), 256 * blk + 32 * s
            for r in range(x.shape[0]):
                for j in range(32):
                    q = np.float32((np.int32(row[qs + j]) >> shift) & 15)
                    acc[r, j] += (sub_scale * q - offset) * x[r, base + j]


@njit(inline="always", fastmath=_SUM_IN_ANY_ORDER)
def _row_dot_q6_k(x, row, acc):
    signed = row.view(np.int8)
    for blk in range(x.shape[1] // 256):
        start = 210 * blk
        d = _f16(row, start + 208)
        for half in range(2):
            ql, qh = start + 64 * half, start + 128 + 32 * half
            for group in range(4):  # values 128 half + 32 group + l, l = 0..31: sub-blocks sub, sub + 1
                sub = 8 * half + 2 * group
                low_at, low_shift, high_shift = ql + 32 * (group & 1), 4 * (group >> 1), 2 * group
                base = 256 * blk + 128 * half + 32 * group
                scale0 = d * np.float32(signed[start + 192 + sub])  # values l < 16
                scale1 = d * np.float32(signed[start + 193 + sub])  # values l >= 16
                for r in range(x.shape[0]):
                    for j in range(32):
                        low = (np.int32(row[low_at + j]) >> low_shift) & 15
                        high = (np.int32(row[qh + j]) >> high_shift) & 3
                        scale = scale0 if j < 16 else scale1
                        acc[r, j] += (scale * np.float32((low | (high << 4)) - 32)) * x[r, base + j]


@njit(inline="always", fastmath=_SUM_IN_ANY_ORDER)
def _finish_row(acc, bias, has_bias, out, o):
    for r in range(acc.shape[0]):
        y = np.float32(0.0)
        for j in range(32):
            y += acc[r, j]
        out[r, o] = y + bias[o] if has_bias else y
        acc[r, :] = 0.0


@njit(inline="always")
def _prefetch_row(flat, row_bytes, o):
    """Ask for weight row o (bytes of `flat`) ahead of its use: the blocks are a memory map of
    4 KiB pages, across which the hardware prefetcher stops; this keeps memory busy."""
    if (o + 1) * row_bytes <= flat.shape[0]:
        for offset in range(0, row_bytes, 64):
            _prefetch(flat, o * row_bytes + offset)


PREFETCH_ROWS = 4  # the gemv asks for the row this far ahead of the one it computes


# Every float16 bit pattern's float32 value (65 536 of them, 256 KB: stays in cache). The Q8_0 gemv
# reads each block's scale d as F16_TO_F32[its two bytes]: one load, no float16 arithmetic in the
# loop, and no float32 copy of the scales (21 MB for the 270M's LM head).
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(inline="always")
def _f16_bits(blocks, o, i):
    """The float16 at bytes i, i + 1 of row o (little-endian) as its bit pattern: an index of F16_TO_F32."""
    return np.int32(blocks[o, i]) | (np.int32(blocks[o, i + 1]) << 8)


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_q8_0(x, blocks, f16_to_f32, bias, has_bias, out):
    """Four weight rows at a time (four memory streams, each x element loaded once for four rows,
    as the float32 gemv), the next four prefetched; the last out_features % 4 rows one by one.
    Each block's d is its float16 looked up in `f16_to_f32` (F16_TO_F32): exact, one load."""
    n, row_bytes = blocks.shape
    flat, codes = blocks.reshape(-1), blocks.view(np.int8)
    n_quads = n // 4
    n_chunks = min(max(n_quads, 1), 256)
    for c in prange(n_chunks):
        acc = np.empty((4, 32), np.float32)  # (row of the quad, lane) partial sums
        for quad in range(c * n_quads // n_chunks, (c + 1) * n_quads // n_chunks):
            o0 = 4 * quad
            _prefetch_row(flat, 4 * row_bytes, quad + 1)
            for r in range(x.shape[0]):
                acc[:] = 0.0
                for blk in range(x.shape[1] // 32):
                    start, base = 34 * blk + 2, 32 * blk
                    d0 = f16_to_f32[_f16_bits(blocks, o0, 34 * blk)]
                    d1 = f16_to_f32[_f16_bits(blocks, o0 + 1, 34 * blk)]
                    d2 = f16_to_f32[_f16_bits(blocks, o0 + 2, 34 * blk)]
                    d3 = f16_to_f32[_f16_bits(blocks, o0 + 3, 34 * blk)]
                    for j in range(32):
                        xi = x[r, base + j]
                        acc[0, j] += (d0 * np.float32(codes[o0, start + j])) * xi
                        acc[1, j] += (d1 * np.float32(codes[o0 + 1, start + j])) * xi
                        acc[2, j] += (d2 * np.float32(codes[o0 + 2, start + j])) * xi
                        acc[3, j] += (d3 * np.float32(codes[o0 + 3, start + j])) * xi
                for k in range(4):
                    y = np.float32(0.0)
                    for j in range(32):
                        y += acc[k, j]
                    out[r, o0 + k] = y + bias[o0 + k] if has_bias else y
    acc = np.zeros((x.shape[0], 32), np.float32)
    for o in range(4 * n_quads, n):  # the last rows
        _row_dot_q8_0(x, blocks[o], acc)
        _finish_row(acc, bias, has_bias, out, o)


@njit(inline="always")
def _q5_0_high_bits(row, start):
    """The 32 fifth bits (qh) of the Q5_0 block at row[start:], as one int32."""
    qh = np.int32(row[start + 2]) | (np.int32(row[start + 3]) << 8)
    return qh | (np.int32(row[start + 4]) << 16) | (np.int32(row[start + 5]) << 24)


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_q5_0(x, blocks, scales, bias, has_bias, out):
    """As _gemv_q8_0: four rows at a time, block scales from `block_scales`. Value j < 16 of a
    block is the low nibble of qs[j] with bit j of qh as its fifth bit, value j + 16 the high
    nibble with bit j + 16; both are rebuilt in registers, next to their multiply."""
    n, row_bytes = blocks.shape
    flat = blocks.reshape(-1)
    n_quads = n // 4
    n_chunks = min(max(n_quads, 1), 256)
    for c in prange(n_chunks):
        acc = np.empty((4, 32), np.float32)  # (row of the quad, lane) partial sums
        for quad in range(c * n_quads // n_chunks, (c + 1) * n_quads // n_chunks):
            o0 = 4 * quad
            _prefetch_row(flat, 4 * row_bytes, quad + 1)
            b0, b1, b2, b3 = blocks[o0], blocks[o0 + 1], blocks[o0 + 2], blocks[o0 + 3]
            for r in range(x.shape[0]):
                acc[:] = 0.0
                for blk in range(x.shape[1] // 32):
                    start, base = 22 * blk, 32 * blk
                    d0, d1, d2, d3 = scales[o0, blk], scales[o0 + 1, blk], scales[o0 + 2, blk], scales[o0 + 3, blk]
                    h0, h1 = _q5_0_high_bits(b0, start), _q5_0_high_bits(b1, start)
                    h2, h3 = _q5_0_high_bits(b2, start), _q5_0_high_bits(b3, start)
                    for j in range(16):
                        x_lo, x_hi = x[r, base + j], x[r, base + 16 + j]
                        q0, q1 = np.int32(b0[start + 6 + j]), np.int32(b1[start + 6 + j])
                        q2, q3 = np.int32(b2[start + 6 + j]), np.int32(b3[start + 6 + j])
                        acc[0, j] += (d0 * np.float32(((q0 & 15) | (((h0 >> j) & 1) << 4)) - 16)) * x_lo
                        acc[1, j] += (d1 * np.float32(((q1 & 15) | (((h1 >> j) & 1) << 4)) - 16)) * x_lo
                        acc[2, j] += (d2 * np.float32(((q2 & 15) | (((h2 >> j) & 1) << 4)) - 16)) * x_lo
                        acc[3, j] += (d3 * np.float32(((q3 & 15) | (((h3 >> j) & 1) << 4)) - 16)) * x_lo
                        acc[0, 16 + j] += (d0 * np.float32(((q0 >> 4) | (((h0 >> (j + 16)) & 1) << 4)) - 16)) * x_hi
                        acc[1, 16 + j] += (d1 * np.float32(((q1 >> 4) | (((h1 >> (j + 16)) & 1) << 4)) - 16)) * x_hi
                        acc[2, 16 + j] += (d2 * np.float32(((q2 >> 4) | (((h2 >> (j + 16)) & 1) << 4)) - 16)) * x_hi
                        acc[3, 16 + j] += (d3 * np.float32(((q3 >> 4) | (((h3 >> (j + 16)) & 1) << 4)) - 16)) * x_hi
                for k in range(4):
                    y = np.float32(0.0)
                    for j in range(32):
                        y += acc[k, j]
                    out[r, o0 + k] = y + bias[o0 + k] if has_bias else y
    acc, q1 = np.zeros((x.shape[0], 32), np.float32), np.empty(32, np.int32)
    for o in range(4 * n_quads, n):  # the last rows
        _row_dot_q5_0(x, blocks[o], acc, q1)
        _finish_row(acc, bias, has_bias, out, o)


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_q4_k(x, blocks, bias, has_bias, out):
    n, flat = blocks.shape[0], blocks.reshape(-1)
    n_chunks = min(n, 256)
    for c in prange(n_chunks):
        acc = np.zeros((x.shape[0], 32), np.float32)
        for o in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            _prefetch_row(flat, blocks.shape[1], o + PREFETCH_ROWS)
            _row_dot_q4_k(x, blocks[o], acc)
            _finish_row(acc, bias, has_bias, out, o)


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_q6_k(x, blocks, bias, has_bias, out):
    n, flat = blocks.shape[0], blocks.reshape(-1)
    n_chunks = min(n, 256)
    for c in prange(n_chunks):
        acc = np.zeros((x.shape[0], 32), np.float32)
        for o in range(c * n // n_chunks, (c + 1) * n // n_chunks):
            _prefetch_row(flat, blocks.shape[1], o + PREFETCH_ROWS)
            _row_dot_q6_k(x, blocks[o], acc)
            _finish_row(acc, bias, has_bias, out, o)


_GEMV = {"Q8_0": _gemv_q8_0, "Q5_0": _gemv_q5_0, "Q4_K": _gemv_q4_k, "Q6_K": _gemv_q6_k}


@njit(cache=True)
def _dequantize_rows_kernel(blocks, kind, block_values, first, out):
    """out[k] = the float32 values of weight row first + k (exact: the reference's operations).
    blocks (out_features, row_bytes) uint8, out (tile_rows, in_features) float32. One thread: it
    runs between BLAS calls, whose threads would otherwise trade the cores with numba's."""
    tile_rows, in_features = out.shape
    n_blocks = in_features // block_values
    block_bytes = blocks.shape[1] // n_blocks
    w = np.empty(256, np.float32)
    for k in range(tile_rows):
        row = blocks[first + k]
        for blk in range(n_blocks):
            _decode_block(kind, row, blk * block_bytes, w)
            for j in range(block_values):
                out[k, blk * block_values + j] = w[j]


# ---------------------------------------------------------------------------------------------
# What the backend's linear and prepare_weight call
# ---------------------------------------------------------------------------------------------


# The types the loader keeps as blocks by default: every type with a kernel here. Decode reads
# Q8_0 from its blocks and Q5_0 repacked to int8 codes (`repacked_codes`), both as fast as the int8
# codes linear.py finds in float32 weights, so no float32 copy is needed: the 270M peaks at
# ~0.9 GB instead of ~2 GB and loads in half the time. MINILM_KEEP_QUANTIZED chooses otherwise
# ("none": every weight float32, as the NumPy reference holds them; or a list of types).
DEFAULT_KEPT_TYPES = set(KERNEL_TYPES)


def kept_types():
    """The ggml types `reads_quantized` accepts now: $MINILM_KEEP_QUANTIZED = "all" (every type with
    a kernel), "none", or a comma-separated list such as "Q4_K,Q6_K"; unset: DEFAULT_KEPT_TYPES."""
    choice = os.environ.get("MINILM_KEEP_QUANTIZED", "").strip()
    if not choice:
        return DEFAULT_KEPT_TYPES
    if choice in ("all", "none"):
        return set(KERNEL_TYPES) if choice == "all" else set()
    return {name.strip() for name in choice.split(",")} & set(KERNEL_TYPES)


def reads_quantized(weight):
    """`ops.reads_quantized`: True for a QuantizedWeight of a type this backend keeps as blocks."""
    return isinstance(weight, QuantizedWeight) and weight.type_name in kept_types()


def block_scales(weight):
    """(out_features, blocks per row) float32: the scale d of every block of a Q5_0 weight, read
    from its float16 (exact) once and kept on the weight (`prepare_blocks`), next to its int8 codes.
    Other types: None (Q8_0's gemv reads its float16 scales in place, through F16_TO_F32)."""
    if weight.type_name != "Q5_0":
        return None
    if getattr(weight, "block_scales", None) is None:
        bytes_per_block = BLOCK_LAYOUT[weight.type_name][1]
        n_blocks = weight.blocks.shape[1] // bytes_per_block

        def read_scales():
            grouped = weight.blocks.reshape(weight.shape[0], n_blocks, bytes_per_block)
            return np.ascontiguousarray(grouped[:, :, :2]).view(np.float16)[..., 0].astype(np.float32)

        # cached next to the model: a warm start maps them and never touches the blocks here
        recipe, shape = f"{weight.type_name} block scales 1", (weight.shape[0], n_blocks)
        weight.block_scales = cached_array(weight.blocks, recipe, shape, np.float32, read_scales)
    return weight.block_scales


_PAGE = mmap.PAGESIZE


def _release_file_pages(blocks):
    """Tell the system this process no longer needs the memory-mapped file pages inside `blocks`
    (madvise MADV_DONTNEED; Linux only, elsewhere nothing): they leave its resident memory, and
    are read from the file again should anything touch them. Only whole pages inside the array."""
    if not _maps_a_file(blocks):  # memory of its own: dropping it would lose the values
        return
    start = -(-blocks.ctypes.data // _PAGE) * _PAGE
    end = (blocks.ctypes.data + blocks.nbytes) // _PAGE * _PAGE
    if end > start and hasattr(mmap, "MADV_DONTNEED"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED)
        except (OSError, AttributeError):
            pass


def _maps_a_file(array):
    """True when `array` is a view into a memory map (a GGUF file's bytes), not memory of its own."""
    base = array
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


@njit(parallel=True, cache=True)
def _unpack_q5_0_kernel(blocks, codes):
    """codes[o, 32 b + j] = the signed code of value j of block b of row o (`_decode_block`'s
    Q5_0 rule, without the scale). blocks (out_features, row_bytes) uint8; prange over rows."""
    for o in prange(blocks.shape[0]):
        row = blocks[o]
        for blk in range(codes.shape[1] // 32):
            start = 22 * blk
            qh = np.int32(row[start + 2]) | (np.int32(row[start + 3]) << 8)
            qh |= (np.int32(row[start + 4]) << 16) | (np.int32(row[start + 5]) << 24)
            for j in range(16):
                byte = np.int32(row[start + 6 + j])
                codes[o, 32 * blk + j] = ((byte & 15) | (((qh >> j) & 1) << 4)) - 16
                codes[o, 32 * blk + 16 + j] = ((byte >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16


def repacked_codes(weight):
    """Q5_0 only: (out_features, in_features) int8, the signed code (q - 16) of every value, so that
    value = block_scales[o, i // 32] * code, exactly. Unpacking five-bit codes costs more than the
    memory it saves, so decode reads these (linear.py's int8 gemv, 1 byte per value instead of
    0.69) and the GGUF blocks are no longer touched; llama.cpp repacks its weights at load the same
    way. Built once per weight (`prepare_blocks`). Other types: None."""
    if weight.type_name != "Q5_0":
        return None
    if getattr(weight, "codes", None) is None:

        def unpack():
            codes = np.empty(weight.shape, np.int8)  # (out_features, in_features)
            _unpack_q5_0_kernel(weight.blocks, codes)
            _release_file_pages(weight.blocks)  # decode reads the codes now, never these blocks
            return codes

        # cached next to the model (memory-mapped on a warm start): no unpacking, no numba call at load
        codes = cached_array(weight.blocks, "Q5_0 int8 codes 1", weight.shape, np.int8, unpack)
        codes.flags.writeable = False
        weight.codes = codes
    return weight.codes


def prepare_blocks(weight):
    """What `prepare_weight` does once, at load, for a weight kept as blocks: the float32 block
    scales of Q8_0 / Q5_0 and the repacked codes of Q5_0. Returns the weight."""
    block_scales(weight)
    repacked_codes(weight)
    return weight


def _fill_tile(weight, kind, block_values, first, out):
    """out (count, in_features) = rows first .. first + count - 1 of the weight as float32, the
    reference's values. Q8_0 / Q5_0: scale * code over whole tiles at once (NumPy, vectorised;
    the same float32 products as the reference); the K-quants: `_dequantize_rows_kernel`."""
    if weight.type_name not in ("Q8_0", "Q5_0"):
        _dequantize_rows_kernel(weight.blocks, kind, block_values, first, out)
        return
    count, in_features = out.shape
    rows = slice(first, first + count)
    if weight.type_name == "Q5_0":  # repacked
        scales = block_scales(weight)[rows]  # (count, blocks) float32
        codes = repacked_codes(weight)[rows].reshape(count, -1, 32)  # (count, blocks, 32) int8
    else:  # Q8_0: | d f16 | q[32] int8 | blocks, read in place
        grouped = weight.blocks[rows].reshape(count, -1, 34)
        scales = np.ascontiguousarray(grouped[:, :, :2]).view(np.float16)[..., 0].astype(np.float32)
        codes = grouped[:, :, 2:].view(np.int8)
    np.multiply(scales[:, :, None], codes, out=out.reshape(count, -1, 32))


def _gemv_scales(weight):
    """The scale argument the type's gemv takes after the blocks: Q8_0 the float16 table, Q5_0 its
    float32 block scales, the K-quants none (their scales are inside the blocks)."""
    if weight.type_name == "Q8_0":
        return (F16_TO_F32,)
    if weight.type_name == "Q5_0":
        return (block_scales(weight),)
    return ()


def dequantize_rows(weight, first, count):
    """Rows first .. first + count - 1 of the weight as float32 (count, in_features): a prefill tile."""
    out = np.empty((count, weight.shape[1]), np.float32)
    _fill_tile(weight, KERNEL_TYPES[weight.type_name], BLOCK_LAYOUT[weight.type_name][0], first, out)
    return out


_NO_BIAS = np.zeros(1, np.float32)


def linear_quantized(x, weight, bias=None):
    """y = x W^T + b for a QuantizedWeight W of a type in KERNEL_TYPES. x (..., in_features)
    float32 -> (..., out_features) float32 (the dtype of the reference with a float32 weight)."""
    out_features, in_features = weight.shape
    lead = x.shape[:-1]
    rows = math.prod(lead)
    x2 = np.ascontiguousarray(x.reshape(rows, in_features), dtype=np.float32)  # (rows, in_features)
    kind, block_values = KERNEL_TYPES[weight.type_name], BLOCK_LAYOUT[weight.type_name][0]
    b = _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    if rows <= GEMV_MAX_ROWS:
        y = np.empty((rows, out_features), np.float32)  # (rows, out_features)
        _GEMV[weight.type_name](x2, weight.blocks, *_gemv_scales(weight), b, bias is not None, y)
    else:  # compute-bound: BLAS on float32 tiles of the weight, one tile in memory at a time
        y = np.empty((rows, out_features), np.float32)
        tile_rows = min(out_features, max(TILE_VALUES // in_features, 1))
        tile = np.empty((tile_rows, in_features), np.float32)  # (tile_rows, in_features)
        for first in range(0, out_features, tile_rows):
            count = min(tile_rows, out_features - first)
            _fill_tile(weight, kind, block_values, first, tile[:count])
            y[:, first : first + count] = x2 @ tile[:count].T  # BLAS into a new array, then copied
        if bias is not None:
            y += b
    return y.reshape(*lead, out_features)


def linear_input_grad_quantized(dy, weight):
    """dx = dy W for a QuantizedWeight W of a type in KERNEL_TYPES (the backward of linear):
    dy (..., out_features) -> (..., in_features) float32. Like prefill: BLAS on float32 tiles of
    the weight's rows, one tile in memory at a time, dx = sum over tiles of dy[:, tile] W[tile]."""
    out_features, in_features = weight.shape
    lead = dy.shape[:-1]
    dy2 = np.ascontiguousarray(dy.reshape(-1, out_features), dtype=np.float32)  # (rows, out_features)
    kind, block_values = KERNEL_TYPES[weight.type_name], BLOCK_LAYOUT[weight.type_name][0]
    dx = np.zeros((dy2.shape[0], in_features), np.float32)  # (rows, in_features)
    tile_rows = min(out_features, max(TILE_VALUES // in_features, 1))
    tile = np.empty((tile_rows, in_features), np.float32)  # (tile_rows, in_features)
    for first in range(0, out_features, tile_rows):
        count = min(tile_rows, out_features - first)
        _dequantize_rows_kernel(weight.blocks, kind, block_values, first, tile[:count])
        dx += (tile[:count].T @ dy2[:, first : first + count].T).T  # (rows, in_features)
    return dx.reshape(*lead, in_features)
