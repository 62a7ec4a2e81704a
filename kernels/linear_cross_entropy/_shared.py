"""What both paths of lm_head + cross-entropy use: how kernels are launched, the dW accumulation, the SM count."""
import functools

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# grad_weight is accumulated over the chunks with addmm_(beta=1) into a tensor of this dtype (keyed by the weight's
# dtype; a dtype not listed accumulates in itself). fp32 weights accumulate in fp32. bf16/fp16 weights accumulate in
# their own dtype: cuBLAS computes each chunk's product in fp32 and rounds once when adding it to the accumulator, so
# the cost is one rounding per chunk (16 chunks for N=16384 on Llama-3) against the single rounding of eager's one
# big matmul, and the saving is V*H*2 bytes (1 GiB for Llama-3 8B's lm_head) plus a cast at the end. Mapping bf16 to
# torch.float32 here gives the fp32 accumulator at the price of fp32 matmuls for dW.
GRAD_WEIGHT_ACC_DTYPE = {torch.float32: torch.float32, torch.bfloat16: torch.bfloat16, torch.float16: torch.float16}


def accumulate_grad_weight(grad_w, a, b, first):
    """grad_w += a @ b (cast to grad_w's dtype); the first chunk writes its product instead, which spares a fill
    of the whole [V, H] accumulator with zeros and one read of it (what that saves: bench/results/lce_notes.md)."""
    if a.dtype != grad_w.dtype:
        a, b = a.to(grad_w.dtype), b.to(grad_w.dtype)
    if first:
        torch.mm(a, b, out=grad_w)
    else:
        grad_w.addmm_(a, b)


def direct_launch(kernel):
    """The kernel itself, to be launched as kernel[grid](...). This op is opaque to torch.compile, so its
    launches are never traced and need no torch.library.wrap_triton; and wrap_triton called outside tracing still
    files every call's non-tensor arguments in torch's kernel side table, for the life of the process: TMA
    descriptors among them would keep the tensors they point at (a chunk buffer, the hidden states) alive, step
    after step. (tests/kernels/test_kernel_launch_args.py swaps this function, in every module that launches through it,
    to check the launches' arguments.)"""
    return kernel


@functools.lru_cache(None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def is_eager(t: torch.Tensor) -> bool:
    """True for a real tensor outside any tracing (compile, fake, functional or proxy modes): safe to read values."""
    return not torch.compiler.is_compiling() and type(t) is torch.Tensor and _get_current_dispatch_mode() is None
