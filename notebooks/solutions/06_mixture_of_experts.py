"""Solutions to the exercises of notebooks/06_mixture_of_experts (for teachers)."""

import numpy as np

from minilm.models import qwen3_moe


def route(router_logits, top_k, norm_topk_prob):
    z = router_logits.astype(np.float32)
    probs = np.exp(z - z.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # softmax over all experts
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]  # most probable first
    weights = np.take_along_axis(probs, index, axis=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return index, weights


# Collapsed router: every token picks experts 0 and 1, so each is chosen by all tokens (fraction 1 per
# expert, top_k = 2 slots a token) and has mean probability 0.5: 8 * (1 * 0.5 + 1 * 0.5) = 8. A balanced
# router gives 8 * 8 * (2/8 * 1/8) = 2 = top_k. The same with minilm's function:
collapsed = np.log(np.array([[0.5, 0.5] + [1e-30] * 6] * 10, np.float32))
ANSWERS = {"moe.1": route, "moe.2": float(qwen3_moe.load_balancing_loss([collapsed], 8, 2)), "moe.3": (8, 16, 32)}
