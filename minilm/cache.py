"""The KV cache: keys and values of every past position, so decoding a new token costs one
position of work instead of recomputing the whole prompt.

The reference cache keeps everything; sliding windows are applied by the attention mask, so
decoding past a window stays exact. (A ring buffer that stores only the window is a memory
optimisation built on top of this, tested against it.)
"""

from __future__ import annotations

import numpy as np

from . import nn
from .errors import ConfigError


def mask_for_cached_keys(attention_mask, q_idx, kv_seq, window=None, image_blocks=None):
    """The attention mask for the keys a cache returned. Every cache here returns the LAST kv_seq
    positions, oldest first: `KVCache` all of them, `SlidingWindowCache` (for a sliding layer) the
    ones a window can still see; without a cache the keys are this call's own positions.

    attention_mask: (batch, past + seq) 0/1 or None; q_idx: (seq,) the queries' positions;
    image_blocks: (batch, past + seq) or None, tokens of one image see each other (`nn.same_image_mask`)
    -> (batch or 1, 1, seq, kv_seq) bool

    sliding_window=3, KVCache     k: 0 1 2 3 4       SlidingWindowCache  k: 2 3 4
    q=4                              . . x x x                              x x x
    """
    end = int(q_idx[-1]) + 1
    k_idx = np.arange(end - kv_seq, end, like=q_idx)  # (kv_seq,) the keys' positions, where q_idx lives
    padding = None if attention_mask is None else attention_mask[:, k_idx]  # (batch, kv_seq)
    return nn.attention_mask_4d(padding, q_idx, k_idx, window, image_blocks)


class KVCache:
    """Per layer: keys and values of shape (batch, num_kv_heads, kv_seq, head_dim).

    Storage grows by doubling along kv_seq, so appending one token is O(1) amortised rather
    than a copy of the whole cache each step.
    """

    def __init__(self, num_layers):
        self._keys = [None] * num_layers  # (batch, num_kv_heads, capacity, head_dim)
        self._values = [None] * num_layers
        self._length = [0] * num_layers

    def __len__(self):
        return len(self._keys)

    def get_seq_length(self, layer_idx=0):
        """How many positions layer `layer_idx` holds (= the position of the next token)."""
        return self._length[layer_idx]

    def update(self, layer_idx, keys, values):
        """Append this step's keys/values and return all of them for the layer.

        keys, values: (batch, num_kv_heads, seq, head_dim)
        -> (batch, num_kv_heads, past + seq, head_dim) each
        """
        n, new = self._length[layer_idx], keys.shape[2]
        stored = self._keys[layer_idx]
        if stored is None or n + new > stored.shape[2]:
            self._grow(layer_idx, keys, values, n + new)
        self._keys[layer_idx][:, :, n : n + new] = keys
        self._values[layer_idx][:, :, n : n + new] = values
        self._length[layer_idx] = n + new
        return self._keys[layer_idx][:, :, : n + new], self._values[layer_idx][:, :, : n + new]

    def _grow(self, layer_idx, keys, values, needed):
        b, h, _, d = keys.shape
        capacity = max(needed, 2 * needed if self._keys[layer_idx] is not None else needed + 64)
        new_k = np.empty((b, h, capacity, d), dtype=keys.dtype, like=keys)  # like=: on the keys' device
        new_v = np.empty((b, values.shape[1], capacity, values.shape[3]), dtype=values.dtype, like=values)
        n = self._length[layer_idx]
        if n:
            new_k[:, :, :n] = self._keys[layer_idx][:, :, :n]
            new_v[:, :, :n] = self._values[layer_idx][:, :, :n]
        self._keys[layer_idx], self._values[layer_idx] = new_k, new_v

    def layer(self, layer_idx):
        """(keys, values) stored for a layer, each (batch, num_kv_heads, kv_seq, head_dim)."""
        n = self._length[layer_idx]
        return self._keys[layer_idx][:, :, :n], self._values[layer_idx][:, :, :n]


class SlidingWindowCache:
    """A KV cache that stays bounded for sliding-window layers (transformers' DynamicCache built
    from a config with `layer_types`, where sliding layers use a DynamicSlidingWindowLayer).

    layer_windows: one entry per layer, the layer's sliding window W (an int), or None for a
    global layer. A global layer keeps everything, exactly like `KVCache`. A sliding layer keeps
    only its last W - 1 positions, in a ring buffer: a new token's query sees itself plus those
    W - 1 keys, which is the whole window, so decoding past the window stays exact.

    Ring buffer of capacity C = W - 1: position p lives in slot p % C.

        W = 4, C = 3, after positions 0 .. 6:   slot  0 1 2
                                                pos   6 4 5    oldest = slot 7 % 3 = 1

    `update` returns what `KVCache.update` returns for the keys the layer can still need: the
    stored positions, oldest first, followed by this step's keys. So whichever cache is used, the
    kv_seq keys it returns are the LAST kv_seq positions in order; the model builds its mask from
    that (the key at index j has position past + seq - kv_seq + j) and the window mask hides what
    a query must not see. Memory per sliding layer: (batch, num_kv_heads, W - 1, head_dim), fixed.
    """

    def __init__(self, layer_windows):
        self.layer_windows = list(layer_windows)
        n = len(self.layer_windows)
        for layer_idx, window in enumerate(self.layer_windows):
            if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
                raise ConfigError(
                    f"layer {layer_idx}: sliding window must be a positive integer or None, got {window!r}"
                )
        self._full = KVCache(n)  # the global layers' storage (sliding layers' entries stay empty)
        self._ring_keys = [None] * n  # sliding layers: (batch, num_kv_heads, capacity, head_dim)
        self._ring_values = [None] * n
        self._seen = [0] * n  # positions written so far, per layer

    def __len__(self):
        return len(self.layer_windows)

    def get_seq_length(self, layer_idx=0):
        """How many positions layer `layer_idx` has seen (= the position of the next token)."""
        return self._seen[layer_idx]

    def capacity(self, layer_idx):
        """Slots a sliding layer keeps: W - 1 (at least one, so that W = 1 needs no special case)."""
        return max(self.layer_windows[layer_idx] - 1, 1)

    def update(self, layer_idx, keys, values):
        """Store this step's keys/values and return the ones the layer attends to, oldest first.

        keys, values: (batch, num_kv_heads, seq, head_dim)
        -> global layer:  (batch, num_kv_heads, past + seq, head_dim)
           sliding layer: (batch, num_kv_heads, min(past, W - 1) + seq, head_dim)
        """
        if self.layer_windows[layer_idx] is None:
            self._seen[layer_idx] += keys.shape[2]
            return self._full.update(layer_idx, keys, values)
        if self._ring_keys[layer_idx] is None:
            self._allocate(layer_idx, keys, values)
        all_keys = np.concatenate(self._oldest_first(self._ring_keys[layer_idx], layer_idx) + [keys], axis=2)
        all_values = np.concatenate(self._oldest_first(self._ring_values[layer_idx], layer_idx) + [values], axis=2)
        self._write(layer_idx, keys, values)
        return all_keys, all_values  # (batch, num_kv_heads, kept + seq, head_dim)

    def _allocate(self, layer_idx, keys, values):
        b, h, _, d = keys.shape
        capacity = self.capacity(layer_idx)
        self._ring_keys[layer_idx] = np.zeros((b, h, capacity, d), dtype=keys.dtype, like=keys)
        self._ring_values[layer_idx] = np.zeros(
            (b, values.shape[1], capacity, values.shape[3]), dtype=values.dtype, like=values
        )

    def _oldest_first(self, ring, layer_idx):
        """The filled part of a ring as views, oldest position first: [ring[oldest:], ring[:oldest]]."""
        capacity, seen = self.capacity(layer_idx), self._seen[layer_idx]
        if seen <= capacity:  # not wrapped yet: slots 0 .. seen-1 hold positions 0 .. seen-1
            return [ring[:, :, :seen]]
        oldest = seen % capacity
        return [ring[:, :, oldest:], ring[:, :, :oldest]]

    def _write(self, layer_idx, keys, values):
        """Put the last min(seq, C) new positions into their slots p % C: consecutive slots from the
        first one up to the end of the ring, then the rest from slot 0 (two slice copies at most)."""
        capacity, seen, new = self.capacity(layer_idx), self._seen[layer_idx], keys.shape[2]
        kept = min(new, capacity)
        first = (seen + new - kept) % capacity  # the slot of the oldest position written
        to_end = min(kept, capacity - first)  # how many fit before the ring wraps
        for ring, source in ((self._ring_keys, keys), (self._ring_values, values)):
            source = source[:, :, new - kept :]  # (batch, num_kv_heads, kept, head_dim)
            ring[layer_idx][:, :, first : first + to_end] = source[:, :, :to_end]
            ring[layer_idx][:, :, : kept - to_end] = source[:, :, to_end:]
        self._seen[layer_idx] = seen + new

    def layer(self, layer_idx):
        """(keys, values) stored for a layer, oldest first, each (batch, num_kv_heads, kept, head_dim)."""
        if self.layer_windows[layer_idx] is None:
            return self._full.layer(layer_idx)
        return tuple(
            np.concatenate(self._oldest_first(ring[layer_idx], layer_idx), axis=2)
            for ring in (self._ring_keys, self._ring_values)
        )

    @property
    def nbytes(self):
        """Bytes held by the cache's storage (bounded for sliding layers, growing for global ones)."""
        rings = sum(a.nbytes for a in self._ring_keys + self._ring_values if a is not None)
        full = sum(a.nbytes for a in self._full._keys + self._full._values if a is not None)
        return rings + full
