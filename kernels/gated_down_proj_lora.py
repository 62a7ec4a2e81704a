"""The gated MLP's tail when down_proj carries a LoRA adapter, as one op: ``liger::gated_down_proj_lora``.

PEFT computes ``down_proj(y) + lora_B(lora_A(y)) * scaling`` for y = act(gate) * up (dropout 0). y then feeds two
matmuls, so autograd keeps it for the adapter's A gradient, and ``liger::gated_down_proj`` (which writes y again in
backward instead of keeping it) cannot take the site: one [tokens, intermediate] tensor per layer stays alive
until the backward. This op keeps gate, up and u = y @ A^T ([tokens, r]) and writes y again in the backward pass
that computes d_gate and d_up. A frozen down_proj (LoRA's case) gets no weight gradient, and y is written again only
when a gradient needs it.

Math (W: [H, F] down_proj's weight, A: [r, F], B: [H, r], s the scaling, dz: [..., H] the incoming gradient):
    forward:   y = act(gate) * up   (liger::gated_mlp's kernel),   u = y @ A^T,   z = y @ W^T + s * (u @ B^T)
    backward:  dv = s * (dz @ B)                                    [tokens, r]
               dy = dz @ W + dv @ A
               d_gate, d_up, y = one pass over (dy, gate, up)      (y recomputed, bit-identical to the forward's)
               dA = dv^T @ y,   dB = s * (dz^T @ u),   dW = dz^T @ y
The matmuls are torch's (cuBLAS, fp32 accumulation); every tensor shares one dtype (the pattern checks it).
"""
import torch
import torch.nn.functional as F

from . import gated_mlp
from ._op import declare, sample


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _check(gate, up, weight, lora_a, lora_b):
    f = gate.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != f:
        raise ValueError(f"gated_down_proj_lora: weight {tuple(weight.shape)} does not take inputs of width {f}")
    if (lora_a.dim() != 2 or lora_a.shape[1] != f or lora_b.dim() != 2
            or lora_b.shape != (weight.shape[0], lora_a.shape[0])):
        raise ValueError(f"gated_down_proj_lora: adapter A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} do not "
                         f"fit down_proj {tuple(weight.shape)}")


def _forward(y, weight, lora_a, lora_b, scaling):
    # F.linear, not mm(...).view(...): an op's outputs must not be views
    u = F.linear(y, lora_a)
    return torch.add(F.linear(y, weight), F.linear(u, lora_b), alpha=scaling), u


def launch_forward(gate, up, weight, lora_a, lora_b, scaling, activation):
    """liger::gated_down_proj_lora with liger::gated_mlp's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    _check(gate, up, weight, lora_a, lora_b)
    return _forward(gated_mlp.launch_forward(gate, up, activation), weight, lora_a, lora_b, scaling)


def reference_forward(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, scaling: float, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """liger::gated_down_proj_lora in plain torch (the op off CUDA) -> (z, u): z = F.linear(y, weight) +
    scaling * F.linear(F.linear(y, lora_a), lora_b) with y = act(gate) * up, and u = F.linear(y, lora_a), which the
    backward reads (no gradient flows through it). activation in {"silu", "gelu_tanh"}."""
    _check(gate, up, weight, lora_a, lora_b)
    return _forward(gated_mlp.reference_forward(gate, up, activation), weight, lora_a, lora_b, scaling)


def _backward(dz, gate, up, weight, lora_a, lora_b, u, scaling, needs, gated_backward):
    """(d_gate, d_up, d_weight, d_lora_a, d_lora_b), empty where needs (weight, A, B) says no. gated_backward(dy,
    y_needed) -> (d_gate, d_up, y or None)."""
    weight_grad, a_grad, b_grad = needs
    dz2 = _rows(dz)
    dv = torch.mm(dz2, lora_b) * scaling
    dy = torch.addmm(torch.mm(dz2, weight), dv, lora_a).view(gate.shape)
    dg, du, y = gated_backward(dy, weight_grad or a_grad)
    empty = gate.new_empty
    return (dg, du, torch.mm(dz2.t(), _rows(y)) if weight_grad else empty(0),
            torch.mm(dv.t(), _rows(y)) if a_grad else empty(0),
            torch.mm(dz2.t(), _rows(u)) * scaling if b_grad else empty(0))


def launch_backward(dz, gate, up, weight, lora_a, lora_b, u, scaling, activation, weight_grad, lora_a_grad,
                    lora_b_grad):
    """liger::gated_down_proj_lora_backward with liger::gated_mlp's backward kernel, which writes y again in its
    pass when a weight gradient needs it."""
    def gated_backward(dy, y_needed):
        outs = gated_mlp.launch_backward(dy, gate, up, activation, recompute_y=y_needed, dy_is_scratch=True)
        return (*outs, None) if len(outs) == 2 else outs

    return _backward(dz, gate, up, weight, lora_a, lora_b, u, scaling, (weight_grad, lora_a_grad, lora_b_grad),
                     gated_backward)


def reference_backward(
    dz: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
    lora_b: torch.Tensor, u: torch.Tensor, scaling: float, activation: str, weight_grad: bool, lora_a_grad: bool,
    lora_b_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """liger::gated_down_proj_lora_backward in plain torch -> (d_gate, d_up, d_weight, d_lora_a, d_lora_b); a weight
    gradient not asked for is an empty tensor (a frozen down_proj, LoRA's case)."""
    def gated_backward(dy, y_needed):
        dg, du = gated_mlp.reference_backward(dy, gate, up, activation)
        return dg, du, gated_mlp.reference_forward(gate, up, activation) if y_needed else None

    return _backward(dz, gate, up, weight, lora_a, lora_b, u, scaling, (weight_grad, lora_a_grad, lora_b_grad),
                     gated_backward)


def _setup_context(ctx, inputs, output):
    gate, up, weight, lora_a, lora_b, scaling, activation = inputs
    ctx.save_for_backward(gate, up, weight, lora_a, lora_b, output[1])
    ctx.settings = (scaling, activation)
    ctx.mark_non_differentiable(output[1])


def _autograd_backward(ctx, dz, _du):
    gate, up, weight, lora_a, lora_b, u = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = torch.ops.liger.gated_down_proj_lora_backward(dz, gate, up, weight, lora_a, lora_b, u, *ctx.settings,
                                                          needs[2], needs[3], needs[4])
    return (*(g if need else None for g, need in zip(grads, needs[:5])), None, None)


def _forward_examples(device, width):
    gate, up = sample(device, 6, width), sample(device, 6, width, seed=1)
    return [(gate, up, sample(device, 8, width, seed=2), sample(device, 3, width, seed=3), sample(device, 8, 3, seed=4),
             0.5, "silu")]


def _backward_examples(device, width):
    [(gate, up, weight, a, b, scaling, activation)] = _forward_examples(device, width)
    u = reference_forward(gate, up, weight, a, b, scaling, activation)[1]
    dz = sample(device, 6, 8, seed=5)
    return [(dz, gate, up, weight, a, b, u, scaling, activation, True, True, True),
            (dz, gate, up, weight, a, b, u, scaling, activation, False, True, True)]


gated_down_proj_lora = declare("gated_down_proj_lora", launch_forward, reference_forward,
                               setup_context=_setup_context, backward=_autograd_backward, examples=_forward_examples)
gated_down_proj_lora_backward = declare("gated_down_proj_lora_backward", launch_backward, reference_backward,
                                        examples=_backward_examples)
