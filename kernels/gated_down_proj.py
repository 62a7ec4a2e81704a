"""The gated MLP's tail, ``down_proj(act(gate) * up)``, as one op: ``liger::gated_down_proj``.

Why a second op next to ``liger::gated_mlp``: autograd saves the input of every linear layer, so after
``y = act(gate) * up`` the training graph keeps gate, up (for the activation's backward) and y (for down_proj's
weight gradient): three [tokens, intermediate] tensors per layer, the largest activations of a decoder (256 MiB
each per layer for Llama-3.2-1B at 4 x 4096). This op saves gate and up only and writes y again in backward, in the
same pass that computes d_gate and d_up, so the memory of y per layer goes away for one extra write of it.

Math (W: [H, F] down_proj's weight, gate/up: [..., F], dz: [..., H] the incoming gradient):
    forward:   y = act(gate) * up   (liger::gated_mlp's kernel),   z = y @ W^T
    backward:  dy = dz @ W
               d_gate, d_up, y = one pass over (dy, gate, up)     (y recomputed, bit-identical to the forward's)
               (y written over dy, the op's own temporary: one [tokens, intermediate] buffer less)
               dW = dz^T @ y
The matmuls are torch's (cuBLAS, fp32 accumulation), exactly as F.linear's own forward and backward.
"""
import torch

from . import gated_mlp
from ._op import declare, sample


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _check(gate, up, weight):
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1]:
        raise ValueError(f"gated_down_proj: weight {tuple(weight.shape)} does not take inputs of width "
                         f"{gate.shape[-1]}")


def launch_forward(gate, up, weight, activation):
    """liger::gated_down_proj with liger::gated_mlp's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check(gate, up, weight)
    # F.linear, not torch.mm(...).view(...): an op's output must not be a view
    return torch.nn.functional.linear(gated_mlp.launch_forward(gate, up, activation), weight)


def reference_forward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, activation: str) -> torch.Tensor:
    """liger::gated_down_proj in plain torch (the op off CUDA): F.linear(act(gate) * up, weight), activation in
    {"silu", "gelu_tanh"}; no bias (no HF gated MLP has one)."""
    _check(gate, up, weight)
    return torch.nn.functional.linear(gated_mlp.reference_forward(gate, up, activation), weight)


def _finish_backward(dz2, weight, weight_needs_grad, outs):
    """(d_gate, d_up, d_weight) from the activation's backward outputs (dg, du[, y])."""
    if not weight_needs_grad:
        return outs[0], outs[1], weight.new_empty(0)
    dg, du, y = outs
    return dg, du, torch.mm(dz2.t(), _rows(y))


def launch_backward(dz, gate, up, weight, activation, weight_needs_grad):
    """liger::gated_down_proj_backward with liger::gated_mlp's backward kernel, which writes y again in its pass."""
    dz2 = _rows(dz)
    dy = torch.mm(dz2, weight).view(gate.shape)
    outs = gated_mlp.launch_backward(dy, gate, up, activation, recompute_y=weight_needs_grad, dy_is_scratch=True)
    return _finish_backward(dz2, weight, weight_needs_grad, outs)


def reference_backward(
    dz: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, activation: str,
    weight_needs_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::gated_down_proj_backward in plain torch -> (d_gate, d_up, d_weight); d_weight is empty when
    weight_needs_grad is False (frozen or adapter-tuned down_proj), which also spares writing y again."""
    dz2 = _rows(dz)
    dy = torch.mm(dz2, weight).view(gate.shape)
    outs = gated_mlp.reference_backward(dy, gate, up, activation)
    if weight_needs_grad:
        outs = (*outs, gated_mlp.reference_forward(gate, up, activation))
    return _finish_backward(dz2, weight, weight_needs_grad, outs)


def _setup_context(ctx, inputs, output):
    gate, up, weight, activation = inputs
    ctx.save_for_backward(gate, up, weight)
    ctx.activation = activation


def _backward(ctx, dz):
    gate, up, weight = ctx.saved_tensors
    dg, du, dw = torch.ops.liger.gated_down_proj_backward(dz, gate, up, weight, ctx.activation,
                                                           ctx.needs_input_grad[2])
    return dg, du, (dw if ctx.needs_input_grad[2] else None), None


def _forward_examples(device, width):
    return [(sample(device, 6, width), sample(device, 6, width, seed=1), sample(device, 8, width, seed=2), "silu")]


def _backward_examples(device, width):
    [(gate, up, weight, activation)] = _forward_examples(device, width)
    dz = sample(device, 6, 8, seed=3)
    return [(dz, gate, up, weight, activation, True), (dz, gate, up, weight, activation, False)]


gated_down_proj = declare("gated_down_proj", launch_forward, reference_forward, setup_context=_setup_context,
                          backward=_backward, examples=_forward_examples)
gated_down_proj_backward = declare("gated_down_proj_backward", launch_backward, reference_backward,
                                   examples=_backward_examples)
