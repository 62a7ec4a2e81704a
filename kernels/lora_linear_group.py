"""Projections of one input that each carry a LoRA adapter, as one op: ``liger::lora_linear_group2`` (gate and up)
and ``liger::lora_linear_group3`` (q, k and v), with frozen base weights.

Each adapter projection run as ``liger::lora_linear`` costs eight CUDA calls a step and a trip through the
dispatcher, and the projections' input gradients are summed by passes of their own. Sharing the input, n
projections need fewer: the adapters' A matrices concatenated ([R, K], R the sum of the ranks; autograd splits its
gradient back) make one [tokens, R] product h forward and one dA backward; the scaled dy_i B_i are written into
the column slices of one [tokens, R] buffer dh, whose product with the concatenated A is the adapters' part of the
input gradient in one call; and every base projection's input gradient accumulates into one buffer in place.
5n + 3 calls where n lora_linear calls make 8n, one trip through the dispatcher each way.

Math (W_i: [N_i, K] frozen, A: [R, K] = cat(A_i), B_i: [N_i, r_i], s_i the scalings, dy_i: [..., N_i]):
    forward:   h = x A^T,   y_i = x W_i^T + bias_i + s_i * h_i B_i^T      (h_i: h's columns of adapter i)
    backward:  dh_i = s_i * (dy_i B_i),   dx = sum_i dy_i W_i + dh A,   dA = dh^T x,   dB_i = s_i * (dy_i^T h_i)
Plain torch on every device (cuBLAS matmuls, fp32 accumulation), opaque to Inductor as lora_linear is and for
the same reason (kernels/lora_linear.py); every tensor shares one dtype (the pattern checks it).
"""
import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import as_rows
from ._op import declare, sample
from .lora_linear import _zero

_T, _P = torch.Tensor, inspect.Parameter


def _signature(n: int, backward: bool) -> inspect.Signature:
    def p(name, annotation):
        return _P(name, _P.POSITIONAL_OR_KEYWORD, annotation=annotation)

    names = [f"dy{i}" for i in range(n)] if backward else []
    params = [p(name, _T) for name in names] + [p("x", _T)] + [p(f"weight{i}", _T) for i in range(n)]
    if not backward:
        params += [p(f"bias{i}", Optional[_T]) for i in range(n)]
    params += [p("lora_a", _T)] + [p(f"lora_b{i}", _T) for i in range(n)]
    params += [p("h", _T)] if backward else []
    params += [p(f"scaling{i}", float) for i in range(n)]
    params += [p("x_grad", bool), p("lora_a_grad", bool)] if backward else []
    outputs = 2 + n if backward else n + 1  # (dx, dA, dB_i...) or (y_i..., h)
    return inspect.Signature(params, return_annotation=tuple[(_T,) * outputs])


def _split(n: int, args: tuple, backward: bool):
    """The positional arguments as the signature lists them, grouped."""
    args, dys = (args[n:], args[:n]) if backward else (args, ())
    x, weights = args[0], args[1:1 + n]
    rest = args[1 + n:]
    biases, rest = ((), rest) if backward else (rest[:n], rest[n:])
    lora_a, lora_bs, rest = rest[0], rest[1:1 + n], rest[1 + n:]
    h, rest = (rest[0], rest[1:]) if backward else (None, rest)
    return dys, x, weights, biases, lora_a, lora_bs, h, rest[:n], rest[n:]


def _check(x, weights, biases, lora_a, lora_bs):
    k, ranks = x.shape[-1], [b.shape[1] if b.dim() == 2 else -1 for b in lora_bs]
    if lora_a.dim() != 2 or lora_a.shape[1] != k or sum(ranks) != lora_a.shape[0]:
        raise ValueError(f"lora_linear_group: A {tuple(lora_a.shape)} is not the adapters' A matrices (ranks "
                         f"{ranks}) stacked for inputs of width {k}")
    for w, bias, b in zip(weights, biases, lora_bs):
        if w.dim() != 2 or w.shape[1] != k or b.shape[0] != w.shape[0]:
            raise ValueError(f"lora_linear_group: weight {tuple(w.shape)} and adapter B {tuple(b.shape)} do not "
                             f"fit inputs of width {k}")
        if bias is not None and bias.shape != (w.shape[0],):
            raise ValueError(f"lora_linear_group: bias {tuple(bias.shape)} does not fit weight {tuple(w.shape)}")


def _offsets(lora_bs) -> list[int]:
    offsets = [0]
    for b in lora_bs:
        offsets.append(offsets[-1] + b.shape[1])
    return offsets


def _make_forward(n: int):
    def forward(*args):
        _, x, weights, biases, lora_a, lora_bs, _, scalings, _ = _split(n, args, backward=False)
        _check(x, weights, biases, lora_a, lora_bs)
        h = F.linear(x, lora_a)
        h2, at = as_rows(h), _offsets(lora_bs)
        ys = []
        for i, (w, bias, b, s) in enumerate(zip(weights, biases, lora_bs, scalings)):
            y = F.linear(x, w, bias)  # on x itself: an op's outputs must not be views
            as_rows(y).addmm_(h2[:, at[i]:at[i + 1]], b.t(), alpha=s)
            ys.append(y)
        return (*ys, h)

    forward.__signature__ = _signature(n, backward=False)
    forward.__name__ = forward.__qualname__ = f"lora_linear_group{n}_forward"
    forward.__doc__ = f"liger::lora_linear_group{n} -> (y_0 .. y_{n - 1}, h): see the module's docstring."
    return forward


def _make_backward(n: int):
    def backward(*args):
        dys, x, weights, _, lora_a, lora_bs, h, scalings, (x_grad, lora_a_grad) = _split(n, args, backward=True)
        x2, h2, at = as_rows(x), as_rows(h), _offsets(lora_bs)
        dys2 = [as_rows(dy) for dy in dys]
        zero = _zero(x)
        dh = x2.new_empty((x2.shape[0], at[-1]))
        for i, (dy2, b, s) in enumerate(zip(dys2, lora_bs, scalings)):
            torch.addmm(zero, dy2, b, beta=0, alpha=s, out=dh[:, at[i]:at[i + 1]])
        dx = x.new_empty(0)
        if x_grad:
            dx = torch.matmul(dys[0], weights[0])  # x's shape, not a view
            dx2 = as_rows(dx)
            for dy2, w in zip(dys2[1:], weights[1:]):
                dx2.addmm_(dy2, w)
            dx2.addmm_(dh, lora_a)
        da = torch.mm(dh.t(), x2) if lora_a_grad else x.new_empty(0)
        dbs = [torch.addmm(zero, dy2.t(), h2[:, at[i]:at[i + 1]], beta=0, alpha=s)
               for i, (dy2, s) in enumerate(zip(dys2, scalings))]
        return (dx, da, *dbs)

    backward.__signature__ = _signature(n, backward=True)
    backward.__name__ = backward.__qualname__ = f"lora_linear_group{n}_backward"
    backward.__doc__ = (f"liger::lora_linear_group{n}_backward -> (dx, d_lora_a, d_lora_b_0 .. d_lora_b_{n - 1}); "
                        "dx and d_lora_a are empty tensors where not asked for.")
    return backward


def _make_fakes(n: int):
    def fake(*args):
        _, x, weights, _, lora_a, _, _, _, _ = _split(n, args, backward=False)
        return (*(x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights),
                x.new_empty((*x.shape[:-1], lora_a.shape[0])))

    def fake_backward(*args):
        _, x, _, _, lora_a, lora_bs, _, _, (x_grad, lora_a_grad) = _split(n, args, backward=True)
        return (torch.empty_like(x) if x_grad else x.new_empty(0),
                torch.empty_like(lora_a) if lora_a_grad else x.new_empty(0),
                *(torch.empty_like(b) for b in lora_bs))

    return fake, fake_backward


def _autograd(n: int):
    def setup_context(ctx, inputs, output):
        _, x, weights, _, lora_a, lora_bs, _, scalings, _ = _split(n, inputs, backward=False)
        ctx.save_for_backward(x, *weights, lora_a, *lora_bs, output[n])
        ctx.scalings = scalings
        ctx.mark_non_differentiable(output[n])

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        x, weights, lora_a, lora_bs, h = saved[0], saved[1:1 + n], saved[1 + n], saved[2 + n:2 + 2 * n], saved[-1]
        needs = ctx.needs_input_grad  # x, weights, biases, lora_a, lora_bs, scalings
        if any(needs[1:1 + 2 * n]):
            raise RuntimeError(f"lora_linear_group{n}: a base weight or bias requires grad; the op is for frozen "
                               "base layers (liger::lora_linear takes trainable ones)")
        dys = [g if g is not None else torch.zeros((*x.shape[:-1], w.shape[0]), dtype=x.dtype, device=x.device)
               for g, w in zip(grads[:n], weights)]
        grad_op = getattr(torch.ops.liger, f"lora_linear_group{n}_backward")
        dx, da, *dbs = grad_op(*dys, x, *weights, lora_a, *lora_bs, h, *ctx.scalings, needs[0], needs[1 + 2 * n])
        return (dx if needs[0] else None, *(None,) * (2 * n), da if needs[1 + 2 * n] else None, *dbs,
                *(None,) * n)

    return setup_context, backward


def _examples(n: int, backward: bool):
    def forward_args(device, width):
        x = sample(device, 2, 3, width)
        weights = [sample(device, 6 + 2 * i, width, seed=1 + i) for i in range(n)]
        biases = [sample(device, 6 + 2 * i, seed=10 + i) if i == 0 else None for i in range(n)]
        lora_bs = [sample(device, 6 + 2 * i, 2 + i, seed=20 + i) for i in range(n)]
        lora_a = sample(device, sum(b.shape[1] for b in lora_bs), width, seed=30)
        return (x, *weights, *biases, lora_a, *lora_bs, *(0.5 + i for i in range(n)))

    def examples(device, width):
        args = forward_args(device, width)
        if not backward:
            return [args]
        _, x, weights, _, lora_a, lora_bs, _, scalings, _ = _split(n, args, backward=False)
        h = FORWARD[n](*args)[n]
        dys = [sample(device, 2, 3, w.shape[0], seed=40 + i) for i, w in enumerate(weights)]
        return [(*dys, x, *weights, lora_a, *lora_bs, h, *scalings, True, True),
                (*dys, x, *weights, lora_a, *lora_bs, h, *scalings, False, True)]

    return examples


FORWARD = {}  # n -> the forward function (the examples run it)
for _n in (2, 3):
    _fake, _fake_backward = _make_fakes(_n)
    _setup_context, _backward = _autograd(_n)
    _forward, _backward_fn = _make_forward(_n), _make_backward(_n)
    FORWARD[_n] = _forward
    # No Triton kernel: the same torch code on every device (launcher and reference are one function)
    declare(f"lora_linear_group{_n}", _forward, _forward, triton=False, fake=_fake, setup_context=_setup_context,
            backward=_backward, examples=_examples(_n, backward=False))
    declare(f"lora_linear_group{_n}_backward", _backward_fn, _backward_fn, triton=False, fake=_fake_backward,
            examples=_examples(_n, backward=True))
