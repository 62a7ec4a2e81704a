"""Small helpers shared by the op modules."""
import torch


def use_triton(t: torch.Tensor) -> bool:
    """Our Triton kernels are written for CUDA tensors; every other device takes the torch path."""
    return t.device.type == "cuda"


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # CPU runs (the Triton interpreter): a few programs keep the grid logic exercised
    return torch.cuda.get_device_properties(device).multi_processor_count
