"""What the kernel cases share: dtype, device, and the two helpers every case calls."""
import torch

DT = torch.bfloat16
DEV = "cuda"


def liger_installed() -> bool:
    """Whether Liger-Kernel is importable (its variant is timed only then)."""
    try:
        import liger_kernel  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def show_fusions(fn, *inputs):
    """Prints what backend="liger" fuses in fn (so a table row for ours_backend is known to be ours)."""
    import liger_compile  # noqa: PLC0415

    print(liger_compile.explain(fn, *inputs), flush=True)
