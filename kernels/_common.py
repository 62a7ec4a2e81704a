"""Small helpers shared by the op modules."""
import torch


def use_triton(t: torch.Tensor) -> bool:
    """Our Triton kernels are written for CUDA tensors; every other device takes the torch path."""
    return t.device.type == "cuda"
