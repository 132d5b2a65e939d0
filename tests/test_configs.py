"""Every valid config runs every path: hypothesis draws configs across each family's options
(tied / untied, output flags in the config, sliding windows, dense and sparse layers, head / kv-head
ratios, QK-norm, soft caps, ALiBi head counts, partial rotary, dtypes) and checks that the forward
pass, the KV-cached forward in chunks, generate and every head run, and that cached and uncached
logits agree (float32)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minilm

VOCAB = 40


@st.composite
def heads(draw):
    """(num_attention_heads, num_key_value_heads, head_dim): GQA ratios 1, 2, 3, 4."""
    kv = draw(st.integers(1, 2))
    return kv * draw(st.sampled_from([1, 2, 3, 4])), kv, draw(st.sampled_from([4, 8]))


@st.composite
def qwen3_moe_configs(draw):
    h, kv, d = draw(heads())
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 4))
    return minilm.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=h,
        num_key_value_heads=kv, head_dim=d, moe_intermediate_size=8, num_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)), norm_topk_prob=draw(st.booleans()),
        decoder_sparse_step=draw(st.integers(1, 2)),
        mlp_only_layers=draw(st.lists(st.integers(0, layers - 1), unique=True, max_size=layers)),
        use_sliding_window=draw(st.booleans()), sliding_window=draw(st.integers(1, 5)),
        attention_bias=draw(st.booleans()), tie_word_embeddings=draw(st.booleans()),
        output_router_logits=draw(st.booleans()), pad_token_id=0, eos_token_id=1, num_labels=3,
    )  # fmt: skip


@st.composite
def bloom_configs(draw):
    n_head = draw(st.sampled_from([1, 2, 3, 5, 6]))
    return minilm.BloomConfig(
        vocab_size=VOCAB, hidden_size=n_head * 4, n_layer=draw(st.integers(1, 3)), n_head=n_head,
        apply_residual_connection_post_layernorm=draw(st.booleans()), pad_token_id=0, eos_token_id=1, num_labels=3,
    )  # fmt: skip


@st.composite
def phi3_configs(draw):
    h, kv, _ = draw(heads())
    head_dim = 8
    partial = draw(st.sampled_from([1.0, 0.5]))
    scaling = None
    if draw(st.booleans()):
        half = int(head_dim * partial) // 2
        scaling = {"rope_type": "longrope", "short_factor": [1.0 + i / 10 for i in range(half)],
                   "long_factor": [2.0 + i for i in range(half)]}  # fmt: skip
    return minilm.Phi3Config(
        vocab_size=VOCAB, hidden_size=h * head_dim, intermediate_size=24, num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=h, num_key_value_heads=kv, max_position_embeddings=64,
        original_max_position_embeddings=32, rope_scaling=scaling, partial_rotary_factor=partial,
        sliding_window=draw(st.sampled_from([None, 2, 5])), tie_word_embeddings=draw(st.booleans()),
        pad_token_id=0, eos_token_id=1, bos_token_id=2, num_labels=3,
    )  # fmt: skip


@st.composite
def gemma3_configs(draw):
    h, kv, d = draw(heads())
    layers = draw(st.integers(1, 3))
    kinds = st.sampled_from(["sliding_attention", "full_attention"])
    cap = st.sampled_from([None, 2.0, 30.0])
    return minilm.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=layers, num_attention_heads=h,
        num_key_value_heads=kv, head_dim=d, query_pre_attn_scalar=draw(st.sampled_from([d, 16])),
        sliding_window=draw(st.integers(1, 5)), layer_types=draw(st.lists(kinds, min_size=layers, max_size=layers)),
        final_logit_softcapping=draw(cap), attn_logit_softcapping=draw(cap),
        apply_attn_logit_softcapping=draw(st.booleans()),
        rope_scaling=draw(st.sampled_from([None, {"rope_type": "linear", "factor": 4.0}])),
        use_query_key_norm=draw(st.booleans()), use_post_ffw_norm=draw(st.booleans()), pad_token_id=0, eos_token_id=1,
    )  # fmt: skip


HEADS = {
    "qwen3_moe": ["Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification", "Qwen3MoeForTokenClassification",
                  "Qwen3MoeForQuestionAnswering"],
    "bloom": ["BloomForCausalLM", "BloomForSequenceClassification", "BloomForTokenClassification",
              "BloomForQuestionAnswering"],
    "phi3": ["Phi3ForCausalLM", "Phi3ForSequenceClassification", "Phi3ForTokenClassification"],
    "gemma3": ["Gemma3ForCausalLM"],
}  # fmt: skip
CONFIGS = {"qwen3_moe": qwen3_moe_configs, "bloom": bloom_configs, "phi3": phi3_configs, "gemma3": gemma3_configs}


def randomised(model, rng):
    """Weights well away from init (norms included), so every feature moves the outputs."""
    state = {k: v + rng.normal(0, 0.3, v.shape).astype(v.dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model


def batch(rng, seq):
    ids = rng.integers(3, VOCAB, size=(2, seq))
    mask = np.ones_like(ids)
    mask[1, : rng.integers(0, seq)] = 0  # a left-padded row
    ids[mask == 0] = 0
    return ids, mask


def check_cached_equals_uncached(model, ids, mask, chunks):
    positions = minilm.nn.position_ids_from_attention_mask(mask)
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    cache, start, pieces = None, 0, []
    for n in chunks:
        end = start + n
        out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                    past_key_values=cache, use_cache=True)  # fmt: skip
        cache, start = out.past_key_values, end
        pieces.append(out.logits)
    keep = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1)[keep], full[keep], rtol=0, atol=2e-4)


@pytest.mark.parametrize("family", sorted(CONFIGS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_valid_config_runs_every_path(family, data):
    config = data.draw(CONFIGS[family]())
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    seq = data.draw(st.integers(2, 9))
    ids, mask = batch(rng, seq)
    lm = randomised(getattr(minilm, HEADS[family][0])(config), rng)

    out = lm(ids, attention_mask=mask, labels=np.where(mask == 1, ids, -100), output_hidden_states=True)
    assert np.isfinite(out.logits).all() and np.isfinite(out.loss)
    assert len(out.hidden_states) == lm.config.num_hidden_layers + 1
    cut = data.draw(st.integers(1, seq - 1))
    longrope_crossing = family == "phi3" and config.rope_scaling and seq > config.original_max_position_embeddings
    if not longrope_crossing:  # (Phi-3 re-runs the prompt there by design: generation resets its cache)
        check_cached_equals_uncached(lm, ids, mask, [cut, seq - cut])
        check_cached_equals_uncached(lm, ids, mask, [1] * seq)
    generated = lm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=data.draw(st.booleans()), seed=0)
    assert generated.shape[0] == 2 and seq < generated.shape[1] <= seq + 3  # fewer when every row hit EOS
    bf16 = getattr(minilm, HEADS[family][0])(config, params=lm.state_dict(), dtype="bfloat16")
    assert np.isfinite(bf16(ids, attention_mask=mask).logits.astype(np.float32)).all()

    for head in HEADS[family][1:]:
        model = randomised(getattr(minilm, head)(config), rng)
        if "Sequence" in head:
            result = model(ids, attention_mask=mask, labels=np.array([0, 2]))
        elif "Token" in head:
            result = model(ids, attention_mask=mask, labels=rng.integers(0, 3, size=ids.shape))
        else:
            result = model(ids, attention_mask=mask, start_positions=np.array([0, 1]), end_positions=np.array([1, 1]))
        assert np.isfinite(result.loss), head
