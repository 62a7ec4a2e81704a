"""``liger::linear_cross_entropy``: the op's declaration, its argument checks, fake and autograd formula.

An opaque op (kernels/_op.py) rather than a triton_op: the work is three cuBLAS matmuls per chunk writing into slices of preallocated
buffers and accumulating in place. Traced by Inductor, those in-place writes would be functionalised into copies of
[N, H] and [V, H] buffers per chunk; run as one opaque call, the memory is exactly what the paths allocate (one
chunk's working buffer plus the gradients). Nothing in it synchronises with the host, so it also runs inside CUDA
graphs.
"""
from typing import Optional

import torch

from .._op import declare, sample
from ._shared import is_eager
from .paths import launch_forward


def check_inputs(hidden, weight, bias, labels, num_items, ignore_index, reduction):
    """Raises ValueError on bad arguments. Label values are checked where that is free (CPU tensors, outside
    tracing); on a GPU a label outside the vocabulary makes the loss NaN instead (never a silent number), since
    checking would synchronise with the host every step."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items is not None and reduction != "sum":
        raise ValueError("linear_cross_entropy: num_items divides a 'sum' reduction; got reduction='mean'")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "disagree on the hidden size")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} does not match weight {tuple(weight.shape)}")
    if labels.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"linear_cross_entropy: {labels.numel()} labels for hidden {tuple(hidden.shape)}")
    if is_eager(labels) and labels.device.type == "cpu":  # on a GPU the check would cost a host sync
        v = weight.shape[0]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= v))
        if bool(bad.any()):
            first = bad.reshape(-1).nonzero()[0, 0]
            raise ValueError(
                f"linear_cross_entropy: label {int(labels.reshape(-1)[first])} at position {int(first)} is outside "
                f"the vocabulary [0, {v}) and is not ignore_index ({ignore_index})"
            )


def launch(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
           keep_logits=False, path=None):
    """The op with the Triton kernels, on any device Triton can reach (CUDA, or CPU under TRITON_INTERPRET=1); path
    as launch_forward's (None: the default for these inputs)."""
    check_inputs(hidden, weight, bias, labels, num_items, ignore_index, reduction)
    return launch_forward(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
                          use_kernel=True, keep_logits=keep_logits, path=path)


def reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    num_items: Optional[torch.Tensor], ignore_index: int, label_smoothing: float, softcap: float, reduction: str,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::linear_cross_entropy off CUDA: the same chunked algorithm with the row kernel's math in torch. Returns
    (loss, grad_hidden, grad_weight, grad_bias, logits): the fp32 scalar loss, the gradients for grad_output = 1 that
    backward scales (grad_bias is empty without a bias), and with keep_logits the [N, V] logits in the input dtype
    (else empty). Callers use [0] (and [4])."""
    check_inputs(hidden, weight, bias, labels, num_items, ignore_index, reduction)
    return launch_forward(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
                          use_kernel=False, keep_logits=keep_logits)


def _fake(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
          keep_logits=False):
    n = hidden.numel() // hidden.shape[-1]
    loss = hidden.new_empty((), dtype=torch.float32)
    grad_b = hidden.new_empty(bias.shape if bias is not None else (0,), dtype=bias.dtype if bias is not None
                              else hidden.dtype)
    kept = hidden.new_empty((n, weight.shape[0]) if keep_logits else (0,))
    return loss, torch.empty_like(hidden), torch.empty_like(weight), grad_b, kept


def _setup_context(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:4])
    ctx.mark_non_differentiable(*output[1:])


def _scaled(grad: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """grad * grad_loss (a 0-dim fp32 tensor: the product keeps grad's dtype). Run eagerly, the saved gradient is
    scaled in place, which spares a copy as large as the weight (1 GiB for Llama-3-8B's lm_head); a second backward
    through the same graph then fails autograd's saved-tensor version check instead of reading scaled values. Traced
    (torch.compile), it stays out of place: Inductor fuses the product into whatever consumes it."""
    return grad.mul_(grad_loss) if is_eager(grad) else grad * grad_loss


def _backward(ctx, grad_loss, *_grad_saved):
    grad_h, grad_w, grad_b = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dh = _scaled(grad_h, grad_loss) if needs[0] else None
    dw = _scaled(grad_w, grad_loss) if needs[1] else None
    db = _scaled(grad_b, grad_loss) if ctx.has_bias and needs[2] else None
    return dh, dw, db, None, None, None, None, None, None, None


def _examples(device, width):
    # width is the vocabulary: the row kernel's tiles and the exp path's column tiles depend on it
    labels = torch.tensor([1, -100, 2, 0, 3]).to(device)
    row_path = (sample(device, 3, 16), sample(device, width, 16, seed=1), None, labels[:3], None, -100, 0.0, 0.0,
                "mean")
    hb, wb = sample(device, 5, 16, seed=2).bfloat16(), sample(device, width, 16, seed=3).bfloat16()
    exp_path = (hb, wb, None, labels, None, -100, 0.0, 0.0, "mean", False, "exp_matmul")
    return [row_path, exp_path]


linear_cross_entropy = declare("linear_cross_entropy", launch, reference, triton=False, fake=_fake,
                               setup_context=_setup_context, backward=_backward, examples=_examples)
