"""No output of our ops is a view.

Autograd forbids modifying a custom op's view output in place ("... is a view and is being modified inplace"),
where the eager module's output may be modified freely (Llama4 adds its routed experts into the shared expert's
down_proj output with `add_`). Checked on both of each op's paths: the plain-torch one (what the op runs off CUDA)
and the Triton launch (run here in the interpreter, on the GPU for real), plus an in-place add through autograd.
"""
import pytest
import torch

from liger_compile.kernels import (add_rms_norm, gated_down_proj, gated_mlp, lora_linear, rms_norm, rotary,  # noqa: F401
                                   varlen_attention)
from models import DEVICE


def _t(*shape, grad=True):
    g = torch.Generator().manual_seed(sum(shape))
    return torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)


# name -> (op, sample inputs, Triton launch of the forward, the output a model is handed to modify: add_rms_norm's
# sum is saved for backward, as eager's norm saves its input, so modifying it fails the version check in both; so is
# varlen_attention's output, as SDPA's own is: None)
CASES = {
    "rms_norm": (torch.ops.liger.rms_norm, lambda: (_t(2, 3, 16), _t(16), 1e-6, 0.0, True),
                 rms_norm.launch_forward, 0),
    "add_rms_norm": (torch.ops.liger.add_rms_norm, lambda: (_t(2, 3, 16), _t(2, 3, 16), _t(16), 1e-6, 0.0, True),
                     add_rms_norm.launch_forward, 1),
    "rotary": (torch.ops.liger.rotary, lambda: (_t(2, 4, 3, 8), _t(2, 2, 3, 8), _t(1, 3, 8, grad=False),
                                                _t(1, 3, 8, grad=False), 1), rotary.launch, 0),
    "gated_mlp": (torch.ops.liger.gated_mlp, lambda: (_t(2, 3, 16), _t(2, 3, 16), "silu"), gated_mlp.launch_forward, 0),
    "gated_down_proj": (torch.ops.liger.gated_down_proj, lambda: (_t(2, 3, 16), _t(2, 3, 16), _t(8, 16), "silu"),
                        None, 0),
    # an opaque op (kernels/_op.py declares its autograd itself): a frozen base weight, a trainable adapter
    "lora_linear": (torch.ops.liger.lora_linear, lambda: (_t(2, 3, 16), _t(8, 16, grad=False), None, _t(4, 16),
                                                          _t(8, 4), 0.5), None, 0),
    "varlen_attention": (torch.ops.liger.varlen_attention, lambda: (
        _t(2, 4, 4, 8), _t(2, 4, 2, 8), _t(2, 4, 2, 8),
        (torch.ones(4, 4, dtype=torch.bool).tril() & torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)[
            :, None, :]).to(DEVICE)[:, None], None), None, None),
}


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_are_not_views_and_take_in_place_updates(name):
    op, inputs, launch, modified = CASES[name]
    args = inputs()
    outs = _tensors(op(*args))
    assert all(t._base is None for t in outs), [t._base is not None for t in outs]
    if modified is not None:
        y = outs[modified]
        y.add_(1.0)  # what a model may do with the output; autograd must accept it
        y.sum().backward()
        assert all(a.grad is not None for a in args if isinstance(a, torch.Tensor) and a.requires_grad)
    if launch is not None:
        with torch.no_grad():
            launched = _tensors(launch(*inputs()))
        assert all(t._base is None for t in launched), [t._base is not None for t in launched]
