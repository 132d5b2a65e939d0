"""Training the LoRA adapters: AdamW, gradient accumulation and clipping, a learning-rate schedule, a loop.

    model.enable_lora(8, target_modules=["q_proj", "v_proj"])
    result = minilm.train(model, minilm.train.batches(token_lists, batch_size=4), steps=100, lr=2e-4)
    result.losses                    # one mean loss per optimizer step

One optimizer step (`Trainer.step`), in the order torch + transformers' Trainer take it:

    for each of grad_accum_steps micro-batches:   loss, grads = value_and_grad(model, ids, labels, mask)
                                                  g += grads / grad_accum_steps
    clip:      g *= min(1, max_grad_norm / (||g||_2 + 1e-6))          ||g|| over every trainable tensor
    schedule:  lr_t = lr * warmup_then_decay(t)                       linear warmup, cosine or linear decay
    AdamW:     p *= 1 - lr_t * weight_decay                            decoupled weight decay
               m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
               p -= lr_t / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

What is trained is `model.trainable_parameters()`: the LoRA A and B matrices (`enable_lora` froze the
rest). The gradients come from `minilm.grad.value_and_grad` (the readable NumPy backward pass),
keyed by those names. The arrays are updated in place, so the model computes with them at once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm  # the text bar: tqdm.auto warns in a notebook without ipywidgets

from .errors import ConfigError, InputError
from .grad import value_and_grad as lora_value_and_grad
from .peft import parameter_aliases

# ---------------------------------------------------------------------------------------------
# AdamW (Loshchilov & Hutter, 2019), as torch.optim.AdamW
# ---------------------------------------------------------------------------------------------


class AdamW:
    """torch.optim.AdamW on a dict of float32 arrays, updated in place.

    params: {name: array}; lr, betas, eps, weight_decay: torch's arguments and defaults."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"AdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        self.params, self.lr, self.betas, self.eps, self.weight_decay = params, lr, tuple(betas), eps, weight_decay
        self.m = {name: np.zeros_like(p, dtype=np.float32) for name, p in params.items()}  # first moment
        self.v = {name: np.zeros_like(p, dtype=np.float32) for name, p in params.items()}  # second moment
        self.t = 0  # steps taken

    def step(self, grads, lr=None):
        """One update of every parameter from grads ({name: array of its shape})."""
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        self.t += 1
        bias1, bias2 = 1 - b1**self.t, 1 - b2**self.t  # bias corrections: m and v start at zero
        for name, p in self.params.items():
            g = np.asarray(grads[name], dtype=np.float32)
            p *= np.float32(1 - lr * self.weight_decay)  # decoupled weight decay (not added to g)
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            denom = np.sqrt(self.v[name]) / np.float32(math.sqrt(bias2)) + np.float32(self.eps)
            p -= np.float32(lr / bias1) * self.m[name] / denom


def clip_grad_norm(grads, max_norm):
    """torch.nn.utils.clip_grad_norm_: scale every gradient by min(1, max_norm / (total + 1e-6)),
    total = the 2-norm of all gradients together. Returns total (before clipping); scales in place."""
    total = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in grads.values():
        g *= np.float32(coef)
    return total


# ---------------------------------------------------------------------------------------------
# Learning-rate schedules (transformers' get_*_schedule_with_warmup): a factor of the peak lr
# ---------------------------------------------------------------------------------------------


def lr_factor(step, warmup_steps, total_steps, schedule="cosine"):
    """The factor of the peak learning rate at optimizer step `step` (0-based): linear warmup from 0
    over warmup_steps, then "cosine" (half a cosine down to 0), "linear" (down to 0) or "constant"."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    if schedule == "constant":
        return 1.0
    raise ConfigError(f"unknown schedule {schedule!r}; use 'cosine', 'linear' or 'constant'")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def batches(token_lists, batch_size, max_length=None, pad_token_id=0, seed=0, epochs=None):
    """Shuffled, right-padded batches of token-id lists, forever (or for `epochs`): dicts of
    input_ids (batch, seq), attention_mask (batch, seq), labels (batch, seq) with -100 at padding;
    seq is the longest row of the batch, rows cut to max_length."""
    rows = [list(map(int, t))[:max_length] if max_length else list(map(int, t)) for t in token_lists]
    if not rows or min(map(len, rows)) < 2:
        raise InputError("batches: every example needs at least two tokens (one prediction)")
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(rows))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chosen = [rows[i] for i in order[start : start + batch_size]]
            seq = max(map(len, chosen))
            ids = np.full((batch_size, seq), pad_token_id, np.int64)
            mask = np.zeros((batch_size, seq), np.int64)
            for r, row in enumerate(chosen):
                ids[r, : len(row)], mask[r, : len(row)] = row, 1
            yield {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}
        epoch += 1


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What a run did: the mean loss, learning rate, gradient norm (before clipping) and tokens
    per optimizer step; seconds taken; the adapter folders written."""

    losses: list
    learning_rates: list
    grad_norms: list
    tokens: list
    seconds: float
    checkpoints: list

    @property
    def tokens_per_second(self):
        return sum(self.tokens) / self.seconds if self.seconds else float("nan")


class Trainer:
    """Trains `model.trainable_parameters()` (after `enable_lora`) with AdamW.

    value_and_grad(model, input_ids, labels, attention_mask) -> (loss, {name: gradient}): the
    backward pass (default `minilm.grad.value_and_grad`). checkpoint_every / checkpoint_dir:
    `model.save_adapter(checkpoint_dir / f"step-{n}")` every that many steps."""

    def __init__(
        self,
        model,
        *,
        lr=2e-4,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=None,
        schedule="cosine",
        grad_accum_steps=1,
        max_grad_norm=1.0,
        checkpoint_every=None,
        checkpoint_dir=None,
        value_and_grad=None,
    ):
        self.params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else {}
        if getattr(model, "lora_config", None) is None or not self.params:
            raise ConfigError("nothing to train: call model.enable_lora(...) (or load_adapter) first")
        if model.lora_config.lora_dropout > 0:
            raise ConfigError(
                f"lora_dropout={model.lora_config.lora_dropout}: dropout in training is not implemented; use 0.0"
            )
        if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise ConfigError(f"grad_accum_steps must be a positive integer, got {grad_accum_steps!r}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ConfigError("checkpoint_every needs checkpoint_dir")
        lr_factor(0, warmup_steps, total_steps or 1, schedule)  # an unknown schedule fails here
        self.model, self.lr, self.warmup_steps, self.schedule = model, lr, warmup_steps, schedule
        self.total_steps, self.grad_accum_steps, self.max_grad_norm = total_steps, grad_accum_steps, max_grad_norm
        self.checkpoint_every = checkpoint_every
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.value_and_grad = value_and_grad or lora_value_and_grad
        self.optimizer = AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.aliases = parameter_aliases(model)  # a fused module's later parts share their first part's A
        self.masks = getattr(model, "lora_masks", None) or {}  # blocks that stay zero (keras' BLOOM q/v)
        self.step_count = 0

    def gradients(self, micro_batches):
        """Mean loss, tokens and accumulated gradients ({name: array}) over the micro-batches."""
        total = {name: np.zeros(p.shape, np.float32) for name, p in self.params.items()}
        losses, tokens = [], 0
        for batch in micro_batches:
            loss, grads = self.value_and_grad(
                self.model, batch["input_ids"], batch["labels"], attention_mask=batch.get("attention_mask")
            )
            for name, g in grads.items():
                name = self.aliases.get(name, name)
                if name not in total:
                    raise ConfigError(f"value_and_grad returned a gradient for {name!r}, which is not trained")
                total[name] += np.asarray(g, np.float32) / len(micro_batches)
            losses.append(float(loss))
            mask = batch.get("attention_mask")
            tokens += int(np.sum(mask)) if mask is not None else int(np.size(batch["input_ids"]))
        for name, mask in self.masks.items():
            total[name] *= mask
        return float(np.mean(losses)), tokens, total

    def step(self, micro_batches):
        """One optimizer step over grad_accum_steps micro-batches. Returns (loss, lr, grad norm, tokens)."""
        if len(micro_batches) != self.grad_accum_steps:
            raise InputError(f"a step takes grad_accum_steps={self.grad_accum_steps} micro-batches")
        loss, tokens, grads = self.gradients(micro_batches)
        norm = clip_grad_norm(grads, self.max_grad_norm) if self.max_grad_norm else _norm(grads)
        lr = self.lr * lr_factor(self.step_count, self.warmup_steps, self.total_steps or 1, self.schedule)
        self.optimizer.step(grads, lr=lr)
        self.step_count += 1
        return loss, lr, norm, tokens

    def fit(self, data, steps, progress=True):
        """`steps` optimizer steps on batches drawn from `data` (an iterator of batch dicts);
        a tqdm bar shows the loss and tokens/s. Returns a TrainResult."""
        if self.total_steps is None:
            self.total_steps = self.step_count + steps
        data = iter(data)
        result = TrainResult([], [], [], [], 0.0, [])
        bar = tqdm(range(steps), desc="train", disable=not progress)
        start = time.perf_counter()
        for _ in bar:
            micro = [next(data) for _ in range(self.grad_accum_steps)]
            loss, lr, norm, tokens = self.step(micro)
            result.losses.append(loss)
            result.learning_rates.append(lr)
            result.grad_norms.append(norm)
            result.tokens.append(tokens)
            result.seconds = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{result.tokens_per_second:.0f}")
            if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                folder = self.checkpoint_dir / f"step-{self.step_count}"
                self.model.save_adapter(folder)
                result.checkpoints.append(folder)
        bar.close()
        return result


def train(model, data, steps, progress=True, **options):
    """`Trainer(model, **options).fit(data, steps)`: LoRA fine-tuning in one call (see `Trainer`)."""
    return Trainer(model, total_steps=options.pop("total_steps", steps), **options).fit(data, steps, progress)


def _norm(grads):
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
