"""What every Numba kernel shares: loading float32 or bfloat16 elements, dot products, and `_launch`.

Axis names, as in the references of `minilm/ops.py`:
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
  multiply-add only, nothing that changes inf/NaN handling) on `_dot`, the gemv kernels and the
  fused attention kernel, the same freedom BLAS takes; without it the dot products do not become
  SIMD code. The tests hold these kernels to 1e-5 * max|ref|. Everything else (masks, soft cap,
  exp, activations) follows the reference's operations in float32.
* Layouts: every input is compiled for as a read-only array of any strides (`_launch`), so
  transposed views, broadcast masks and a KV cache sliced from a larger buffer are read in place,
  never copied; the hot loops test for unit stride along the last axis so they still vectorise.
* Thresholds pick a path by size (GEMV_MAX_ROWS, ATTENTION_BLAS_MIN_SEQ, EXPERT_KERNEL_MAX_PAIRS):
  small, memory-bound work (decode) runs in the compiled kernels, large compute-bound matmuls go
  to NumPy's BLAS (numba has no BLAS without SciPy). The tests run every case down both paths.

Compilation is cached on disk (`cache=True`, in `__pycache__` next to each file, or
$NUMBA_CACHE_DIR), so only the first process after an edit pays for it; each new dtype
combination compiles once. Numba checks only the file a kernel is defined in when it reuses a
cached kernel: after editing this file, delete `kernels/numba/__pycache__` so that the kernels in
the other files, which compile these helpers into themselves, are compiled again.

Threads: the kernels use numba's threads, NumPy's BLAS uses OpenBLAS's. With few cores, a numba
parallel kernel that starts while OpenBLAS's idle threads still spin waits a scheduler tick for a
core (and the reverse), so decode never touches BLAS on this backend.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

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


@functools.cache
def _matmul_dtype(a_dtype, b_dtype):
    """The dtype NumPy gives `a @ b` for these dtypes (bf16 @ bf16 is float32 with ml_dtypes)."""
    return (np.zeros((1, 1), a_dtype) @ np.zeros((1, 1), b_dtype)).dtype


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
            builder.module, ir.FunctionType(ir.VoidType(), [address.type, i32, i32, i32]), "llvm.prefetch.p0i8"
        )
        builder.call(prefetch, [address, i32(0), i32(3), i32(1)])  # read, keep in all caches, data
        return context.get_dummy_value()

    return types.void(a, index), codegen


# ---------------------------------------------------------------------------------------------
# Dot products and scaled sums, called from the kernels
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Launching a kernel: one compiled version per dtype combination, whatever the layouts
# ---------------------------------------------------------------------------------------------


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


@functools.cache
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
