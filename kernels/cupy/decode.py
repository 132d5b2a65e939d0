"""A compiled decode step for Gemma 3 on the GPU: one token through every layer as a few kernels
per layer, captured once as a CUDA graph and replayed for every token.

Why: a decode step is tiny (one token), so the readable forward spends its time launching
kernels, not in them: a few hundred CuPy calls a token, each tens of microseconds of Python. Here
each layer is eight launches of the kernels below, their arguments fixed (every buffer
preallocated, the position read from device memory), so the whole step can be recorded once
(`cupy.cuda.Stream.begin_capture`) and replayed with one call. Without graph support the same
launches run one by one.

    per layer:  rms_norm -> gemv(q|k|v) -> qk_norm_rope_store -> attend -> gemv(o)
                -> add_norm_norm -> gemv(gate|up) -> geglu -> gemv(down) -> add_norm_norm (next)

The math is `minilm/models/gemma3.py`'s (the reference it is tested against, tests/test_decoders.py):
Gemma's (1 + w) RMSNorm, QK-norm then RoPE (the cos/sin rows of `layer_type_rope_table`, built
once on the host for every position up to the capacity), scale query_pre_attn_scalar ** -0.5, the attention soft
cap, the sliding window (a ring of W slots: the query at p sees positions p - W + 1 .. p), the
sandwich norms, GELU-tanh gating, the final norm and the tied LM head with its soft cap. All in
float32; sums run in another order than NumPy's, so the logits agree to ~1e-6 relative.
Weights: float32 CuPy arrays (a GGUF model's are dequantized at load on this backend). q/k/v and
gate/up are concatenated once per layer (one gemv each); the model's own arrays are left alone.
"""

from __future__ import annotations

import numpy as np

from minilm.cache import SlidingWindowCache
from minilm.errors import InputError
from minilm.models.gemma3 import layer_type_rope_table

from .common import cp

MAX_HEAD_DIM = 512  # attend keeps head_dim / 32 floats per lane
ATTEND_WARPS = 8

_SOURCE = r"""
#define NEG_INF __int_as_float(0xff800000)
#define MAX_PER_LANE 16

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
__device__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // red[] may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? red[threadIdx.x] : 0.0f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) red[32] = v;
    __syncthreads();
    return red[32];
}

// Gemma's RMSNorm of x (n,) into out: x * (1 / sqrt(mean(x^2) + eps)) * (1 + w). One block.
extern "C" __global__ void rms_norm(const float* x, const float* w, float eps, int n, float* out) {
    __shared__ float red[33];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(block_sum(ss, red) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = (x[i] * inv) * (1.0f + w[i]);
}

// The residual step of a sandwich norm, then the next norm (one block):
//   x += has_post ? norm(y, w_post) : y;   out = norm(x, w_next)
extern "C" __global__ void add_norm_norm(float* x, const float* y, const float* w_post, int has_post,
                                         const float* w_next, float eps, int n, float* out) {
    __shared__ float red[33];
    float inv = 1.0f;
    if (has_post) {
        float ss = 0.0f;
        for (int i = threadIdx.x; i < n; i += blockDim.x) ss += y[i] * y[i];
        inv = 1.0f / sqrtf(block_sum(ss, red) / (float)n + eps);
    }
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float add = has_post ? (y[i] * inv) * (1.0f + w_post[i]) : y[i];
        const float h = x[i] + add;
        x[i] = h;
        ss += h * h;
    }
    const float inv2 = 1.0f / sqrtf(block_sum(ss, red) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = (x[i] * inv2) * (1.0f + w_next[i]);
}

// x = table[token] * normalizer; state = [token, position]
extern "C" __global__ void embed(const float* table, const long long* state, float normalizer, int n, float* x) {
    const float* row = table + state[0] * (long long)n;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] = row[i] * normalizer;
}

// y = W x (W (rows, cols) row-major), one warp per row; optional soft cap: cap * tanh(y / cap).
extern "C" __global__ void gemv(const float* W, const float* x, int rows, int cols, float cap, int has_cap, float* y) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* w = W + row * cols;
    float acc = 0.0f;
    if ((cols & 3) == 0) {
        const float4* w4 = reinterpret_cast<const float4*>(w);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int c = lane; c < (cols >> 2); c += 32) {
            const float4 a = w4[c], b = x4[c];
            acc += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
    } else {
        for (int c = lane; c < cols; c += 32) acc += w[c] * x[c];
    }
    acc = warp_sum(acc);
    if (lane == 0) y[row] = has_cap ? cap * tanhf(acc / cap) : acc;
}

// QK-norm, RoPE and the cache write. qkv: (num_heads + 2 * num_kv_heads) * head_dim, as q | k | v.
// Block b < num_heads: query head b -> q_out; then the key heads -> k_cache; then the value heads
// -> v_cache (no norm, no rotation). Caches: (num_kv_heads, slots, head_dim); position p goes to
// slot p % slots. cos/sin: (capacity, rope_dim), row p. blockDim.x = head_dim rounded up to 32.
extern "C" __global__ void qk_norm_rope_store(const float* qkv, const float* qn, const float* kn, int qk_norm,
                                              float eps,
                                              const float* cos_t, const float* sin_t, int rope_dim,
                                              const long long* state, int num_heads, int num_kv_heads, int head_dim,
                                              float* q_out, float* k_cache, float* v_cache, int slots) {
    extern __shared__ float v[];  // (head_dim,) then red[33]
    float* red = v + head_dim;
    const int head = blockIdx.x, i = threadIdx.x;
    const long long p = state[1];
    const bool is_q = head < num_heads, is_v = head >= num_heads + num_kv_heads;
    const float value = (i < head_dim) ? qkv[(long long)head * head_dim + i] : 0.0f;
    float normed = value;
    if (!is_v && qk_norm) {
        const float* w = is_q ? qn : kn;
        const float inv = 1.0f / sqrtf(block_sum(value * value, red) / (float)head_dim + eps);
        normed = (i < head_dim) ? (value * inv) * (1.0f + w[i]) : 0.0f;
    }
    if (i < head_dim) v[i] = normed;
    __syncthreads();
    if (i >= head_dim) return;
    float out = normed;
    if (!is_v && i < rope_dim) {
        const int half = rope_dim / 2;
        const float rotated = (i < half) ? -v[i + half] : v[i - half];
        out = normed * cos_t[p * rope_dim + i] + rotated * sin_t[p * rope_dim + i];
    }
    if (is_q) {
        q_out[(long long)head * head_dim + i] = out;
    } else {
        const int kv = is_v ? head - num_heads - num_kv_heads : head - num_heads;
        const long long at = ((long long)kv * slots + p % slots) * head_dim + i;
        if (is_v) v_cache[at] = out; else k_cache[at] = out;
    }
}

// One query head per block, ATTEND_WARPS warps: warp w takes keys w, w + warps, ... with an online
// softmax (running max m, sum l, weighted values acc); the warps are merged at the end.
// Keys visible: min(p + 1, slots), every slot of a ring in use (the order of keys does not change
// attention). score = soft_cap(q.k * scale).
extern "C" __global__ void attend(const float* q, const float* k_cache, const float* v_cache, const long long* state,
                                  int slots, int num_heads, int num_kv_heads, int head_dim, float scale,
                                  float cap, int has_cap, float* out) {
    extern __shared__ float sm[];  // m[warps], l[warps], acc[warps * head_dim]
    const int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.x, kv = h / (num_heads / num_kv_heads);
    const long long p = state[1];
    const int n = (int)((p + 1 < slots) ? p + 1 : slots);
    const int per_lane = (head_dim + 31) / 32;
    float qv[MAX_PER_LANE], acc[MAX_PER_LANE];
    for (int t = 0; t < per_lane; t++) {
        const int d = lane + 32 * t;
        qv[t] = (d < head_dim) ? q[(long long)h * head_dim + d] : 0.0f;
        acc[t] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    const float* K = k_cache + (long long)kv * slots * head_dim;
    const float* V = v_cache + (long long)kv * slots * head_dim;
    for (int j = warp; j < n; j += warps) {
        float s = 0.0f;
        for (int t = 0; t < per_lane; t++) {
            const int d = lane + 32 * t;
            if (d < head_dim) s += qv[t] * K[(long long)j * head_dim + d];
        }
        s = warp_sum(s) * scale;
        if (has_cap) s = cap * tanhf(s / cap);
        const float m_new = fmaxf(m, s);
        const float correction = expf(m - m_new), e = expf(s - m_new);
        l = l * correction + e;
        for (int t = 0; t < per_lane; t++) {
            const int d = lane + 32 * t;
            acc[t] = acc[t] * correction + ((d < head_dim) ? e * V[(long long)j * head_dim + d] : 0.0f);
        }
        m = m_new;
    }
    float* ms = sm;
    float* ls = sm + warps;
    float* accs = sm + 2 * warps;
    if (lane == 0) { ms[warp] = m; ls[warp] = l; }
    for (int t = 0; t < per_lane; t++) {
        const int d = lane + 32 * t;
        if (d < head_dim) accs[warp * head_dim + d] = acc[t];
    }
    __syncthreads();
    float m_all = NEG_INF;
    for (int w = 0; w < warps; w++) m_all = fmaxf(m_all, ms[w]);
    float l_all = 0.0f;
    for (int w = 0; w < warps; w++) l_all += (ls[w] > 0.0f) ? ls[w] * expf(ms[w] - m_all) : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float total = 0.0f;
        for (int w = 0; w < warps; w++) total += (ls[w] > 0.0f) ? accs[w * head_dim + d] * expf(ms[w] - m_all) : 0.0f;
        out[(long long)h * head_dim + d] = total / l_all;
    }
}

// GELU-tanh gating: a = gelu_tanh(gate) * up, gu = gate | up (2 * n,)
extern "C" __global__ void geglu(const float* gu, int n, float* a) {
    const float c = 0.7978845608028654f, k = 0.044715f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = gu[i];
        a[i] = (0.5f * g * (1.0f + tanhf(c * (g + k * g * g * g)))) * gu[n + i];
    }
}
"""

_module = None


def _kernels():
    global _module
    if _module is None:
        _module = cp.RawModule(code=_SOURCE, options=("--std=c++14",))
    return _module


GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")


def gemma3_decoder(model, cache, attention_mask, capacity):
    """`ops.compiled_decoder`'s factory for Gemma 3 text models on the GPU, or None when the model
    is not one this step covers (see the module docstring)."""
    cfg = model.config
    mask = np.asarray(attention_mask)
    if mask.shape[0] != 1 or not mask.all() or not isinstance(cache, SlidingWindowCache):
        return None  # one row, no padding, the model's own cache
    if cfg.hidden_activation not in GELU_TANH or cfg.head_dim > MAX_HEAD_DIM:
        return None
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        return None
    p = model.params
    layers = p.model.layers
    arrays = [p.model.embed_tokens.weight, p.model.norm.weight, p.lm_head.weight]
    for layer in layers:
        a, m = layer.self_attn, layer.mlp
        if any(module.get("bias") is not None for module in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)):
            return None
        arrays += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight]
        arrays += [m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    if not all(isinstance(w, cp.ndarray) and w.dtype == cp.float32 for w in arrays):
        return None  # a LoraWeight, a host array, another dtype: the readable forward runs
    tables = {}  # layer type -> cos, sin (capacity, rope_dim) on the GPU: the kernel reads row p
    for kind in sorted(set(cfg.layer_types)):
        cos, sin = layer_type_rope_table(cfg, kind, capacity)
        tables[kind] = (cp.asarray(cos), cp.asarray(sin))
    return Gemma3Decoder(model, cache, capacity, tables)


class Gemma3Decoder:
    """Buffers, kernels and (once captured) the CUDA graph of one decode step; `step` runs it."""

    def __init__(self, model, cache, capacity, rope_tables):
        cfg = self.cfg = model.config
        p = model.params
        f32 = cp.float32
        self.hidden, self.nh, self.nkv, self.hd = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.table, self.final_norm, self.lm_head = p.model.embed_tokens.weight, p.model.norm.weight, p.lm_head.weight
        self.capacity = capacity
        self.normalizer = np.float32(self.table.shape[1] ** 0.5)  # `scaled_embedding`'s, for a float32 table
        self.layers = []
        for idx, layer in enumerate(p.model.layers):
            a, m = layer.self_attn, layer.mlp
            window = cfg.layer_window(idx)
            slots = capacity if window is None else max(int(window), 1)
            keys, values = cache.layer(idx)  # (1, num_kv_heads, kept, head_dim), oldest first
            k_store = cp.zeros((self.nkv, slots, self.hd), f32)
            v_store = cp.zeros((self.nkv, slots, self.hd), f32)
            seen = cache.get_seq_length(idx)
            kept = keys.shape[2]
            slot_of = cp.asarray((np.arange(seen - kept, seen)) % slots)  # positions -> slots
            k_store[:, slot_of] = cp.asarray(keys[0], f32)
            v_store[:, slot_of] = cp.asarray(values[0], f32)
            self.layers.append(
                dict(
                    input_ln=layer.input_layernorm.weight,
                    post_attn=layer.post_attention_layernorm.weight if cfg.use_post_attention_norm else None,
                    pre_ffn=layer.pre_feedforward_layernorm.weight,
                    post_ffn=layer.post_feedforward_layernorm.weight if cfg.use_post_ffw_norm else None,
                    qkv=cp.concatenate([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    o=a.o_proj.weight,
                    q_norm=a.q_norm.weight if cfg.use_query_key_norm else None,
                    k_norm=a.k_norm.weight if cfg.use_query_key_norm else None,
                    gate_up=cp.concatenate([m.gate_proj.weight, m.up_proj.weight]),
                    down=m.down_proj.weight,
                    k_cache=k_store,
                    v_cache=v_store,
                    slots=slots,
                    rope=rope_tables[cfg.layer_types[idx]],
                )
            )
        inter = self.layers[0]["gate_up"].shape[0] // 2
        self.state = cp.zeros(2, cp.int64)  # [token, position]
        self.x = cp.zeros(self.hidden, f32)  # the residual stream
        self.h = cp.zeros(self.hidden, f32)  # a normed copy, the input of the next product
        self.y = cp.zeros(self.hidden, f32)  # o_proj / down_proj output
        self.qkv = cp.zeros((self.nh + 2 * self.nkv) * self.hd, f32)
        self.q = cp.zeros(self.nh * self.hd, f32)
        self.attn = cp.zeros(self.nh * self.hd, f32)
        self.gu = cp.zeros(2 * inter, f32)
        self.act = cp.zeros(inter, f32)
        self.logits = cp.zeros((1, self.lm_head.shape[0]), f32)
        self.zeros = cp.zeros(max(self.hidden, self.hd), f32)  # the (1 + w) weight of an absent norm
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.graph = None
        self.kernels = {name: _kernels().get_function(name) for name in _NAMES}

    # --- the step, as launches -------------------------------------------------------------

    def _gemv(self, w, x, y, cap=None):
        rows, cols = w.shape
        per_block = 8  # warps (rows) per block
        self.kernels["gemv"](
            ((rows + per_block - 1) // per_block,),
            (32 * per_block,),
            (w, x, np.int32(rows), np.int32(cols), np.float32(cap or 0.0), np.int32(cap is not None), y),
        )

    def _launch_all(self):
        cfg, k, eps = self.cfg, self.kernels, np.float32(self.cfg.rms_norm_eps)
        n, threads = np.int32(self.hidden), 256
        k["embed"](((self.hidden + 255) // 256,), (256,), (self.table, self.state, self.normalizer, n, self.x))
        k["rms_norm"]((1,), (threads,), (self.x, self.layers[0]["input_ln"], eps, n, self.h))
        scale = np.float32(cfg.query_pre_attn_scalar**-0.5)
        cap = cfg.attention_soft_cap
        hd_threads = (self.hd + 31) // 32 * 32
        for idx, L in enumerate(self.layers):
            self._gemv(L["qkv"], self.h, self.qkv)
            cos, sin = L["rope"]
            has_qk = L["q_norm"] is not None
            k["qk_norm_rope_store"](
                (self.nh + 2 * self.nkv,),
                (hd_threads,),
                (
                    self.qkv,
                    L["q_norm"] if has_qk else self.zeros,
                    L["k_norm"] if has_qk else self.zeros,
                    np.int32(has_qk),
                    eps,
                    cos,
                    sin,
                    np.int32(cos.shape[1]),
                    self.state,
                    np.int32(self.nh),
                    np.int32(self.nkv),
                    np.int32(self.hd),
                    self.q,
                    L["k_cache"],
                    L["v_cache"],
                    np.int32(L["slots"]),
                ),
                shared_mem=4 * (self.hd + 33),
            )
            k["attend"](
                (self.nh,),
                (32 * ATTEND_WARPS,),
                (
                    self.q,
                    L["k_cache"],
                    L["v_cache"],
                    self.state,
                    np.int32(L["slots"]),
                    np.int32(self.nh),
                    np.int32(self.nkv),
                    np.int32(self.hd),
                    scale,
                    np.float32(cap or 0.0),
                    np.int32(cap is not None),
                    self.attn,
                ),
                shared_mem=4 * (2 * ATTEND_WARPS + ATTEND_WARPS * self.hd),
            )
            self._gemv(L["o"], self.attn, self.y)
            self._add_norm_norm(L["post_attn"], L["pre_ffn"])
            self._gemv(L["gate_up"], self.h, self.gu)
            inter = self.act.shape[0]
            k["geglu"](((inter + 255) // 256,), (256,), (self.gu, np.int32(inter), self.act))
            self._gemv(L["down"], self.act, self.y)
            after = self.layers[idx + 1]["input_ln"] if idx + 1 < len(self.layers) else self.final_norm
            self._add_norm_norm(L["post_ffn"], after)
        self._gemv(self.lm_head, self.h, self.logits, cap=cfg.final_logit_softcapping)

    def _add_norm_norm(self, w_post, w_next):
        self.kernels["add_norm_norm"](
            (1,),
            (256,),
            (
                self.x,
                self.y,
                w_post if w_post is not None else self.zeros,
                np.int32(w_post is not None),
                w_next,
                np.float32(self.cfg.rms_norm_eps),
                np.int32(self.hidden),
                self.h,
            ),
        )

    def _capture(self):
        """Record the launches as a CUDA graph (None where this CuPy or driver cannot)."""
        try:
            self.stream.begin_capture()
            try:
                self._launch_all()
            finally:
                graph = self.stream.end_capture()
            return graph
        except Exception:  # noqa: BLE001  (no graph support: the launches run one by one)
            return None

    def step(self, tokens, position):
        """tokens (1,) int64, position int -> logits (1, vocab_size) float32 on the GPU."""
        if not 0 <= position < self.capacity:
            raise InputError(f"decode position {position} is outside the {self.capacity} positions this decoder holds")
        with self.stream:
            self.state.set(np.array([int(tokens[0]), int(position)], np.int64), stream=self.stream)
            if self.graph is None:
                self._launch_all()  # the first step runs eagerly (compiles the kernels) ...
                self.graph = self._capture() or False  # ... then the graph is recorded once
            elif self.graph is False:
                self._launch_all()
            else:
                self.graph.launch(stream=self.stream)
            self.stream.synchronize()
        return self.logits


_NAMES = ("rms_norm", "add_norm_norm", "embed", "gemv", "qk_norm_rope_store", "attend", "geglu")
DECODERS = {"gemma3_text": gemma3_decoder}
