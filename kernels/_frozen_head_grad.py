"""d hidden of a chunked lm_head op computed in its forward pass, where the head's weight takes no gradient.

With a frozen lm_head (LoRA and most adapter fine-tuning) the backward of ``liger::token_logprobs`` needs only
d hidden. For a scored token t, d loss / d logits_t = g_t * e_t + k_t * f_t, where g_t and k_t are the gradients its
log-prob and its entropy receive, and e_t = d log p_t / d logits_t and f_t = d entropy_t / d logits_t depend on the
forward alone. When no entropy gradient flows (TRL logs the entropy, detached), d hidden_t = g_t * (e_t @ W): the
forward runs the backward's row kernel with g = 1, k = 0 on each chunk's logits and one matmul, and keeps
M = E @ W ([tokens, hidden]); the backward multiplies each row of M by its g_t. Two vocabulary-wide matmuls instead
of three, whatever the per-token weights are (DPO's, KTO's and GRPO's differ per sequence, which the trainable
head's uniform-gradient shortcut, kernels/_uniform_grad.py, cannot use).

Checking that the entropy gradient is zero costs one host synchronisation per backward; one that is not zero
computes the gradient again and ends the keeping for heads of that shape (their forwards stop spending the matmul).
At most one forward per head shape keeps M: a second forward before the first one's backward replaces it, and
that first backward recomputes. Inside a CUDA-graph capture nothing is kept or checked.
"""
from typing import Optional

import torch

from ._uniform_grad import Kept, capturing, weight_key

_off: set = set()  # head shapes whose backward saw an entropy gradient
_kept: dict[tuple, Kept] = {}
stats = {"kept": 0, "used": 0, "recomputed": 0}  # forwards that kept M; backwards that used it / recomputed


def wanted(weight: torch.Tensor) -> bool:
    """Whether this forward (of a head whose weight takes no gradient, asked for d hidden) should keep M."""
    return not capturing(weight) and weight_key(weight) not in _off


def keep(weight: torch.Tensor, log_z: torch.Tensor, direction: torch.Tensor) -> None:
    """direction: M in hidden's shape, zero on unscored rows."""
    _kept[weight_key(weight)] = Kept(log_z.untyped_storage(), 1.0, (direction,))
    stats["kept"] += 1


def hidden_gradient(grad_log_probs, grad_entropy, weight, labels, log_z, ignore_index) -> Optional[torch.Tensor]:
    """In the backward: d hidden from the forward's M, or None where the backward must compute it (nothing kept
    for this call, or the entropy received a gradient)."""
    key = weight_key(weight)
    if capturing(weight) or key in _off:
        return None
    kept = _kept.get(key)
    if kept is None or kept.token.data_ptr() != log_z.untyped_storage().data_ptr():
        stats["recomputed"] += 1  # this call's M was replaced by a later forward's (or its backward took it)
        return None
    del _kept[key]
    scored = labels.reshape(-1) != ignore_index
    if torch.where(scored, grad_entropy.reshape(-1).float().abs(), 0.0).amax().item() != 0.0:
        _off.add(key)
        stats["recomputed"] += 1
        return None
    stats["used"] += 1
    direction = kept.grads[0]
    g = torch.where(scored, grad_log_probs.reshape(-1).float(), 0.0)[:, None]
    return (direction.reshape(-1, direction.shape[-1]).float() * g).to(direction.dtype).view(direction.shape)


def reset() -> None:
    """Forgets every kept M and every shape turned off (tests)."""
    _off.clear()
    _kept.clear()
    for k in stats:
        stats[k] = 0
