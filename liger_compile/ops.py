"""Our fused lm_head ops as plain functions, for training loops that compute their own loss.

    import liger_compile.ops as ops
    out = ops.token_logprobs(hidden, model.lm_head.weight, labels)          # per-token log-probs, entropy, ...
    loss = ops.linear_jsd(student_hidden, student.lm_head.weight,            # distillation without [B, T, V]
                          teacher_hidden, teacher.lm_head.weight, labels, beta=0.5)

Both take the final hidden states (after the model's last norm, `model.model(...).last_hidden_state` for HF causal
LMs) and already-shifted labels (the hidden state at t is scored against the label at t + 1: pass
`hidden[:, :-1]` and `labels[:, 1:]`). They run eagerly or inside torch.compile (any backend); off CUDA they run the
same algorithm in plain torch.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE_INDEX = -100


class TokenLogprobs(NamedTuple):
    log_probs: torch.Tensor  # fp32, the labels' shape; 0 where the label is ignored
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor  # log(sum_v p_v^2), no gradient
    mean_logits: torch.Tensor  # mean over the vocabulary of the transformed logits, no gradient
    is_top1: torch.Tensor  # bool: the label is the first argmax


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, bias: torch.Tensor = None,
                   temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0,
                   ignore_index: int = IGNORE_INDEX) -> TokenLogprobs:
    """Each token's log-probability of its label under softmax(transform(hidden @ weight.T + bias)), where the
    transform is TRL's: times logit_scale, then softcap * tanh(x / softcap) if softcap, then / temperature.
    Gradients flow from log_probs and entropy. hidden [..., H] and labels [...]; see kernels/token_logprobs.py."""
    import liger_compile.kernels.token_logprobs  # noqa: F401, PLC0415 - declares the op

    grad = torch.is_grad_enabled()
    out = torch.ops.liger.token_logprobs(hidden, weight, bias, labels, int(ignore_index), float(temperature),
                                         float(softcap or 0.0), float(logit_scale), grad and hidden.requires_grad,
                                         grad and weight.requires_grad)
    return TokenLogprobs(*out[:5])


def linear_jsd(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
               teacher_weight: torch.Tensor, labels: torch.Tensor, *, beta: float = 0.5, temperature: float = 1.0,
               ignore_index: int = IGNORE_INDEX, num_items_in_batch: int | torch.Tensor | None = None
               ) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence of TRL's GKD trainer (beta 0: KL(teacher || student), 1:
    KL(student || teacher)), summed over the tokens whose label is not ignore_index and divided by their count
    (at least 1) or by num_items_in_batch. Only the student's hidden states and lm_head weight get gradients (the
    weight only if it requires one); the teacher's inputs are read, never differentiated."""
    import liger_compile.kernels.linear_jsd  # noqa: F401, PLC0415 - declares the op

    weight_grad = torch.is_grad_enabled() and student_weight.requires_grad
    total = torch.ops.liger.linear_jsd(student_hidden, student_weight, teacher_hidden.detach(),
                                       teacher_weight.detach(), labels, int(ignore_index), float(beta),
                                       float(temperature), weight_grad)[0]
    if num_items_in_batch is None:
        denominator = (labels != ignore_index).sum().clamp(min=1)
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=total.device)
    return total / denominator
