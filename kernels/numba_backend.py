"""Numba CPU kernels for the three ops of `minilm.ops`: linear, attention and expert dispatch.

Importing this module registers the backend "numba" (`minilm.ops.set_backend("numba")`). Each
public function here has the signature of its NumPy reference in `minilm/ops.py` and returns what
the reference returns, to the tolerances stated in `tests/test_kernels.py`.

Axis names, as in the references:
    batch, num_heads, num_kv_heads, groups = num_heads // num_kv_heads, seq (query positions),
    kv_seq (key positions), head_dim, in_features, out_features, tokens, top_k, hidden_size,
    num_experts, moe_intermediate_size

Precision rules (the same in every kernel)
------------------------------------------
* float32 and bfloat16 (`ml_dtypes.bfloat16`) inputs run in the kernels; any other dtype (float64,
  float16) falls back to the NumPy reference, which is slower but gives the same answer.
* Numba cannot compute in bfloat16. A bfloat16 array is passed to the kernels as its raw bits
  (`a.view(np.uint16)`) and each element is widened to float32 as it is loaded (`_to_f32`: the 16
  bits become the high half of a float32, which is exact). So there is no converted copy of a
  bfloat16 weight or KV cache, and all arithmetic and every accumulator is float32.
* The output dtype is the reference's: NumPy is asked what the reference's last operation would
  give for these input dtypes (`_matmul_dtype`); e.g. ml_dtypes' bfloat16 @ bfloat16 gives float32,
  so bf16 linear and attention return float32 and bf16 `moe_dispatch` returns bfloat16 (the
  reference's `zeros_like(x)`). A float32 result is rounded to bfloat16 once, at the end.
  The bf16 reference rounds some intermediates to bf16 (the scale, the attention weights, the
  running expert sum); the kernels do not, so they are the more accurate of the two.
* Sums may be reassociated: `fastmath={"reassoc", "contract"}` (reassociation and fused
  multiply-add only, nothing that changes inf/NaN handling) on `_dot`, the gemv kernel and the
  fused attention kernel, the same freedom BLAS takes; without it the dot products do not become
  SIMD code and the decode gemv is 5x slower. The tests hold these kernels to 1e-5 * max|ref|.
  Everything else (masks, soft cap, exp, activations) follows the reference's operations in float32.
* Softmax follows `minilm.nn.softmax`: subtract the row max (0 if the max is not finite),
  exponentiate, divide by the sum (by 1 if the sum is 0). A query row whose mask allows no key
  attends uniformly to all keys, as `ops.attention_reference` does (transformers' behaviour). The
  fused decode kernel computes the same softmax over blocks of keys and merges them
  (flash-decoding), so its rounding differs from the reference's within the tolerance.
* Layouts: every input is compiled for as a read-only array of any strides (`_launch`), so
  transposed views, broadcast masks and a KV cache sliced from a larger buffer are read in place,
  never copied; the hot loops test for unit stride along the last axis so they still vectorise.
* Thresholds pick a path by size (GEMV_MAX_ROWS, ATTENTION_BLAS_MIN_SEQ, EXPERT_KERNEL_MAX_PAIRS):
  small, memory-bound work (decode) runs in the compiled kernels, large compute-bound matmuls go
  to NumPy's BLAS (numba has no BLAS without SciPy). The tests run every case down both paths.
* Expert sums: each (token, slot) result is written to its own row, then every token adds its
  top_k rows in slot order j = 0..top_k-1 (the reference adds them in expert-id order). The order
  never depends on threads, so results are bit-for-bit repeatable.
* int8 blocks (decode linears): a float32 weight whose every block of 32 (or 16) columns is a
  float32 scale times integers in [-127, 127] (what a dequantized Q8_0 / Q5_0 / Q6_K tensor is) is
  read as int8 codes + scales, a quarter of the bytes, and rebuilt exactly element by element in
  the kernel; a weight stored so becomes read-only. See "Weights that are small integers" below.

Compilation is cached on disk (`cache=True`, in `kernels/__pycache__`, or $NUMBA_CACHE_DIR), so
only the first process after an edit pays for it (about 8 s for the float32 decode kernels on 2
cores; 0.5 s from the cache); each new dtype combination compiles once.

Threads: the kernels use numba's threads, NumPy's BLAS uses OpenBLAS's. On a 2-core machine,
OpenBLAS's idle threads spin for a while after each call, and a numba parallel kernel that starts
in that window waits a scheduler tick (about 4 ms) for a core; the reverse also happens. Decode
therefore never touches BLAS on this backend; a process that mixes both heavily can set
OPENBLAS_THREAD_TIMEOUT=4 (before NumPy is imported) to make OpenBLAS's threads sleep sooner.
Measured on the 270M (2 cores, quiet): it leaves decode as it is on this backend (28-29 tok/s),
raises prefill at 512 from ~500 to ~545 tok/s here and from ~550 to ~580 on the NumPy path, and
lowers NumPy decode from 16.0 to 14.8 tok/s (its BLAS threads then sleep between the gemvs), so
minilm does not set it. Parallel kernels need both cores: with one core taken by another
process, decode drops to ~6.5 tok/s on 2 threads and runs at ~17 tok/s with NUMBA_NUM_THREADS=1.
"""

from __future__ import annotations

import functools
import math
import weakref

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from minilm import nn, ops
from minilm.errors import InputError

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Reassociation and fused multiply-add for dot products only (see the module docstring).
_SUM_IN_ANY_ORDER = {"reassoc", "contract"}

# ---------------------------------------------------------------------------------------------
# Loading float32 or bfloat16 elements as float32
# ---------------------------------------------------------------------------------------------


@intrinsic
def _bf16_bits_to_f32(typingctx, bits):
    """The float32 whose high 16 bits are `bits` (a bfloat16's bit pattern) and low 16 bits are 0.
    This is the exact value of the bfloat16: the widening conversion, done with a shift."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


def _to_f32(value):
    """An element of a kernel array as float32 (float32 as is; uint16 = bfloat16 bits, widened)."""
    raise NotImplementedError("only callable from compiled code")


@overload(_to_f32, inline="always")
def _to_f32_overload(value):
    if value == types.uint16:
        return lambda value: _bf16_bits_to_f32(value)
    if isinstance(value, types.Float):
        return lambda value: np.float32(value)
    return None


def _unit_stride(row):
    """True when the elements of a 1-D kernel array are adjacent in memory."""
    raise NotImplementedError("only callable from compiled code")


@overload(_unit_stride, inline="always")
def _unit_stride_overload(row):
    step = row.dtype.bitwidth // 8  # bytes per element, a constant when compiling: the compiler
    return lambda row: row.strides[0] == step  # then knows the stride inside `if _unit_stride(...)`


def _last_axis_unit_stride(a):
    """True when the elements along the last axis of a kernel array are adjacent in memory."""
    raise NotImplementedError("only callable from compiled code")


@overload(_last_axis_unit_stride, inline="always")
def _last_axis_unit_stride_overload(a):
    step, last = a.dtype.bitwidth // 8, a.ndim - 1  # constants when compiling (see _unit_stride)
    return lambda a: a.strides[last] == step


def _kernel_array(a):
    """The array a kernel reads: float32 as is, bfloat16 as its uint16 bits; None for other dtypes."""
    if a.dtype == np.float32:
        return a
    if a.dtype == BFLOAT16:
        return a.view(np.uint16)
    return None


def _as_float32(a):
    """A float32 array with the values of `a` (copies bf16; used only on the BLAS paths)."""
    return a.astype(np.float32, copy=False)


@functools.lru_cache(maxsize=None)
def _matmul_dtype(a_dtype, b_dtype):
    """The dtype NumPy gives `a @ b` for these dtypes (bf16 @ bf16 is float32 with ml_dtypes)."""
    return (np.zeros((1, 1), a_dtype) @ np.zeros((1, 1), b_dtype)).dtype


@njit(fastmath=_SUM_IN_ANY_ORDER, cache=True)
def _dot(a, b):
    """sum_i a[i] * b[i] in float32. a, b: (n,) float32 or bfloat16 bits.

    A reassociated sum (so that it becomes SIMD code). Kernels accept arrays of any layout; the
    branch on unit strides (rows of contiguous tensors, the usual case) tells the compiler the
    elements are adjacent, which it needs to vectorise the loop.
    """
    acc = np.float32(0.0)
    if _unit_stride(a) and _unit_stride(b):
        for i in range(a.shape[0]):
            acc += _to_f32(a[i]) * _to_f32(b[i])
    else:
        for i in range(a.shape[0]):
            acc += _to_f32(a[i]) * _to_f32(b[i])
    return acc


@njit(cache=True)
def _add_scaled(out, w, v):
    """out += w * v, elementwise in float32. out: (n,) float32; v: (n,) float32 or bf16 bits.
    (No reduction, so strict IEEE; the unit-stride branch is there for vectorisation, as in _dot.)"""
    if _unit_stride(out) and _unit_stride(v):
        for i in range(out.shape[0]):
            out[i] += w * _to_f32(v[i])
    else:
        for i in range(out.shape[0]):
            out[i] += w * _to_f32(v[i])


def _numba_type(kind, is_output):
    """The numba type a kernel argument is compiled for (see `_launch`); kind from `_arg_kind`."""
    if isinstance(kind, tuple):  # an array: (dtype, ndim)
        dtype, ndim = numba.from_dtype(kind[0]), kind[1]
        return types.Array(dtype, ndim, "C") if is_output else types.Array(dtype, ndim, "A", readonly=True)
    return {bool: types.boolean, np.float32: types.float32, int: types.int64}[kind]


def _arg_kind(value):
    """What decides a kernel argument's compiled type, cheap to compute and to hash."""
    if isinstance(value, np.ndarray):
        return (value.dtype, value.ndim)
    if isinstance(value, (bool, np.bool_)):
        return bool
    if isinstance(value, np.float32):
        return np.float32
    if isinstance(value, (int, np.integer)):
        return int
    raise TypeError(f"no kernel argument type for {type(value).__name__}")


@functools.lru_cache(maxsize=None)
def _entry_point(kernel, kinds, outputs):
    """`kernel` compiled for these argument kinds: loaded from the disk cache, or compiled once."""
    n = len(kinds) - outputs
    return kernel.compile(tuple(_numba_type(kind, is_output=i >= n) for i, kind in enumerate(kinds)))


def _launch(kernel, *args, outputs=1):
    """Run `kernel(*args)`; its last `outputs` arguments are the arrays it writes.

    Every input array is compiled for as a read-only array of any memory layout, and every output
    as a C-contiguous array we allocated, so one compiled kernel per dtype combination serves
    contiguous tensors, transposed views and broadcast masks alike (numba's default would compile
    a new kernel for each layout it meets, seconds each). The compiled entry point is looked up
    by (dtype, ndim) of the arguments, which costs microseconds per call.
    """
    for out in args[len(args) - outputs :]:
        assert out.flags.c_contiguous, "kernel outputs are arrays this module allocated, C-contiguous"
    _entry_point(kernel, tuple(_arg_kind(a) for a in args), outputs)(*args)


# ---------------------------------------------------------------------------------------------
# linear: y = x W^T + b
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


# Weights that are small integers times a scale per block of 32 (or 16) columns: the same float32
# numbers in about a quarter of the bytes. A quantized checkpoint (GGUF Q8_0, Q5_0, Q4_0, Q6_K ...)
# gives exactly such weights once dequantized: every value is d * q with d a float16 scale and q a
# small integer, and that product is exact in float32. Decode (a gemv) is bound by memory
# bandwidth, so reading int8 codes + one float32 scale per block (0.28x the bytes) is faster: on 2
# cores the 270M's LM head (262144 x 640) takes ~12 ms instead of ~26 ms, a decode step ~34 ms
# instead of ~57 ms.
#
# It is lossless, not a quantization: a weight is stored this way only if codes * scales rebuilds
# every float32 value bit for bit, and the kernel rebuilds each element that way (codes[o, i] *
# scale, exact) before multiplying it with x[i]. So the products w_i * x_i are those of the
# float32 path; only the order of the sum differs (as everywhere in these kernels).
#
# The analysis runs once per weight, the first time a decode step uses it (~0.7 s for the 270M's
# tied embedding on 2 cores, ~0.1 s for all its layers), and its result (the codes, or "not of
# that form") is kept while the array lives. A weight stored this way is made read-only: an
# in-place change would not reach its int8 copy. Change weights with `load_state_dict` instead.

# Weights with fewer elements stay float32 (small matrices gain nothing and tests stay unaffected).
INT8_MIN_ELEMENTS = 1 << 17
_INT8_BLOCKS = (32, 16)  # columns per scale, tried in this order
_int8_weights = {}  # (id of the array owning the memory, address, shape) -> (codes, scales) or None


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
_arena = {"buffer": np.empty(0, np.uint8), "used": 0}


def _packed(a):
    """`a` copied into a shared 64 MB buffer, right after the array packed before it.

    Weights are analysed in the order decode first uses them, so one decode step then reads the
    int8 weights of a layer as one stretch of memory, and NumPy backs a buffer this large with
    huge pages (where the system allows): the hardware prefetcher runs on across the calls instead
    of starting again at every 4 KiB page of every small matrix. Arrays over a quarter of the
    buffer (the tied embedding) have their own allocation, on huge pages already.
    """
    if a.nbytes > INT8_ARENA_BYTES // 4:
        return a
    start = -(-_arena["used"] // 64) * 64  # the next cache line
    if start + a.nbytes > _arena["buffer"].nbytes:
        _arena["buffer"], start = np.empty(INT8_ARENA_BYTES, np.uint8), 0
    packed = _arena["buffer"][start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    packed[...] = a
    _arena["used"] = start + a.nbytes
    return packed


def _memory_owner(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _int8_weight(weight):
    """The (codes, scales) form of a float32 weight for the decode kernel, or None to use it as is.

    Analysed once per weight (the key is the array that owns the memory, which lives as long as the
    model, and the weight's address and shape within it); forgotten when that array is freed.
    """
    if (weight.dtype != np.float32 or weight.ndim != 2 or weight.size < INT8_MIN_ELEMENTS
            or not weight.flags.c_contiguous):
        return None
    owner = _memory_owner(weight)
    key = (id(owner), weight.__array_interface__["data"][0], weight.shape)
    if key not in _int8_weights:
        compact = _find_int8_blocks(weight)
        _int8_weights[key] = compact
        weakref.finalize(owner, _int8_weights.pop, key, None)
        if compact is not None:  # from now on its int8 copy is what decode reads: no in-place changes
            weight.flags.writeable = False
    return _int8_weights[key]


@intrinsic
def _prefetch(typingctx, a, index):
    """Ask the CPU to start loading the cache line that holds a[index] (a: 1-D array). A hint:
    it changes no value, only when memory is read."""
    if not isinstance(a, types.Array) or a.ndim != 1 or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        address = builder.bitcast(builder.gep(array.data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]), "llvm.prefetch.p0i8")
        builder.call(prefetch, [address, i32(0), i32(3), i32(1)])  # read, keep in all caches, data
        return context.get_dummy_value()

    return types.void(a, index), codegen


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
    busy while this group computes (without it the int8 stream runs at ~10 GB/s, with it ~16).
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


def linear(x, weight, bias=None):
    """Numba version of `ops.linear_reference`: x (..., in_features), weight (out_features, in_features)."""
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
    kb = _kernel_array(bias) if bias is not None else kw[:1, 0]  # unused; the weight's type compiles once
    if kx is None or kw is None or kb is None:
        return ops.linear_reference(x, weight, bias)  # float64 / float16: the reference
    lead, in_features = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = kx.reshape(rows, in_features)  # (rows, in_features), a view when x is contiguous
    if rows <= GEMV_MAX_ROWS:
        y = np.empty((rows, weight.shape[0]), np.float32)  # (rows, out_features)
        compact = _int8_weight(weight)
        if compact is not None:  # the same float32 values, read as int8 codes + block scales
            # Called directly (not through _launch): every argument is C-contiguous, which the
            # compiler needs to know to vectorise the int8 loads, and it compiles once per dtype.
            codes, scales = compact
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
# attention: softmax(soft_cap(q k^T * scale) + bias, masked) @ v, grouped-query heads
# ---------------------------------------------------------------------------------------------


# From this many query positions on (long prefill), or when the weights are asked for, q k^T and
# weights @ v go to BLAS and only the masked softmax is compiled (BLAS's blocked matmuls beat one
# dot product per (query, key) once the switch between OpenBLAS's and numba's threads, about 4 ms
# on 2 cores, is paid for); below it (decode, short prompts) the fused kernel below runs.
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
            f"attention: q {q.shape}, k {k.shape}, v {v.shape} must all be 4-D "
            f"(batch, heads, seq, head_dim)"
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


# ---------------------------------------------------------------------------------------------
# moe_dispatch: out[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t])
# ---------------------------------------------------------------------------------------------

# Activation names (as in nn.ACTIVATIONS) -> code the compiled kernel switches on.
_ACTIVATION_CODES = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2, "gelu_fast": 2}
# Experts with at most this many (token, slot) pairs on average run in the compiled kernels;
# above it the expert products are compute-bound and go to BLAS, one expert at a time.
EXPERT_KERNEL_MAX_PAIRS = 4


@njit(cache=True)
def _activation(x, code):
    """The activation with this code, in float32, written as in minilm.nn (x: float32 scalar)."""
    if code == 0:  # silu: x * sigmoid(x)
        return x / (np.float32(1.0) + np.exp(-x))
    if code == 1:  # gelu, exact: x * Phi(x), erf in float64 as nn.gelu does
        return np.float32(0.5) * x * (np.float32(1.0) + np.float32(math.erf(np.float64(x / np.float32(math.sqrt(2))))))
    # gelu, tanh approximation
    c = np.float32(math.sqrt(2 / math.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


@njit(cache=True)
def _group_by_expert(top_k_index, num_experts):
    """Counting sort of the (token, slot) pairs by expert id; pair p = token * top_k + slot.

    top_k_index (tokens, top_k) int ->
      starts       (num_experts + 1,): the pairs of expert e have ranks starts[e] .. starts[e+1]-1
      pair_of_rank (tokens * top_k,):  the pair at each rank (token order within an expert: stable)
      rank_of_pair (tokens * top_k,):  the inverse permutation
    Two passes over the pairs, whatever num_experts is: experts with no token cost nothing.
    """
    tokens, top_k = top_k_index.shape
    starts = np.zeros(num_experts + 1, np.int64)
    for t in range(tokens):
        for j in range(top_k):
            starts[top_k_index[t, j] + 1] += 1  # count of expert e, stored at e + 1
    for e in range(num_experts):
        starts[e + 1] += starts[e]  # prefix sum: first rank of each expert
    next_rank = starts[:-1].copy()  # (num_experts,)
    pair_of_rank = np.empty(tokens * top_k, np.int64)
    rank_of_pair = np.empty(tokens * top_k, np.int64)
    for t in range(tokens):
        for j in range(top_k):
            e = top_k_index[t, j]
            rank = next_rank[e]
            next_rank[e] += 1
            pair_of_rank[rank] = t * top_k + j
            rank_of_pair[t * top_k + j] = rank
    return starts, pair_of_rank, rank_of_pair


@njit(parallel=True, cache=True)
def _experts_up_kernel(x, pair_of_rank, starts, active, gate_proj, up_proj, top_k, act_code, h):
    """h[r] = act(gate_proj[e] x_t) * (up_proj[e] x_t) for every rank r, of token t, of expert e.

    x          (tokens, hidden_size)                              float32 or bf16 bits
    gate/up    (num_experts, moe_intermediate_size, hidden_size)  float32 or bf16 bits
    active     (num_active,) the experts that received a pair
    h          (tokens * top_k, moe_intermediate_size)            float32, in rank order

    prange over (active expert, intermediate row i): the two weight rows are read once and dotted
    with each of the expert's tokens; experts nobody chose are never touched.
    """
    inter = gate_proj.shape[1]
    for f in prange(active.shape[0] * inter):
        e = active[f // inter]
        i = f % inter
        for rank in range(starts[e], starts[e + 1]):
            t = pair_of_rank[rank] // top_k
            g = _dot(gate_proj[e, i], x[t])
            u = _dot(up_proj[e, i], x[t])
            h[rank, i] = _activation(g, act_code) * u


@njit(parallel=True, cache=True)
def _experts_down_kernel(h, starts, active, down_proj, y):
    """y[r] = down_proj[e] h[r] for every rank r of expert e.

    h (tokens * top_k, moe_intermediate_size) float32; down_proj (num_experts, hidden_size,
    moe_intermediate_size) float32 or bf16 bits; y (tokens * top_k, hidden_size) float32.
    prange over (active expert, hidden row o), as in _experts_up_kernel.
    """
    hidden = down_proj.shape[1]
    for f in prange(active.shape[0] * hidden):
        e = active[f // hidden]
        o = f % hidden
        for rank in range(starts[e], starts[e + 1]):
            y[rank, o] = _dot(down_proj[e, o], h[rank])


@njit(parallel=True, cache=True)
def _combine_kernel(y, rank_of_pair, top_k_weights, out):
    """out[t] = sum_j top_k_weights[t, j] * y[rank of (t, j)], slots added in order j = 0..top_k-1.

    y (tokens * top_k, hidden_size) float32; top_k_weights (tokens, top_k) float32 or bf16 bits;
    out (tokens, hidden_size) float32. prange over tokens: each writes only its own row, so the
    scatter-add needs no atomics and its order never depends on the threads.
    """
    tokens, top_k = top_k_weights.shape
    for t in prange(tokens):
        o = out[t]  # (hidden_size,)
        o[:] = 0.0
        for j in range(top_k):
            w = _to_f32(top_k_weights[t, j])
            _add_scaled(o, w, y[rank_of_pair[t * top_k + j]])  # o += w * y_r, (hidden_size,)


def _experts_blas(x, pair_of_rank, top_k, starts, active, gate_proj, up_proj, down_proj, activation):
    """The expert products for large groups: one BLAS call per projection per active expert.

    Gathers the tokens in rank order once (no per-expert np.nonzero), so each expert's rows are
    one contiguous slice. Returns y (tokens * top_k, hidden_size) float32 in rank order.
    """
    act = nn.activation(activation)
    xs = _as_float32(x)[pair_of_rank // top_k]  # (tokens * top_k, hidden_size), rank order
    y = np.empty((xs.shape[0], down_proj.shape[1]), np.float32)
    for e in active:
        lo, hi = starts[e], starts[e + 1]
        g = xs[lo:hi] @ _as_float32(gate_proj[e]).T  # (pairs_e, moe_intermediate_size)
        u = xs[lo:hi] @ _as_float32(up_proj[e]).T
        y[lo:hi] = (act(g) * u) @ _as_float32(down_proj[e]).T  # (pairs_e, hidden_size)
    return y


def moe_dispatch(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation="silu"):
    """Numba version of `ops.moe_dispatch_reference`: group the (token, slot) pairs by expert,
    run each chosen expert once on its contiguous group, then add the weighted results per token."""
    x, top_k_index, top_k_weights = np.asarray(x), np.asarray(top_k_index), np.asarray(top_k_weights)
    gate_proj, up_proj, down_proj = np.asarray(gate_proj), np.asarray(up_proj), np.asarray(down_proj)
    nn.activation(activation)  # raises ConfigError naming an unknown activation
    tokens, hidden = x.shape
    num_experts, inter, _ = gate_proj.shape
    if (
        gate_proj.shape != (num_experts, inter, hidden)
        or up_proj.shape != gate_proj.shape
        or down_proj.shape != (num_experts, hidden, inter)
    ):
        raise InputError(
            f"moe_dispatch: gate_proj {gate_proj.shape}, up_proj {up_proj.shape}, down_proj "
            f"{down_proj.shape} do not fit x {x.shape}: expected (num_experts, moe_intermediate_size, "
            f"{hidden}) twice and (num_experts, {hidden}, moe_intermediate_size)"
        )
    if top_k_index.ndim != 2 or top_k_index.shape[0] != tokens or top_k_weights.shape != top_k_index.shape:
        raise InputError(
            f"moe_dispatch: top_k_index {top_k_index.shape} and top_k_weights {top_k_weights.shape} "
            f"must both be (tokens={tokens}, top_k)"
        )
    if top_k_index.size and (top_k_index.min() < 0 or top_k_index.max() >= num_experts):
        raise InputError(
            f"moe_dispatch: top_k_index holds expert ids {top_k_index.min()}..{top_k_index.max()}, "
            f"outside 0..{num_experts - 1}"
        )
    arrays = [_kernel_array(a) for a in (x, top_k_weights, gate_proj, up_proj, down_proj)]
    if any(a is None for a in arrays):
        return ops.moe_dispatch_reference(x, top_k_index, top_k_weights, gate_proj, up_proj, down_proj, activation)
    kx, kw, kgate, kup, kdown = arrays
    if kgate.dtype != kup.dtype:  # compile for one (gate, up) dtype pair only
        kgate, kup = _as_float32(gate_proj), _as_float32(up_proj)
    top_k = top_k_index.shape[1]
    index = np.ascontiguousarray(top_k_index, dtype=np.int64)  # (tokens, top_k)
    starts, pair_of_rank, rank_of_pair = _group_by_expert(index, num_experts)
    active = np.flatnonzero(np.diff(starts))  # (num_active,) experts with at least one pair
    if tokens * top_k <= EXPERT_KERNEL_MAX_PAIRS * max(len(active), 1) and activation in _ACTIVATION_CODES:
        h = np.empty((tokens * top_k, inter), np.float32)  # (pairs, moe_intermediate_size), rank order
        _launch(_experts_up_kernel, kx, pair_of_rank, starts, active, kgate, kup, top_k, _ACTIVATION_CODES[activation], h)
        y = np.empty((tokens * top_k, hidden), np.float32)  # (pairs, hidden_size), rank order
        _launch(_experts_down_kernel, h, starts, active, kdown, y)
    else:
        y = _experts_blas(x, pair_of_rank, top_k, starts, active, gate_proj, up_proj, down_proj, activation)
    out = np.empty((tokens, hidden), np.float32)
    _launch(_combine_kernel, y, rank_of_pair, kw, out)
    return out.astype(x.dtype, copy=False)


ops.register_backend("numba", {"linear": linear, "attention": attention, "moe_dispatch": moe_dispatch})
