"""Task heads shared by every family, and their losses (transformers' Generic* heads).

A head is a small layer on top of a family's base model (`base_model_class`), which it holds
under `base_model_prefix` (`model.` or `transformer.` in checkpoint names):

    causal LM                 logits = hidden @ lm_head^T                     (batch, seq, vocab_size)
    sequence classification   logits = hidden[last non-pad token] @ score^T   (batch, num_labels)
    token classification      logits = hidden @ score^T + b                   (batch, seq, num_labels)
    question answering        start, end = split(hidden @ qa_outputs^T + b)   (batch, seq) each

Training (`minilm/grad.py`): `cross_entropy_backward` and `causal_lm_loss_backward` follow their
losses (upstream gradient in, input gradient out, as every `*_backward` in minilm), and
`causal_lm_head_loss_and_grad` runs the causal-LM head, its loss and its gradient a few tokens at
a time.
"""

from __future__ import annotations

import numpy as np

from . import generation, nn, ops
from .activations import tap
from .errors import InputError
from .modeling import ModelOutput, PreTrainedModel, with_prefix

# ---------------------------------------------------------------------------------------------
# Losses (float32, mean over the items that count, as torch's cross_entropy)
# ---------------------------------------------------------------------------------------------


def cross_entropy(logits, labels, ignore_index=-100):
    """Mean of -log softmax(logits)[label] over labels != ignore_index.

    logits: (n, num_classes), labels: (n,)"""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    keep = labels != ignore_index
    if not keep.any():
        return np.float32(np.nan)
    if ((labels[keep] < 0) | (labels[keep] >= logits.shape[-1])).any():
        raise InputError(
            f"labels must lie in [0, {logits.shape[-1]}) or equal {ignore_index}; "
            f"got {labels[keep].min()}..{labels[keep].max()}"
        )
    log_probs = nn.log_softmax(logits[keep], axis=-1)  # (n_kept, num_classes)
    return np.float32(-np.mean(log_probs[np.arange(keep.sum()), labels[keep]]))


def cross_entropy_backward(logits, labels, ignore_index=-100):
    """Gradient of `cross_entropy` with respect to the logits: (softmax(logits) - onehot(label)) / n
    on the n rows that count, 0 on ignored rows.

    logits: (n, num_classes), labels: (n,) -> dlogits (n, num_classes) float32"""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels).astype(np.int64)
    keep = labels != ignore_index
    dlogits = np.zeros_like(logits)
    if not keep.any():
        return dlogits
    probs = nn.softmax(logits[keep], axis=-1)  # (n_kept, num_classes)
    probs[np.arange(keep.sum()), labels[keep]] -= 1
    dlogits[keep] = probs / np.float32(keep.sum())
    return dlogits


def check_labels(labels, shape, what):
    """InputError unless `labels` are integers of `shape` (a loss must never index out of its row)."""
    labels = np.asarray(labels)
    if labels.shape != tuple(shape):
        raise InputError(f"{what} must have shape {tuple(shape)}; got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise InputError(f"{what} must be integers; got dtype {labels.dtype}")


def causal_lm_loss(logits, labels):
    """Next-token prediction: position t predicts labels[t + 1]; -100 marks ignored labels."""
    labels = np.asarray(labels)
    check_labels(labels, logits.shape[:2], "labels (one token id per position)")
    shifted = np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), -100)], axis=1)  # (batch, seq)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1))


def shift_labels(labels):
    """The labels position t predicts: labels[t + 1], and -100 (ignored) at the last position.
    labels: (batch, seq) -> (batch, seq)"""
    labels = np.asarray(labels)
    return np.concatenate([labels[:, 1:], np.full((labels.shape[0], 1), -100)], axis=1)


def causal_lm_loss_backward(logits, labels):
    """Gradient of `causal_lm_loss` with respect to the logits: the shifted labels' cross entropy.
    logits: (batch, seq, vocab_size), labels: (batch, seq) -> dlogits (batch, seq, vocab_size)"""
    check_labels(labels, logits.shape[:2], "labels (one token id per position)")
    shifted = shift_labels(labels).reshape(-1)  # (batch * seq,)
    return cross_entropy_backward(logits.reshape(-1, logits.shape[-1]), shifted).reshape(logits.shape)


def causal_lm_head_loss_and_grad(hidden, lm_head, labels, soft_cap=None, chunk_tokens=64):
    """The causal-LM head, its loss and the loss's gradient at the final hidden states, a few
    tokens at a time: the (tokens, vocab_size) logits of a 262k vocabulary never exist at once.

        logits = soft_cap(hidden lm_head^T)         loss = cross entropy of the shifted labels
        dlogits = (softmax(logits) - onehot) / n    dlogits_raw = soft_cap'(.) * dlogits
        dhidden = dlogits_raw lm_head                (lm_head frozen: tied to the embeddings or not)

    hidden: (batch, seq, hidden_size); lm_head: (vocab_size, hidden_size); labels: (batch, seq)
    -> loss (float32 scalar), dhidden (batch, seq, hidden_size) float32
    """
    b, s, hidden_size = hidden.shape
    check_labels(labels, (b, s), "labels (one token id per position)")
    targets = shift_labels(labels).reshape(-1)  # (tokens,)
    count = np.count_nonzero(targets != -100)
    flat = hidden.reshape(b * s, hidden_size)  # (tokens, hidden_size)
    dhidden = np.zeros((b * s, hidden_size), np.float32)
    total = 0.0
    for start in range(0, b * s, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        keep = targets[rows] != -100
        if not keep.any():
            continue
        raw = ops.to_host(ops.linear(flat[rows][keep], lm_head)).astype(np.float32)  # (kept, vocab_size)
        logits = raw if soft_cap is None else nn.soft_cap(raw, np.float32(soft_cap))
        total += cross_entropy(logits, targets[rows][keep]) * np.float64(keep.sum())  # the chunk's sum
        dlogits = cross_entropy_backward(logits, targets[rows][keep]) * (keep.sum() / np.float32(count))
        if soft_cap is not None:
            dlogits = nn.soft_cap_backward(dlogits, raw, soft_cap)
        dhidden[start : start + len(keep)][keep] = ops.linear_input_grad(dlogits, lm_head)
    loss = np.float32(total / count) if count else np.float32(np.nan)
    return loss, dhidden.reshape(b, s, hidden_size)


def sequence_classification_loss(pooled_logits, labels, config):
    """Regression (MSE), single-label (cross entropy) or multi-label (BCE with logits),
    by `config.problem_type`, inferred from num_labels and the labels' dtype when unset."""
    labels = np.asarray(labels)
    problem = config.problem_type
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif np.issubdtype(labels.dtype, np.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    logits = pooled_logits.astype(np.float32)  # (batch, num_labels)
    batch = logits.shape[0]
    expected = (batch,) if problem == "single_label_classification" or config.num_labels == 1 else logits.shape
    if labels.size != np.prod(expected) or (labels.ndim > 1 and labels.shape != tuple(expected)):
        raise InputError(f"labels for {problem} must have shape {tuple(expected)}; got {labels.shape}")
    if problem == "regression":
        if config.num_labels == 1:
            return np.float32(np.mean((logits.squeeze() - labels.astype(np.float32).squeeze()) ** 2))
        return np.float32(np.mean((logits - labels.astype(np.float32)) ** 2))
    if problem == "single_label_classification":
        return cross_entropy(logits.reshape(-1, config.num_labels), labels.reshape(-1))
    # multi-label: mean over all (example, label) pairs of binary cross entropy with logits
    y = labels.astype(np.float32)
    return np.float32(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


def question_answering_loss(start_logits, end_logits, start_positions, end_positions):
    """Mean of the start and end cross entropies; positions outside the sequence are ignored."""
    seq = start_logits.shape[1]
    for name, positions in (("start_positions", start_positions), ("end_positions", end_positions)):
        check_labels(np.asarray(positions).reshape(-1), (start_logits.shape[0],), name)
    start = np.clip(np.asarray(start_positions).reshape(-1), 0, seq)
    end = np.clip(np.asarray(end_positions).reshape(-1), 0, seq)
    return np.float32(
        (cross_entropy(start_logits, start, ignore_index=seq) + cross_entropy(end_logits, end, ignore_index=seq)) / 2
    )


def last_non_pad_token(input_ids, pad_token_id):
    """Index of the last token that is not padding, per row (transformers' rule: the rightmost
    position whose id differs from pad_token_id). input_ids: (batch, seq) -> (batch,)"""
    non_pad = (input_ids != pad_token_id).astype(np.int64)  # (batch, seq)
    return np.argmax(np.arange(input_ids.shape[1]) * non_pad, axis=-1)


# ---------------------------------------------------------------------------------------------
# Generic heads
# ---------------------------------------------------------------------------------------------


class HeadModel(PreTrainedModel):
    """A head on top of `base_model_class`, whose weights live under `base_model_prefix`."""

    base_model_class = None
    has_head = True

    def head_shapes(self):
        raise NotImplementedError

    def parameter_shapes(self):
        base = self.base_model_class.backbone_shapes(self.config)
        return {**with_prefix(self.base_model_prefix, base), **self.head_shapes()}

    def backbone_roots(self):
        return {name.split(".")[0] for name in self.base_model_class.backbone_shapes(self.config)}

    @classmethod
    def to_model_layout(cls, tensors, config):
        return cls.base_model_class.to_model_layout(tensors, config)

    @classmethod
    def to_checkpoint_layout(cls, tensors, config):
        return cls.base_model_class.to_checkpoint_layout(tensors, config)

    def base_model(self, **inputs):
        """Run the base model on this head's backbone weights."""
        return self.base_model_class.backbone_forward(self.params[self.base_model_prefix], self.config, **inputs)


class ForCausalLM(HeadModel):
    """Next-token logits: the final hidden states times the LM head (tied to the embeddings
    when `tie_word_embeddings`)."""

    def head_shapes(self):
        return {"lm_head.weight": (self.config.vocab_size, self.config.hidden_size)}

    def tied_weights(self):
        if self.config.tie_word_embeddings:
            return {"lm_head.weight": f"{self.base_model_prefix}.{self.base_model_class.embedding_name}"}
        return {}

    def compute_logits(self, hidden):
        """(batch, seq, hidden_size) -> (batch, seq, vocab_size)"""
        return ops.linear(hidden, self.params.lm_head.weight)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        logits_to_keep=0,
        **extra,
    ):
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **extra,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # only the last positions (generation needs one)
        logits = self.compute_logits(hidden)
        logits = tap(self.params, "logits", logits)  # (batch, seq, vocab_size): after any soft cap
        loss = causal_lm_loss(ops.to_host(logits), labels) if labels is not None else None
        return ModelOutput(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            router_logits=out.router_logits,
        )

    def cache_is_stale(self, cache, total_length):
        """Must generation drop its KV cache and re-run the whole sequence before the step that
        brings it to `total_length` tokens? No, unless a family says so (Phi-3's longrope)."""
        return False

    def generate(self, input_ids, attention_mask=None, **options):
        """Prompt + new token ids, transformers' convention. See `minilm.generation.generate`."""
        return generation.generate(self, input_ids, attention_mask=attention_mask, **options)


class ForSequenceClassification(HeadModel):
    """One label (or score) per sequence, read at the last non-padding token."""

    def head_shapes(self):
        return {"score.weight": (self.config.num_labels, self.config.hidden_size)}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        **extra,
    ):
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **extra,
        )
        logits = ops.linear(out.last_hidden_state, self.params.score.weight)  # (batch, seq, num_labels)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise InputError(
                "sequence classification of a batch > 1 needs config.pad_token_id to find each row's last token"
            )
        if pad is None or input_ids is None:
            last = np.full(batch, logits.shape[1] - 1)
        else:
            last = last_non_pad_token(np.asarray(input_ids), pad)  # (batch,)
        pooled = logits[ops.like(np.arange(batch), logits), ops.like(last, logits)]  # (batch, num_labels)
        loss = sequence_classification_loss(ops.to_host(pooled), labels, self.config) if labels is not None else None
        return ModelOutput(
            loss=loss,
            logits=pooled,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )


class ForTokenClassification(HeadModel):
    """One label per token (dropout is the identity at inference)."""

    classifier_name = "score"  # the head's tensor name: transformers' generic head says score, BLOOM classifier

    def head_shapes(self):
        n, h = self.config.num_labels, self.config.hidden_size
        return {f"{self.classifier_name}.weight": (n, h), f"{self.classifier_name}.bias": (n,)}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=False,
        output_hidden_states=False,
        **extra,
    ):
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **extra,
        )
        head = self.params[self.classifier_name]
        logits = ops.linear(out.last_hidden_state, head.weight, head.bias)  # (batch, seq, num_labels)
        loss = None
        if labels is not None:
            check_labels(labels, logits.shape[:2], "labels (one class per token)")
            loss = cross_entropy(
                ops.to_host(logits).reshape(-1, self.config.num_labels), np.asarray(labels).reshape(-1)
            )
        return ModelOutput(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


class ForQuestionAnswering(HeadModel):
    """Extractive QA: a start and an end score per token."""

    def head_shapes(self):
        return {"qa_outputs.weight": (2, self.config.hidden_size), "qa_outputs.bias": (2,)}

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        output_attentions=False,
        output_hidden_states=False,
        **extra,
    ):
        out = self.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            **extra,
        )
        logits = ops.linear(out.last_hidden_state, self.params.qa_outputs.weight, self.params.qa_outputs.bias)
        start_logits, end_logits = logits[..., 0], logits[..., 1]  # (batch, seq) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = question_answering_loss(
                ops.to_host(start_logits), ops.to_host(end_logits), start_positions, end_positions
            )
        return ModelOutput(
            loss=loss,
            start_logits=start_logits,
            end_logits=end_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
