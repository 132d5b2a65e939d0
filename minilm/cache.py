"""The KV cache: keys and values of every past position, so decoding a new token costs one
position of work instead of recomputing the whole prompt.

The reference cache keeps everything; sliding windows are applied by the attention mask, so
decoding past a window stays exact. (A ring buffer that stores only the window is a memory
optimisation built on top of this, tested against it.)
"""

from __future__ import annotations

import numpy as np


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
        new_k = np.empty((b, h, capacity, d), dtype=keys.dtype)
        new_v = np.empty((b, values.shape[1], capacity, values.shape[3]), dtype=values.dtype)
        n = self._length[layer_idx]
        if n:
            new_k[:, :, :n] = self._keys[layer_idx][:, :, :n]
            new_v[:, :, :n] = self._values[layer_idx][:, :, :n]
        self._keys[layer_idx], self._values[layer_idx] = new_k, new_v

    def layer(self, layer_idx):
        """(keys, values) stored for a layer, each (batch, num_kv_heads, kv_seq, head_dim)."""
        n = self._length[layer_idx]
        return self._keys[layer_idx][:, :, :n], self._values[layer_idx][:, :, :n]
