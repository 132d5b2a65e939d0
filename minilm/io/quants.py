"""GGUF's block-quantized weight formats, and how to turn their bytes back into float32.

A ggml *type* is either a plain float (F32, F16, BF16, F64) or a block-quantized layout: a row of
weights is cut into blocks of 32 values (Q4_0 .. Q8_0, IQ4_NL) or super-blocks of 256 (the
k-quants Q2_K .. Q6_K, IQ4_XS), and each block carries its own scale(s) next to small integer
codes. Blocks never straddle two rows, so a tensor's bytes are `(n_blocks, bytes_per_block)` and
its values `(n_blocks, values_per_block)`, reshaped to the tensor's shape at the end.

One function per type, `dequantize_<type>(blocks) -> values`, each with the byte layout of one
block drawn in its docstring, written from ggml's block definitions (`ggml-common.h`,
`ggml-quants.c` `dequantize_row_*`) with the same float32 arithmetic order, so results equal
llama.cpp's / gguf-py's bit for bit. `DEQUANTIZE` maps type names to them; `BLOCK_LAYOUT` gives
each type's (values_per_block, bytes_per_block).
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError

# --------------------------------------------------------------------------------------------
# Block layouts
# --------------------------------------------------------------------------------------------

QK = 32  # values per block of the "legacy" quants (Q4_0 .. Q8_0, IQ4_NL)
QK_K = 256  # values per super-block of the k-quants (Q2_K .. Q6_K, IQ4_XS)

# ggml type name -> (values_per_block, bytes_per_block)
BLOCK_LAYOUT: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "F64": (1, 8),
    "Q4_0": (QK, 2 + QK // 2),
    "Q4_1": (QK, 2 + 2 + QK // 2),
    "Q5_0": (QK, 2 + 4 + QK // 2),
    "Q5_1": (QK, 2 + 2 + 4 + QK // 2),
    "Q8_0": (QK, 2 + QK),
    "Q2_K": (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    "Q3_K": (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    "Q4_K": (QK_K, 2 + 2 + 12 + QK_K // 2),
    "Q5_K": (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    "Q6_K": (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    "IQ4_NL": (QK, 2 + QK // 2),
    "IQ4_XS": (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
}


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The little-endian float16 at byte `start` of each block, as float32. (n_blocks, 1)"""
    return blocks[:, start : start + 2].view("<f2").astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """Split bytes into 4-bit codes: all low nibbles first, then all high nibbles.

    (n_blocks, k) uint8 -> (n_blocks, 2 * k) uint8; byte j gives codes j (low) and j + k (high),
    which is how every ggml 4-bit layout orders two half-blocks.
    """
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1)


def _nibbles_interleaved(packed: np.ndarray) -> np.ndarray:
    """Nibbles in byte order, low then high of each byte. (n_blocks, k) -> (n_blocks, 2 * k)"""
    return np.stack([packed & 0x0F, packed >> 4], axis=2).reshape(packed.shape[0], -1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """Bit i of a little-endian bit field, for i < count. (n_blocks, nbytes) -> (n_blocks, count)"""
    bits = np.unpackbits(packed, axis=1, bitorder="little")  # (n_blocks, 8 * nbytes)
    return bits[:, :count]


# --------------------------------------------------------------------------------------------
# Plain floats: one value per "block"
# --------------------------------------------------------------------------------------------


def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: `| f32 (4 bytes) |` per value. (n, 4) uint8 -> (n, 1) float32 (a copy)."""
    return blocks.view("<f4").astype(np.float32)


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: `| f16 (2 bytes) |` per value (IEEE half). (n, 2) uint8 -> (n, 1) float32."""
    return blocks.view("<f2").astype(np.float32)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: `| bf16 (2 bytes) |` per value, the top 16 bits of a float32.

    Shifting the 16 bits back up and reinterpreting gives the float32 exactly.
    (n, 2) uint8 -> (n, 1) float32
    """
    top_bits = blocks.view("<u2").astype(np.uint32)  # (n, 1)
    return (top_bits << 16).view(np.float32)


def dequantize_f64(blocks: np.ndarray) -> np.ndarray:
    """F64: `| f64 (8 bytes) |` per value, rounded to float32. (n, 8) uint8 -> (n, 1) float32."""
    return blocks.view("<f8").astype(np.float32)


# --------------------------------------------------------------------------------------------
# Legacy quants: blocks of 32 values with one scale (and one min for the *_1 types)
# --------------------------------------------------------------------------------------------


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: 32 values in 34 bytes.

        byte 0       2                                    34
             | d f16 | q[0] q[1] ... q[31]   (int8)     |

        w[i] = d * q[i]

    (n_blocks, 34) uint8 -> (n_blocks, 32) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    w = blocks[:, 2:].view(np.int8).astype(np.float32)  # (n_blocks, 32), q as float
    w *= d  # in place: the embedding alone is 167M values
    return w


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: 32 values in 18 bytes, 4-bit codes centred on 8.

        byte 0       2                           18
             | d f16 | qs[0] ... qs[15]          |
                       qs[j] = q[j] | q[j + 16] << 4      (low nibble, high nibble)

        w[i] = d * (q[i] - 8)

    (n_blocks, 18) uint8 -> (n_blocks, 32) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    q = _nibbles(blocks[:, 2:]).astype(np.int8) - 8  # (n_blocks, 32) in [-8, 7]
    return d * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: 32 values in 20 bytes, 4-bit codes with a scale and a min.

        byte 0       2       4                   20
             | d f16 | m f16 | qs[0] ... qs[15]  |     qs[j] = q[j] | q[j + 16] << 4

        w[i] = d * q[i] + m

    (n_blocks, 20) uint8 -> (n_blocks, 32) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    m = _f16(blocks, 2)  # (n_blocks, 1)
    q = _nibbles(blocks[:, 4:]).astype(np.float32)  # (n_blocks, 32) in [0, 15]
    return d * q + m


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: 32 values in 22 bytes, 5-bit codes centred on 16.

        byte 0       2                6                      22
             | d f16 | qh (32 bits)   | qs[0] ... qs[15]     |
                       bit i of qh = 5th bit of q[i]      qs[j] = low 4 bits of q[j], q[j + 16]

        q[i] = nibble[i] | qh_bit[i] << 4,      w[i] = d * (q[i] - 16)

    (n_blocks, 22) uint8 -> (n_blocks, 32) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    high = _bits(blocks[:, 2:6], QK)  # (n_blocks, 32) in {0, 1}
    q = (_nibbles(blocks[:, 6:]) | (high << 4)).astype(np.int8) - 16  # (n_blocks, 32) in [-16, 15]
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: 32 values in 24 bytes, 5-bit codes with a scale and a min.

        byte 0       2       4                8                    24
             | d f16 | m f16 | qh (32 bits)   | qs[0] ... qs[15]   |

        q[i] = nibble[i] | qh_bit[i] << 4,      w[i] = d * q[i] + m

    (n_blocks, 24) uint8 -> (n_blocks, 32) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    m = _f16(blocks, 2)  # (n_blocks, 1)
    high = _bits(blocks[:, 4:8], QK)  # (n_blocks, 32)
    q = (_nibbles(blocks[:, 8:]) | (high << 4)).astype(np.float32)  # (n_blocks, 32) in [0, 31]
    return d * q + m


IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    """IQ4_NL: 32 values in 18 bytes, 4-bit codes into a fixed non-linear table.

        byte 0       2                           18
             | d f16 | qs[0] ... qs[15]          |     qs[j] = q[j] | q[j + 16] << 4

        w[i] = d * IQ4_NL_VALUES[q[i]]

    (n_blocks, 18) uint8 -> (n_blocks, 32) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    levels = IQ4_NL_VALUES[_nibbles(blocks[:, 2:])].astype(np.float32)  # (n_blocks, 32)
    return d * levels


# --------------------------------------------------------------------------------------------
# k-quants: super-blocks of 256 values = 8 sub-blocks of 32 (or 16 of 16), each with its own
# small integer scale (and min), themselves scaled by the super-block's float16 d (and dmin)
# --------------------------------------------------------------------------------------------


def _k_scales_and_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 bytes holding 8 six-bit scales `sc` and 8 six-bit mins `m` (Q4_K, Q5_K).

        bytes 0-3:  sc[0..3] in bits 0-5,  high 2 bits of sc[4..7] in bits 6-7
        bytes 4-7:  m[0..3]  in bits 0-5,  high 2 bits of m[4..7]  in bits 6-7
        bytes 8-11: low 4 bits of sc[4..7] in bits 0-3, low 4 bits of m[4..7] in bits 4-7

    (n_blocks, 12) uint8 -> sc, m: (n_blocks, 8) float32 each, in [0, 63]
    """
    first, second, low = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]  # (n_blocks, 4) each
    sc = np.concatenate([first & 63, (low & 0x0F) | ((first >> 6) << 4)], axis=1)
    m = np.concatenate([second & 63, (low >> 4) | ((second >> 6) << 4)], axis=1)
    return sc.astype(np.float32), m.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """4-bit codes of a k-quant super-block, in value order.

    The 128 bytes are 4 chunks of 32; chunk c holds sub-block 2c in its low nibbles and
    sub-block 2c + 1 in its high nibbles.  (n_blocks, 128) uint8 -> (n_blocks, 8, 32) uint8
    """
    chunks = qs.reshape(-1, 4, 1, 32)  # (n_blocks, chunk, 1, 32)
    nibbles = np.concatenate([chunks & 0x0F, chunks >> 4], axis=2)  # (n_blocks, chunk, low/high, 32)
    return nibbles.reshape(-1, 8, 32)  # (n_blocks, sub_block, 32)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 256 values in 144 bytes = 8 sub-blocks of 32 with 6-bit scales and mins.

        byte 0       2          4               16                        144
             | d f16 | dmin f16 | scales[12]     | qs[128]                 |
                                  8 x (sc, m),     4 chunks of 32 bytes; chunk c = sub-block 2c
                                  6 bits each      (low nibbles) and 2c + 1 (high nibbles)

        w[s, l] = (d * sc[s]) * q[s, l] - (dmin * m[s])        s = sub-block 0..7, l = 0..31

    (n_blocks, 144) uint8 -> (n_blocks, 256) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    dmin = _f16(blocks, 2)  # (n_blocks, 1)
    sc, m = _k_scales_and_mins(blocks[:, 4:16])  # (n_blocks, 8) each
    q = _k_nibbles(blocks[:, 16:]).astype(np.float32)  # (n_blocks, 8, 32) in [0, 15]
    scale = (d * sc)[:, :, None]  # (n_blocks, 8, 1)
    offset = (dmin * m)[:, :, None]  # (n_blocks, 8, 1)
    return (scale * q - offset).reshape(-1, QK_K)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: 256 values in 176 bytes; Q4_K plus a 5th bit per value.

        byte 0       2          4               16            48                  176
             | d f16 | dmin f16 | scales[12]     | qh[32]      | qs[128]           |
                                  as Q4_K          bit s of qh[l] = 5th bit of value l
                                                   of sub-block s

        q[s, l] = nibble[s, l] | ((qh[l] >> s) & 1) << 4
        w[s, l] = (d * sc[s]) * q[s, l] - (dmin * m[s])

    (n_blocks, 176) uint8 -> (n_blocks, 256) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    dmin = _f16(blocks, 2)  # (n_blocks, 1)
    sc, m = _k_scales_and_mins(blocks[:, 4:16])  # (n_blocks, 8) each
    qh = blocks[:, 16:48]  # (n_blocks, 32)
    high = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # (n_blocks, 8, 32)
    q = (_k_nibbles(blocks[:, 48:]) | (high << 4)).astype(np.float32)  # (n_blocks, 8, 32) in [0, 31]
    scale = (d * sc)[:, :, None]  # (n_blocks, 8, 1)
    offset = (dmin * m)[:, :, None]  # (n_blocks, 8, 1)
    return (scale * q - offset).reshape(-1, QK_K)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 256 values in 210 bytes = 16 sub-blocks of 16 with int8 scales; 6-bit codes.

        byte 0                128              192               208      210
             | ql[128]         | qh[64]         | scales[16] int8 | d f16  |
               low 4 bits       high 2 bits

    Each half h of 128 values uses ql[64h : 64h + 64] and qh[32h : 32h + 32]; for l in 0..31:

        value 128h +  0 + l: ql[l]      low nibble,  qh[l] bits 0-1
        value 128h + 32 + l: ql[l + 32] low nibble,  qh[l] bits 2-3
        value 128h + 64 + l: ql[l]      high nibble, qh[l] bits 4-5
        value 128h + 96 + l: ql[l + 32] high nibble, qh[l] bits 6-7

        w[i] = (d * scales[i // 16]) * (q[i] - 32)

    (n_blocks, 210) uint8 -> (n_blocks, 256) float32
    """
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)  # (n_blocks, half, 1, which 32 bytes, l)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)  # (n_blocks, half, 1, l)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n_blocks, 16)
    d = _f16(blocks, 208)  # (n_blocks, 1)

    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 4, 32)  # (n_blocks, half, group, l)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n_blocks, half, group, l)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(-1, 16, 16)  # (n_blocks, sub_block, 16)
    scale = (d * scales)[:, :, None]  # (n_blocks, 16, 1)
    return (scale * q.astype(np.float32)).reshape(-1, QK_K)


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 256 values in 84 bytes = 16 sub-blocks of 16 with 4-bit scales and mins; 2-bit codes.

        byte 0              16                80       82          84
             | scales[16]    | qs[64]          | d f16  | dmin f16  |
               sc = low 4 bits, m = high 4 bits

    Each half h of 128 values uses qs[32h : 32h + 32]: value 128h + 32j + l (j = 0..3,
    l = 0..31) is bits 2j..2j+1 of qs[32h + l]. Sub-block s covers values 16s .. 16s + 15.

        w[i] = (d * sc[i // 16]) * q[i] - (dmin * m[i // 16])

    (n_blocks, 84) uint8 -> (n_blocks, 256) float32
    """
    packed_scales = blocks[:, 0:16]  # (n_blocks, 16)
    qs = blocks[:, 16:80].reshape(-1, 2, 1, 32)  # (n_blocks, half, 1, l)
    d = _f16(blocks, 80)  # (n_blocks, 1)
    dmin = _f16(blocks, 82)  # (n_blocks, 1)

    q = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n_blocks, half, j, l)
    q = q.reshape(-1, 16, 16).astype(np.float32)  # (n_blocks, sub_block, 16)
    scale = (d * (packed_scales & 0x0F).astype(np.float32))[:, :, None]  # (n_blocks, 16, 1)
    offset = (dmin * (packed_scales >> 4).astype(np.float32))[:, :, None]  # (n_blocks, 16, 1)
    return (scale * q - offset).reshape(-1, QK_K)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Unpack Q3_K's 12 bytes into 16 signed six-bit scales.

        low 4 bits of scale k:  bytes 0-7, low nibble for k < 8, high nibble of byte k - 8 for k >= 8
        high 2 bits of scale k: bits 2*(k // 4) .. +1 of byte 8 + k % 4

    (n_blocks, 12) uint8 -> (n_blocks, 16) float32, in [-32, 31]
    """
    low = _nibbles(packed[:, 0:8])  # (n_blocks, 16)
    high = (packed[:, None, 8:12] >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n_blocks, 4, 4)
    scales = low | (high.reshape(-1, 16) << 4)  # (n_blocks, 16) in [0, 63]
    return (scales.astype(np.int8) - 32).astype(np.float32)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 256 values in 110 bytes = 16 sub-blocks of 16 with 6-bit signed scales; 3-bit codes.

        byte 0            32               96              108      110
             | hmask[32]   | qs[64]          | scales[12]    | d f16  |
               3rd bit      low 2 bits        16 x 6 bits

    Value 128h + 32j + l (half h, j = 0..3, l = 0..31): low 2 bits are bits 2j..2j+1 of
    qs[32h + l]; the high bit is bit 4h + j of hmask[l], and a *cleared* bit subtracts 4.

        q[i] = low2[i] - (0 if hbit[i] else 4)             in [-4, 3]
        w[i] = (d * scales[i // 16]) * q[i]

    (n_blocks, 110) uint8 -> (n_blocks, 256) float32
    """
    hmask = blocks[:, 0:32]  # (n_blocks, l)
    qs = blocks[:, 32:96].reshape(-1, 2, 1, 32)  # (n_blocks, half, 1, l)
    scales = _q3_k_scales(blocks[:, 96:108])  # (n_blocks, 16)
    d = _f16(blocks, 108)  # (n_blocks, 1)

    low2 = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]) & 3  # (n_blocks, half, j, l)
    hbit = (hmask[:, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # (n_blocks, 4h + j, l)
    q = low2.reshape(-1, 8, 32).astype(np.int8) - 4 * (1 - hbit.astype(np.int8))  # (n_blocks, 8, 32)
    scale = (d * scales)[:, :, None]  # (n_blocks, 16, 1)
    return (scale * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, QK_K)


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    """IQ4_XS: 256 values in 136 bytes = 8 sub-blocks of 32 with 6-bit scales; IQ4_NL table codes.

        byte 0       2                4              8                      136
             | d f16 | scales_h (u16) | scales_l[4]  | qs[128]               |
                       high 2 bits      low 4 bits    sub-block s = qs[16s : 16s + 16], low
                       of scale s at    of scale s    nibbles then high nibbles (as IQ4_NL)
                       bits 2s, 2s+1    (nibble s%2 of byte s//2)

        w[s, l] = (d * (scale[s] - 32)) * IQ4_NL_VALUES[q[s, l]]

    (n_blocks, 136) uint8 -> (n_blocks, 256) float32
    """
    d = _f16(blocks, 0)  # (n_blocks, 1)
    scales_high = _bits(blocks[:, 2:4], 16).reshape(-1, 8, 2)  # (n_blocks, 8, 2) bits
    scales_low = _nibbles_interleaved(blocks[:, 4:8])  # (n_blocks, 8)
    scales = scales_low | (scales_high[:, :, 0] << 4) | (scales_high[:, :, 1] << 5)  # (n_blocks, 8) in [0, 63]
    sub_scale = d * (scales.astype(np.int8) - 32).astype(np.float32)  # (n_blocks, 8)
    qs = blocks[:, 8:].reshape(-1, 8, 16)  # (n_blocks, sub_block, 16)
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=2)  # (n_blocks, sub_block, 32)
    levels = IQ4_NL_VALUES[codes].astype(np.float32)  # (n_blocks, 8, 32)
    return (sub_scale[:, :, None] * levels).reshape(-1, QK_K)


# ggml type name -> function (n_blocks, bytes_per_block) uint8 -> (n_blocks, values_per_block) float32
DEQUANTIZE = {
    "F32": dequantize_f32,
    "F16": dequantize_f16,
    "BF16": dequantize_bf16,
    "F64": dequantize_f64,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
    "Q5_0": dequantize_q5_0,
    "Q5_1": dequantize_q5_1,
    "Q8_0": dequantize_q8_0,
    "Q2_K": dequantize_q2_k,
    "Q3_K": dequantize_q3_k,
    "Q4_K": dequantize_q4_k,
    "Q5_K": dequantize_q5_k,
    "Q6_K": dequantize_q6_k,
    "IQ4_NL": dequantize_iq4_nl,
    "IQ4_XS": dequantize_iq4_xs,
}


def dequantize_bytes(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize a tensor's raw bytes of ggml type `type_name` into float32 of `shape` (HF order).

    Raises CheckpointError for a type with no entry in `DEQUANTIZE`, or bytes that do not fit.
    """
    if type_name not in DEQUANTIZE:
        raise CheckpointError(f"ggml type {type_name} is not supported; supported: {sorted(DEQUANTIZE)}")
    values_per_block, bytes_per_block = BLOCK_LAYOUT[type_name]
    n_values = int(np.prod(shape, dtype=np.int64))
    expected_bytes = n_values // values_per_block * bytes_per_block
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if n_values % values_per_block or raw.size != expected_bytes:
        raise CheckpointError(
            f"{type_name} data of shape {shape} needs {expected_bytes} bytes in blocks of "
            f"{values_per_block} values, got {raw.size} bytes"
        )
    blocks = raw.reshape(-1, bytes_per_block)  # (n_blocks, bytes_per_block)
    values = DEQUANTIZE[type_name](blocks)  # (n_blocks, values_per_block)
    return values.reshape(shape)


# --------------------------------------------------------------------------------------------
# A weight matrix that stays in its blocks
# --------------------------------------------------------------------------------------------


class QuantizedWeight:
    """A weight matrix (out_features, in_features) kept as GGUF blocks, read as float32.

        blocks     (out_features, bytes_per_row) uint8: the file's bytes (a read-only memory map
                   of the GGUF, never copied); row o is in_features // values_per_block blocks
        type_name  the ggml type, e.g. "Q4_K" (`BLOCK_LAYOUT`, `DEQUANTIZE`)
        shape      (out_features, in_features), the logical shape; dtype float32

    Its values are `dequantize_bytes(blocks, type_name, shape)`, the readable NumPy code above:
    `np.asarray(w)` dequantizes the whole matrix, `w[ids]` only the rows asked for (an embedding
    lookup reads a few rows of the table). A backend with kernels for the type computes straight
    from the blocks (`ops.prepare_weight` decides); every other consumer sees plain float32.
    """

    dtype = np.dtype(np.float32)
    ndim = 2
    # Forms a backend may derive once, at load (`ops.prepare_weight`), and read instead of decoding
    # the blocks on every call (the Numba kernels: kernels/numba/quantized.py):
    block_scales = None  # (out_features, blocks per row) float32: each block's scale (Q5_0)
    codes = None  # (out_features, in_features) int8 with values == block_scales * codes (Q5_0)

    def __init__(self, blocks: np.ndarray, type_name: str, shape: tuple[int, int]):
        values_per_block, bytes_per_block = BLOCK_LAYOUT[type_name]
        out_features, in_features = shape
        row_bytes = in_features // values_per_block * bytes_per_block
        if in_features % values_per_block or blocks.shape != (out_features, row_bytes):
            raise CheckpointError(
                f"{type_name} weight of shape {tuple(shape)} needs blocks of shape "
                f"({out_features}, {row_bytes}), got {blocks.shape}"
            )
        blocks = np.asarray(blocks)  # a plain ndarray view of the memory map: still no copy
        self.blocks, self.type_name, self.shape = blocks, type_name, (int(out_features), int(in_features))

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks (what a pass over the weight reads), not of the float32 values."""
        return self.blocks.nbytes

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def T(self) -> np.ndarray:
        """The dequantized matrix transposed (the NumPy reference's `x @ w.T`; dequantizes it all)."""
        return np.asarray(self).T

    def __array__(self, dtype=None, copy=None):
        values = dequantize_bytes(self.blocks, self.type_name, self.shape)  # (out_features, in_features)
        return values if dtype is None else values.astype(dtype, copy=False)

    def __getitem__(self, rows):
        """Rows of the float32 matrix, dequantizing only those: w[ids] with ids of any shape
        -> (*ids.shape, in_features); w[o] -> (in_features,); w[a:b] -> (b - a, in_features)."""
        picked = self.blocks[rows]  # (..., bytes_per_row): the blocks of those rows only
        shape = (*picked.shape[:-1], self.shape[1])
        return dequantize_bytes(picked, self.type_name, shape)

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.type_name}, shape={self.shape}, {self.blocks.nbytes:,} bytes)"
