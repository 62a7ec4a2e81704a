"""Declares a ``liger::`` op from its Triton launcher and its plain-torch twin, and keeps the registry of them.

    rms_norm = declare("rms_norm", launch_forward, reference_forward,
                       setup_context=_setup_context, backward=_backward, examples=_forward_examples)

The op's schema is the reference's annotated signature (its default values included), so the reference is the op's
specification: name, arguments, outputs and, in plain torch, the math. The op runs the launcher on CUDA tensors and
the reference on every other device (``use_triton`` of its first tensor argument). It is a ``torch.library``
``triton_op`` (Inductor traces into it and sees the Triton kernels), or with ``triton=False`` a ``custom_op``, opaque
to torch.compile, which then needs ``fake``.

``REGISTRY`` maps each declared op's name to an ``Op``; ``all_ops()`` imports every module of the package first, so
tests and benchmarks that iterate it see every op, a new one included.
"""
import dataclasses
import importlib
import inspect
import pkgutil
import sys
from typing import Any, Callable, Optional

import torch
from torch.library import custom_op, triton_op

from ._common import use_triton


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # "liger::rms_norm"
    op: Any  # what torch.library returned (a CustomOpDef); torch.ops.liger.<name> is the same op
    launcher: Callable  # the Triton path; callable directly on CPU tensors under TRITON_INTERPRET=1
    reference: Callable  # the plain-torch path, whose signature is the op's schema
    module: str  # the declaring module
    triton: bool  # a triton_op (Inductor sees its kernels), else an opaque custom_op
    differentiable: bool  # has an autograd formula (the *_backward ops have none: they run inside one)
    # (device, width) -> argument tuples for the launcher, each a call small enough for Triton's interpreter that
    # launches at least one kernel; width is a row width where the op has one (it picks narrow or wide tiles)
    examples: Optional[Callable[[str, int], list]]


REGISTRY: dict[str, Op] = {}


def declare(name: str, launcher: Callable, reference: Callable, *, triton: bool = True,
            fake: Optional[Callable] = None, setup_context: Optional[Callable] = None,
            backward: Optional[Callable] = None, examples: Optional[Callable] = None):
    """Defines ``torch.ops.liger.<name>`` and records it in REGISTRY; returns the op (torch.library's CustomOpDef).

    ``setup_context`` and ``backward`` are ``register_autograd``'s; ``fake`` is required with ``triton=False`` (a
    triton_op's own function, run on fake tensors, serves as its fake)."""
    qualname = f"liger::{name}"
    if qualname in REGISTRY:
        raise ValueError(f"{qualname} is declared twice ({REGISTRY[qualname].module} and {reference.__module__})")
    if not triton and fake is None:
        raise ValueError(f"{qualname}: a custom_op needs a fake implementation for torch.compile")

    def dispatch(*args, **kwargs):
        device_of = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        if use_triton(device_of):
            return launcher(*args, **kwargs)
        return reference(*args, **kwargs)

    dispatch.__signature__ = inspect.signature(reference)  # what torch.library infers the schema from
    dispatch.__name__ = dispatch.__qualname__ = name
    dispatch.__module__ = reference.__module__
    dispatch.__doc__ = reference.__doc__
    if triton:
        op = triton_op(qualname, dispatch, mutates_args=())
    else:
        op = custom_op(qualname, dispatch, mutates_args=())
        op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    REGISTRY[qualname] = Op(qualname, op, launcher, reference, reference.__module__, triton, backward is not None,
                            examples)
    return op


def all_ops() -> dict[str, Op]:
    """REGISTRY, once every module of this package is imported (each declares its ops when imported)."""
    package = sys.modules[__package__]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
    return REGISTRY


def sample(device: str, *shape: int, seed: int = 0) -> torch.Tensor:
    """fp32 normal values of this shape on device, the same on every device (drawn on the CPU): for examples."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
