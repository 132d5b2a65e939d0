"""linear (y = x W^T + b) on the CPU: a compiled gemv for decode, BLAS for many rows, and the
int8 block form of a weight that `prepare_weight` finds once, when the model loads it.

Weights that are small integers times a scale per block of 32 (or 16) columns hold the same
float32 numbers in about a quarter of the bytes. A quantized checkpoint (GGUF Q8_0, Q5_0, Q4_0,
Q6_K ...) gives exactly such weights once dequantized: every value is d * q with d a float16 scale
and q a small integer, and that product is exact in float32. Decode (a gemv) is bound by memory
bandwidth, so it reads int8 codes + one float32 scale per block (0.28x the bytes) instead.

It is lossless, not a quantization: `prepare_weight` returns an `Int8BlockWeight` only if
codes * scales rebuilds every float32 value bit for bit, and the kernel rebuilds each element that
way (codes[o, i] * scale, exact) before multiplying it with x[i]. So the products w_i * x_i are
those of the float32 path; only the order of the sum differs (as everywhere in these kernels).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from minilm import ops
from minilm.errors import InputError
from minilm.io.quants import QuantizedWeight

from . import quantized
from .compile import (
    _SUM_IN_ANY_ORDER,
    _as_float32,
    _kernel_array,
    _last_axis_unit_stride,
    _launch,
    _matmul_dtype,
    _prefetch,
    _to_f32,
)

# ---------------------------------------------------------------------------------------------
# The float32 / bfloat16 gemv
# ---------------------------------------------------------------------------------------------

# Up to this many rows of x, the compiled kernel (which reads W once for all rows) beats BLAS;
# above it, the product is compute-bound and NumPy's BLAS does it better.
GEMV_MAX_ROWS = 8


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_kernel(x, weight, bias, has_bias, out):
    """out[r, o] = sum_i x[r, i] * weight[o, i] (+ bias[o]), for a few rows r.

    x      (rows, in_features)           float32 or bf16 bits
    weight (out_features, in_features)   float32 or bf16 bits, any layout
    bias   (out_features,)               float32 or bf16 bits (ignored unless has_bias)
    out    (rows, out_features)          float32

    x is first widened into a float32 buffer (small). Then prange over groups of four output
    features: each thread streams its share of weight rows from memory once (four rows side by
    side, as BLAS's gemv does) and dots them with every row of x, which stays in cache. For decode
    (rows = 1) this is a memory-bound gemv, so bf16 weights, read as 16 bits, are twice as fast as
    float32. The dot products are reassociated sums (SIMD); the unit-stride test tells the
    compiler the elements of a row are adjacent. The bias is added after the sum, as x W^T + b.
    """
    rows, in_features = x.shape
    out_features = weight.shape[0]
    xs = np.empty((rows, in_features), np.float32)  # (rows, in_features) x as float32
    for r in range(rows):
        for i in range(in_features):
            xs[r, i] = _to_f32(x[r, i])
    n_quads = -(-out_features // 4)
    for quad in prange(n_quads):  # four weight rows at a time: four memory streams, x read once
        o0 = 4 * quad
        if o0 + 4 <= out_features and _last_axis_unit_stride(weight):
            for r in range(rows):
                y0 = y1 = y2 = y3 = np.float32(0.0)
                for i in range(in_features):
                    xi = xs[r, i]
                    y0 += _to_f32(weight[o0, i]) * xi
                    y1 += _to_f32(weight[o0 + 1, i]) * xi
                    y2 += _to_f32(weight[o0 + 2, i]) * xi
                    y3 += _to_f32(weight[o0 + 3, i]) * xi
                out[r, o0], out[r, o0 + 1], out[r, o0 + 2], out[r, o0 + 3] = y0, y1, y2, y3
        else:  # the last rows, or a weight whose rows are not contiguous
            for o in range(o0, min(o0 + 4, out_features)):
                for r in range(rows):
                    y = np.float32(0.0)
                    for i in range(in_features):
                        y += _to_f32(weight[o, i]) * xs[r, i]
                    out[r, o] = y
        if has_bias:
            for o in range(o0, min(o0 + 4, out_features)):
                for r in range(rows):
                    out[r, o] += _to_f32(bias[o])


# ---------------------------------------------------------------------------------------------
# Int8 block weights: found once per weight at load (`prepare_weight`), read by decode
# ---------------------------------------------------------------------------------------------

# Weights with fewer elements stay plain float32 (small matrices gain nothing).
INT8_MIN_ELEMENTS = 1 << 17
_INT8_BLOCKS = (32, 16)  # columns per scale, tried in this order


class Int8BlockWeight(np.ndarray):
    """A float32 weight (out_features, in_features) that is exactly `codes * scales` per block.

    It is the float32 array (a read-only view of the array `prepare_weight` was given), so the
    NumPy reference, BLAS, `w.T`, `w @ x` and an embedding lookup `table[ids]` use it as plain
    float32. The decode kernel reads the other form instead:
        codes  (out_features, in_features)          int8, read-only
        scales (out_features, in_features // block) float32, read-only, block = 32 or 16
        weight[o, i] == scales[o, i // block] * codes[o, i]   bit for bit

    Only the array `prepare_weight` returns carries codes: any array derived from it (a view, a
    slice, `w.T`, a copy, `table[ids]`) has `codes is None`, and ufuncs (`w * 2`, `x @ w.T`) give
    plain ndarrays. It is read-only because its int8 form would not follow an in-place change;
    change weights with `load_state_dict`.
    """

    codes = None
    scales = None

    def __array_finalize__(self, obj):
        self.codes = None  # a view, slice or copy: the int8 form belongs to the prepared array only
        self.scales = None

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """Compute on plain ndarrays: a result is new float32 data, not a weight with codes."""
        inputs = tuple(a.view(np.ndarray) if isinstance(a, Int8BlockWeight) else a for a in inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(a.view(np.ndarray) if isinstance(a, Int8BlockWeight) else a for a in kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)


@njit(cache=True)
def _block_scale(w, lo, hi):
    """A float32 s such that w[i] == s * q_i exactly, with integers |q_i| <= 127, for i in lo..hi-1;
    -1 if there is none. w: (in_features,) float32.

    The value of largest magnitude is m = s * k for some integer k <= 127 (in a quantized block,
    k = 127 for Q8_0, 16 or 15 for Q5_0, ...), and m / k is then s exactly: try k = 127 .. 1.
    Plain IEEE arithmetic here (no fastmath): the check is bit-exact.
    """
    m = np.float32(0.0)
    for i in range(lo, hi):
        m = max(m, abs(w[i]))
    if m == 0.0:
        return np.float32(0.0)
    for k in range(127, 0, -1):
        scale = m / np.float32(k)
        exact = True
        for i in range(lo, hi):
            q = np.rint(w[i] / scale)
            if abs(q) > 127.0 or scale * q != w[i]:
                exact = False
                break
        if exact:
            return scale
    return np.float32(-1.0)


@njit(parallel=True, cache=True)
def _int8_blocks_kernel(weight, block, codes, scales, failed):
    """codes (out_features, in_features) int8, scales (out_features, in_features // block) float32
    with weight[o, i] == scales[o, i // block] * codes[o, i] exactly; failed[0] set if some block
    has no such form. prange over rows; a row stops at its first failing block, and the other rows
    stop as soon as they see the flag."""
    out_features, in_features = weight.shape
    for o in prange(out_features):
        for b in range(in_features // block):
            if failed[0]:
                break
            lo, hi = b * block, (b + 1) * block
            scale = _block_scale(weight[o], lo, hi)
            if scale < 0.0:
                failed[0] = True
                break
            scales[o, b] = scale
            for i in range(lo, hi):
                codes[o, i] = np.int8(np.rint(weight[o, i] / scale)) if scale > 0.0 else np.int8(0)


def _find_int8_blocks(weight):
    """(codes, scales) rebuilding `weight` exactly (see above), or None. weight: 2-D float32, C order."""
    out_features, in_features = weight.shape
    for block in _INT8_BLOCKS:
        if in_features % block:
            continue
        failed = np.zeros(1, np.bool_)
        head = min(out_features, 4)  # a float32 weight fails on its first block: decide on a few rows first
        codes = np.empty((head, in_features), np.int8)
        scales = np.empty((head, in_features // block), np.float32)
        _int8_blocks_kernel(weight[:head], block, codes, scales, failed)
        if failed[0]:
            continue
        codes = np.empty((out_features, in_features), np.int8)
        scales = np.empty((out_features, in_features // block), np.float32)
        _int8_blocks_kernel(weight, block, codes, scales, failed)
        if not failed[0]:
            return _packed(codes), _packed(scales)
    return None


INT8_ARENA_BYTES = 64 << 20
_arena = {"buffer": np.empty(0, np.uint8), "used": 0}  # where the next codes / scales are placed


def _packed(a):
    """`a` copied into a shared 64 MB buffer, right after the array packed before it; read-only.

    A model prepares its weights in the order a forward pass reads them, so one decode step reads
    the int8 weights of a layer as one stretch of memory, and NumPy backs a buffer this large with
    huge pages (where the system allows): the hardware prefetcher runs on across the calls instead
    of starting again at every 4 KiB page of every small matrix. Arrays over a quarter of the
    buffer (a large embedding) have their own allocation, on huge pages already. Nothing is looked
    up here: the buffer only hands out memory, and it is freed with the last weight that uses it.
    """
    if a.nbytes > INT8_ARENA_BYTES // 4:
        a.flags.writeable = False
        return a
    start = -(-_arena["used"] // 64) * 64  # the next cache line
    if start + a.nbytes > _arena["buffer"].nbytes:
        _arena["buffer"], start = np.empty(INT8_ARENA_BYTES, np.uint8), 0
    packed = _arena["buffer"][start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    packed[...] = a
    packed.flags.writeable = False
    _arena["used"] = start + a.nbytes
    return packed


def prepare_weight(weight):
    """`ops.prepare_weight` on this backend, called once per weight at load: an `Int8BlockWeight`
    (a read-only view of `weight` with its int8 codes and block scales) for a float32, 2-D,
    C-contiguous weight of at least INT8_MIN_ELEMENTS elements whose every block of 32 (or 16)
    columns is exactly a scale times integers in [-127, 127]; otherwise `np.asarray(weight)`.
    `weight` itself is left as it was (values and flags)."""
    if isinstance(weight, Int8BlockWeight) and weight.codes is not None:
        return weight  # prepared already (e.g. `model.to_device()` twice)
    if isinstance(weight, QuantizedWeight):  # GGUF blocks: kept when quantized.py has kernels for them
        return quantized.prepare_blocks(weight) if quantized.reads_quantized(weight) else np.asarray(weight)
    weight = np.asarray(weight)
    if (
        weight.dtype != np.float32
        or weight.ndim != 2
        or weight.size < INT8_MIN_ELEMENTS
        or not weight.flags.c_contiguous
    ):
        return weight
    found = _find_int8_blocks(weight)
    if found is None:
        return weight
    prepared = weight.view(Int8BlockWeight)
    prepared.codes, prepared.scales = found
    prepared.flags.writeable = False
    return prepared


_NO_BIAS = np.zeros(1, np.float32)  # the bias argument of a linear without one (never read)
# Groups of four rows of the int8 weight the decode kernel asks the memory system for ahead of use.
INT8_PREFETCH_QUADS = 1


@njit(parallel=True, cache=True, fastmath=_SUM_IN_ANY_ORDER)
def _gemv_int8_kernel(x, codes, scales, bias, has_bias, out):
    """out[r, o] = sum_i x[r, i] * weight[o, i] (+ bias[o]) with weight[o, i] = codes[o, i] *
    scales[o, i // block], for a few rows r: `_gemv_kernel` on the int8 form of the weight.

    x      (rows, in_features)                  float32 or bf16 bits
    codes  (out_features, in_features)          int8             all arrays C-contiguous
    scales (out_features, in_features // block) float32, block = 16 or 32
    bias   (out_features,)                      float32 or bf16 bits (ignored unless has_bias)
    out    (rows, out_features)                 float32

    prange over chunks of groups of four output features. Each element is rebuilt as
    codes * scale (exact, by construction) and multiplied with x: the same products as the float32
    kernel, added in another order. The sums run over 16 lanes per weight row (acc), which stay
    in vector registers, so no horizontal sum is needed per block; each block of 16 columns loads
    its four scales once. The rows of the group four ahead are prefetched, which keeps the memory
    busy while this group computes.
    """
    rows, in_features = x.shape
    out_features, n_blocks = codes.shape[0], scales.shape[1]
    block_shift = 1 if in_features // n_blocks == 32 else 0  # column group g of 16 is in block g >> block_shift
    flat = codes.reshape(-1)  # (out_features * in_features,) for the prefetch addresses
    xs = np.empty((rows, in_features), np.float32)  # (rows, in_features) x as float32
    for r in range(rows):
        for i in range(in_features):
            xs[r, i] = _to_f32(x[r, i])
    n_quads = -(-out_features // 4)
    n_chunks = min(n_quads, 256)
    for chunk in prange(n_chunks):
        acc = np.empty((4, 16), np.float32)  # (row of the group, lane) partial sums
        for quad in range(chunk * n_quads // n_chunks, (chunk + 1) * n_quads // n_chunks):
            o0 = 4 * quad
            ahead = (o0 + 4 * INT8_PREFETCH_QUADS) * in_features
            if ahead + 4 * in_features <= flat.shape[0]:
                for offset in range(0, 4 * in_features, 64):  # one cache line at a time
                    _prefetch(flat, ahead + offset)
            if o0 + 4 <= out_features:
                for r in range(rows):
                    acc[:] = 0.0
                    for g in range(in_features // 16):  # 16 columns at a time
                        b = g >> block_shift  # their block
                        s0, s1, s2, s3 = scales[o0, b], scales[o0 + 1, b], scales[o0 + 2, b], scales[o0 + 3, b]
                        for j in range(16):
                            i = 16 * g + j
                            xi = xs[r, i]
                            acc[0, j] += (np.float32(codes[o0, i]) * s0) * xi
                            acc[1, j] += (np.float32(codes[o0 + 1, i]) * s1) * xi
                            acc[2, j] += (np.float32(codes[o0 + 2, i]) * s2) * xi
                            acc[3, j] += (np.float32(codes[o0 + 3, i]) * s3) * xi
                    for k in range(4):
                        y = np.float32(0.0)
                        for j in range(16):
                            y += acc[k, j]
                        out[r, o0 + k] = y
            else:  # the last rows
                for o in range(o0, out_features):
                    for r in range(rows):
                        y = np.float32(0.0)
                        for i in range(in_features):
                            y += (np.float32(codes[o, i]) * scales[o, (i >> 4) >> block_shift]) * xs[r, i]
                        out[r, o] = y
            if has_bias:
                for o in range(o0, min(o0 + 4, out_features)):
                    for r in range(rows):
                        out[r, o] += _to_f32(bias[o])


# ---------------------------------------------------------------------------------------------
# linear: y = x W^T + b
# ---------------------------------------------------------------------------------------------


def linear(x, weight, bias=None):
    """Numba version of `ops.linear_reference`: x (..., in_features), weight (out_features, in_features).
    A weight prepared as an `Int8BlockWeight` is read as its int8 codes on the gemv path, and a
    `QuantizedWeight` (GGUF blocks) by the kernels of quantized.py."""
    if isinstance(weight, QuantizedWeight):
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != weight.shape[1] or (bias is not None and np.shape(bias) != weight.shape[:1]):
            raise InputError(
                f"linear: x {x.shape}, weight {weight.shape} and bias {None if bias is None else np.shape(bias)} "
                f"do not fit: expected x (..., in_features), weight (out_features, in_features), bias (out_features,)"
            )
        if not quantized.reads_quantized(weight) or x.dtype != np.float32:
            return ops.linear_reference(x, np.asarray(weight), bias)
        codes = quantized.repacked_codes(weight)  # Q5_0: int8 codes with the block scales
        rows = math.prod(x.shape[:-1])
        if codes is not None and rows <= GEMV_MAX_ROWS:
            y = np.empty((rows, weight.shape[0]), np.float32)  # (rows, out_features)
            kb = _NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
            x2 = np.ascontiguousarray(x.reshape(rows, x.shape[-1]))
            _gemv_int8_kernel(x2, codes, quantized.block_scales(weight), kb, bias is not None, y)
            return y.reshape(*x.shape[:-1], weight.shape[0])
        return quantized.linear_quantized(x, weight, bias)
    codes, scales = getattr(weight, "codes", None), getattr(weight, "scales", None)
    x, weight = np.asarray(x), np.asarray(weight)
    if weight.ndim != 2 or x.ndim < 1 or x.shape[-1] != weight.shape[1]:
        raise InputError(
            f"linear: x {x.shape} and weight {weight.shape} do not fit: expected x (..., in_features) "
            f"and weight (out_features, in_features) with the same in_features"
        )
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise InputError(f"linear: bias has shape {bias.shape}, expected ({weight.shape[0]},)")
    out_dtype = _matmul_dtype(x.dtype, weight.dtype)
    if bias is not None:
        out_dtype = np.result_type(out_dtype, bias.dtype)
    kx, kw = _kernel_array(x), _kernel_array(weight)
    if kx is None or kw is None:
        return ops.linear_reference(x, weight, bias)  # float64 / float16: the reference
    kb = _kernel_array(bias) if bias is not None else kw[:1, 0]  # unused; the weight's type compiles once
    if kb is None:
        return ops.linear_reference(x, weight, bias)
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = kx.reshape(rows, in_features)  # (rows, in_features), a view when x is contiguous
    if rows <= GEMV_MAX_ROWS:
        y = np.empty((rows, weight.shape[0]), np.float32)  # (rows, out_features)
        if codes is not None:  # the same float32 values, read as int8 codes + block scales
            # Called directly (not through _launch): every argument is C-contiguous, which the
            # compiler needs to know to vectorise the int8 loads, and it compiles once per dtype.
            kb = np.ascontiguousarray(kb) if bias is not None else _NO_BIAS
            _gemv_int8_kernel(np.ascontiguousarray(x2), codes, scales, kb, bias is not None, y)
        else:
            _launch(_gemv_kernel, x2, kw, kb, bias is not None, y)
    else:
        # Compute-bound: BLAS sgemm (a bf16 weight is widened to a float32 copy first).
        y = _as_float32(x.reshape(rows, in_features)) @ _as_float32(weight).T
        if bias is not None:
            y += _as_float32(bias)
    return y.reshape(*lead, weight.shape[0]).astype(out_dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# linear_input_grad: dx = dy W (the backward of linear through a frozen weight)
# ---------------------------------------------------------------------------------------------


def linear_input_grad(dy, weight):
    """Numba-backend version of `ops.linear_input_grad_reference`: dy (..., out_features), weight
    (out_features, in_features) -> dx (..., in_features) float32. The backward pass multiplies
    many rows at once (compute-bound), so this is one BLAS sgemm on the float32 values: an
    `Int8BlockWeight` is read as the float32 array it is, a bf16 weight is widened; a
    `QuantizedWeight` this backend reads is dequantized a tile of rows at a time (quantized.py),
    any other one for the call."""
    dy = np.asarray(dy)
    if weight.ndim != 2 or dy.ndim < 1 or dy.shape[-1] != weight.shape[0]:
        raise InputError(
            f"linear_input_grad: dy {dy.shape} and weight {tuple(weight.shape)} do not fit: expected dy "
            f"(..., out_features) and weight (out_features, in_features)"
        )
    if isinstance(weight, QuantizedWeight) and quantized.reads_quantized(weight):
        return quantized.linear_input_grad_quantized(dy, weight)  # tiles of the blocks, never all float32
    w = np.asarray(weight) if isinstance(weight, QuantizedWeight) else weight.view(np.ndarray)
    lead = dy.shape[:-1]
    dy2, w = _as_float32(dy.reshape(-1, dy.shape[-1])), _as_float32(w)  # (rows, out_features), (out, in)
    if w.shape[0] >= TALL_WEIGHT_RATIO * w.shape[1]:
        # A tall weight (an LM head: vocab_size x hidden_size) sums over a huge out_features; OpenBLAS
        # runs that product about 5x faster written as (W^T dy^T)^T (measured on the 262144 x 640 head).
        dx = np.ascontiguousarray((w.T @ dy2.T).T)  # (rows, in_features)
    else:
        dx = dy2 @ w  # (rows, in_features), sgemm
    return dx.reshape(*lead, w.shape[1])


TALL_WEIGHT_RATIO = 16  # out_features / in_features from which linear_input_grad transposes the product
