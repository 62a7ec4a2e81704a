"""Fused Triton ops, one module per op, installed as ``liger_compile.kernels``.

Each module defines its ``torch.library`` op(s) in the ``liger`` namespace at import time: a Triton
path for CUDA tensors, a plain-torch path for every other device, a fake implementation and an
autograd formula. Importing this package imports every op module found in it.
"""
import importlib
import pkgutil


def load_all() -> list[str]:
    """Import every op module in this package (idempotent); returns their names."""
    names = []
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
            names.append(info.name)
    return names
