"""minilm/train.py: AdamW, clipping and schedules against torch / transformers; the training loop.

Oracle: tests/fixtures/lora/adamw.npz (scripts/fixtures/lora.py): torch.optim.AdamW, 3 steps with
weight decay on fixed parameters and gradients; torch.nn.utils.clip_grad_norm_; transformers'
get_linear_schedule_with_warmup / get_cosine_schedule_with_warmup, step by step.
Tolerances: AdamW and clipping in float32, 1e-6 absolute (measured: a few 1e-8); schedules 1e-12.
The loop is tested with a stub value_and_grad (gradient accumulation, aliases, masks, checkpoints) and
with minilm's own backward pass on the tiny Gemma 3 (the loss must fall).
"""

import json

import numpy as np
import pytest
from conftest import FIXTURES

import minilm
from minilm import ConfigError
from minilm.train import AdamW, Trainer, batches, clip_grad_norm, lr_factor

REF = dict(np.load(FIXTURES / "lora" / "adamw.npz"))
META = json.loads((FIXTURES / "lora" / "adamw.json").read_text())


def test_adamw_matches_torch():
    a = META["adamw"]
    params = {k: REF[f"param0.{k}"].copy() for k in ("a", "b")}
    opt = AdamW(params, lr=a["lr"], betas=tuple(a["betas"]), eps=a["eps"], weight_decay=a["weight_decay"])
    for step in range(1, a["steps"] + 1):
        opt.step({k: REF[f"grad{step}.{k}"] for k in params})
        for k in params:
            np.testing.assert_allclose(params[k], REF[f"param{step}.{k}"], rtol=0, atol=1e-6, err_msg=f"step {step}")
    assert not np.allclose(params["a"], REF["param0.a"], atol=1e-3)  # the steps moved the parameters


def test_clip_grad_norm_matches_torch():
    grads = {k: 10 * REF[f"grad1.{k}"] for k in ("a", "b")}
    total = clip_grad_norm(grads, META["clip_grad_norm"]["max_norm"])
    assert abs(total - float(REF["clip_total_norm"])) <= 1e-5 * float(REF["clip_total_norm"])
    for k in grads:
        np.testing.assert_allclose(grads[k], REF[f"clipped.{k}"], rtol=0, atol=1e-6)


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = {k: REF[f"grad1.{k}"].copy() for k in ("a", "b")}
    total = clip_grad_norm(grads, max_norm=1e3)  # torch: the factor is clamped at 1
    assert total < 1e3
    for k in grads:
        np.testing.assert_array_equal(grads[k], REF[f"grad1.{k}"])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedules_match_transformers(schedule):
    s = META["schedules"]
    ours = [s["lr"] * lr_factor(t, s["num_warmup_steps"], s["num_training_steps"], schedule) for t in range(12)]
    np.testing.assert_allclose(ours, REF[f"schedule.{schedule}"], rtol=0, atol=1e-12)


def test_batches_pad_and_label():
    rows = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    b = next(batches(rows, 2, seed=1))
    assert b["input_ids"].shape[0] == 2
    np.testing.assert_array_equal(b["labels"] == -100, b["attention_mask"] == 0)
    assert sorted(int(n) for n in b["attention_mask"].sum(1)) in ([2, 3], [3, 4], [2, 4])
    assert len(list(batches(rows, 1, epochs=2))) == 6


def tiny_lora_model():
    model = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    model.enable_lora(4, target_modules=["q_proj", "v_proj"], lora_alpha=8, seed=1)
    return model


def stub_value_and_grad(model, input_ids, labels, attention_mask=None):
    """A quadratic loss per batch: sum of (p - mean of the batch's ids / 100)^2; its exact gradient."""
    target = float(np.mean(input_ids)) / 100
    params = model.trainable_parameters()
    loss = sum(float(np.sum((p - target) ** 2)) for p in params.values())
    return np.float32(loss), {k: 2 * (p - target) for k, p in params.items()}


def test_gradient_accumulation_averages_micro_batches():
    model = tiny_lora_model()
    trainer = Trainer(model, value_and_grad=stub_value_and_grad, max_grad_norm=None)
    one = {"input_ids": np.full((1, 4), 10), "labels": np.full((1, 4), 10), "attention_mask": np.ones((1, 4))}
    two = {"input_ids": np.full((1, 4), 30), "labels": np.full((1, 4), 30), "attention_mask": np.ones((1, 4))}
    loss, tokens, grads = trainer.gradients([one, two])
    _, mid = stub_value_and_grad(model, np.full((1, 4), 20), None)
    for k in grads:
        np.testing.assert_allclose(grads[k], mid[k], atol=1e-6)
    assert tokens == 8


def test_trainer_updates_in_place_and_checkpoints(tmp_path):
    model = tiny_lora_model()
    data = batches([[3 + (i + j) % 7 for j in range(8)] for i in range(16)], 4)
    before = {k: v.copy() for k, v in model.trainable_parameters().items()}
    result = minilm.train(
        model,
        data,
        steps=4,
        lr=1e-2,
        warmup_steps=1,
        grad_accum_steps=2,
        checkpoint_every=2,
        checkpoint_dir=tmp_path,
        value_and_grad=stub_value_and_grad,
        progress=False,
    )
    assert len(result.losses) == 4 and result.learning_rates[0] == 0.0  # warmup starts at 0
    assert [p.name for p in result.checkpoints] == ["step-2", "step-4"]
    after = model.trainable_parameters()
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    saved = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    saved.load_adapter(tmp_path / "step-4")
    for k, v in saved.trainable_parameters().items():
        np.testing.assert_array_equal(v, after[k])


def test_trainer_refusals():
    model = minilm.from_pretrained(FIXTURES / "gemma3_causal_lm")
    with pytest.raises(ConfigError, match="enable_lora"):
        Trainer(model)
    model.enable_lora(2, lora_dropout=0.1)
    with pytest.raises(ConfigError, match="lora_dropout"):
        Trainer(model)
    model = tiny_lora_model()
    with pytest.raises(ConfigError, match="schedule"):
        Trainer(model, schedule="step")
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        Trainer(model, checkpoint_every=3)


def test_fine_tune_tiny_gemma3_loss_falls():
    """minilm's own backward pass: 25 steps on a repeating pattern; the loss must fall by more than half."""
    model = tiny_lora_model()
    data = batches([[3 + (i + j) % 7 for j in range(12)] for i in range(64)], 8)
    result = minilm.train(model, data, steps=25, lr=1e-2, warmup_steps=3, progress=False)
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    assert result.tokens_per_second > 0


def test_fused_phi3_adapter_trains_one_shared_a():
    """PEFT's qkv_proj adapter on Phi-3 is one A shared by minilm's q / k / v parts: its gradient is the sum
    of the parts' (minilm.grad gives one entry per part) and one AdamW state updates it once."""
    from minilm.grad import value_and_grad
    from minilm.peft import lora_weights

    model = minilm.from_pretrained(FIXTURES / "phi3_causal_lm")
    model.load_adapter(FIXTURES / "lora" / "phi3_fused")
    ref = dict(np.load(FIXTURES / "lora" / "phi3_fused" / "reference.npz"))
    batch = {"input_ids": ref["input_ids"], "labels": ref["labels"], "attention_mask": ref["attention_mask"]}
    trainer = Trainer(model, lr=1e-2, max_grad_norm=None)
    _, _, grads = trainer.gradients([batch])
    _, parts = value_and_grad(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
    prefix = "model.layers.0.self_attn."
    expected = sum(parts[prefix + f"{p}_proj.lora_A"] for p in "qkv")
    np.testing.assert_allclose(grads[prefix + "q_proj.lora_A"], expected, rtol=1e-6, atol=1e-7)
    assert prefix + "k_proj.lora_A" not in grads
    trainer.step([batch])
    weights = lora_weights(model)
    a = [weights[prefix + f"{p}_proj"].lora_A for p in "qkv"]
    assert np.shares_memory(a[0], a[1]) and np.shares_memory(a[0], a[2])
