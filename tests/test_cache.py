"""KV caches end to end: feeding a sequence in chunks of several tokens, past the point where a
sliding layer's ring buffer wraps, gives the logits of one full forward pass."""

import numpy as np
import pytest

import minilm
from minilm import KVCache, SlidingWindowCache

CONFIG = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    query_pre_attn_scalar=8,
    sliding_window=4,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
)


def perturbed(model, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    state = {k: v + rng.normal(0, scale, v.shape).astype(v.dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def model():
    return perturbed(minilm.Gemma3ForCausalLM(minilm.Gemma3TextConfig(**CONFIG)))


@pytest.mark.parametrize("make_cache", [None, lambda: KVCache(3)], ids=["ring buffer", "full cache"])
@pytest.mark.parametrize("chunks", [[5, 3, 1, 2, 3], [2, 4, 4, 4], [1] * 14])
def test_chunks_past_the_window_equal_one_forward(model, make_cache, chunks):
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 50, size=(2, sum(chunks)))
    mask = np.ones_like(ids)
    mask[0, :2] = 0  # a left-padded row
    full = model(ids, attention_mask=mask, position_ids=minilm.nn.position_ids_from_attention_mask(mask)).logits
    cache = make_cache() if make_cache else None
    positions = minilm.nn.position_ids_from_attention_mask(mask)
    pieces, start = [], 0
    for n in chunks:
        out = model(
            ids[:, start : start + n],
            attention_mask=mask[:, : start + n],
            position_ids=positions[:, start : start + n],
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        pieces.append(out.logits)
        start += n
    if make_cache is None:
        assert isinstance(cache, SlidingWindowCache) and cache.capacity(0) == 3  # the ring wrapped
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[keep], full[keep], rtol=0, atol=1e-5)
