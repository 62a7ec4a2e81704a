"""Small helpers shared by the op modules (and the dtypes the patterns let through to them)."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what every op's kernels are written for


def use_triton(t: torch.Tensor) -> bool:
    """Our Triton kernels are written for CUDA tensors; every other device takes the torch path."""
    return t.device.type == "cuda"


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [N, C] with unit column stride, copying only when it must: a view when the leading dims merge
    (halves of a fused projection do), and a width-1 row needs no unit stride."""
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()
