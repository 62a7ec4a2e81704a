"""Every launch passes every kernel parameter by name or position, constexprs included.

Triton fills in a parameter's default when a kernel is called directly, but Inductor's wrapper for user kernels
(torch.library.wrap_triton under torch.compile on CUDA) checks the arguments against the kernel's parameters and
rejects a call that leaves one to its default; the rewrite then falls back to plain Inductor for the whole graph.
This test catches that on CPU, where the kernels run in Triton's interpreter and the wrapper never checks.
"""
import pytest
import torch
from triton.runtime.autotuner import Autotuner

from liger_compile.kernels import gated_mlp, linear_cross_entropy, rms_norm, rotary
from liger_compile.kernels import add_rms_norm

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def checked_launches(monkeypatch):
    launched = []
    for module in (gated_mlp, linear_cross_entropy, rms_norm, rotary):
        real = getattr(module, "direct_launch", None) or module.wrap_triton

        def checking(kernel, real=real):
            fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
            from_configs = set().union(*(c.kwargs for c in kernel.configs)) if isinstance(kernel, Autotuner) else set()

            class Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        given = set(fn.arg_names[: len(args)]) | set(kwargs) | from_configs
                        missing = [name for name in fn.arg_names if name not in given]
                        assert not missing, f"{fn.__name__} launched without {missing}"
                        launched.append(fn.__name__)
                        return real(kernel)[grid](*args, **kwargs)
                    return launch
            return Grid()

        monkeypatch.setattr(module, "direct_launch" if hasattr(module, "direct_launch") else "wrap_triton", checking)
    return launched


@pytest.mark.parametrize("cols", [64, 1000])  # narrow and wide tiles
def test_every_launch_passes_every_parameter(checked_launches, cols):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(17, cols, generator=g).to(DEV)
    r, w = torch.randn_like(x), torch.randn(cols).to(DEV)
    _, rstd = rms_norm.launch_forward(x, w, 1e-6, 0.0, True)
    rms_norm.launch_backward(torch.randn_like(x), x, w, rstd, 0.0, True)
    _, _, s = add_rms_norm.launch_forward(x, r, w, 1e-6, 0.0, True)
    add_rms_norm.launch_backward(torch.randn_like(x), torch.randn_like(x), s, w, rstd, 0.0, True)
    q, k = torch.randn(2, 4, 5, 8).to(DEV), torch.randn(2, 2, 5, 8).to(DEV)
    cos, sin = torch.randn(1, 5, 8).to(DEV), torch.randn(1, 5, 8).to(DEV)
    rotary.launch(q, k, cos, sin, 1)
    rotary.launch(q, k, cos, sin, 1, backward=True)
    gate, up = torch.randn(6, cols).to(DEV), torch.randn(6, cols).to(DEV)
    gated_mlp.launch_forward(gate, up, "silu")
    gated_mlp.launch_backward(torch.randn_like(gate), gate, up, "silu", recompute_y=True)
    logits = torch.randn(3, cols).to(DEV)
    linear_cross_entropy.launch_chunk_kernel(logits, torch.tensor([1, -100, 2]).to(DEV), torch.empty(3).to(DEV),
                                             torch.ones(1).to(DEV), -100, 0.0, 0.0)
    hb, wb = torch.randn(5, 16).bfloat16().to(DEV), torch.randn(cols, 16).bfloat16().to(DEV)
    linear_cross_entropy.launch_forward(hb, wb, None, torch.tensor([1, -100, 2, 0, 3]).to(DEV), None, -100, 0.0, 0.0,
                                        "mean", True, path="exp_matmul")
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rotary_kernel", "_lce_chunk_kernel",
            "exp_matmul_kernel", "row_combine_kernel", "row_scaled_matmul_kernel", "label_logit_kernel"} <= set(checked_launches)
