"""Declares a ``liger::`` op from its Triton launcher and its plain-torch twin, and keeps the registry of them.

    rms_norm = declare("rms_norm", launch_forward, reference_forward,
                       setup_context=_setup_context, backward=_backward, examples=_forward_examples)

The op's schema is the reference's annotated signature (its default values included), so the reference is the op's
specification: name, arguments, outputs and, in plain torch, the math. The op runs the launcher on CUDA tensors and
the reference on every other device (``use_triton`` of its first tensor argument). It is a ``torch.library``
``triton_op`` (Inductor traces into it and sees the Triton kernels), or with ``triton=False`` an op opaque to
torch.compile, which then needs ``fake``. Inductor calls an opaque op at every step, so it is declared with
torch.library's low-level API (``Library.define``/``impl``) and an autograd kernel of its own: a call reaches the
launcher through the C++ dispatcher alone, where a ``custom_op`` adds several Python layers to each call (its
autograd wrapper's redispatch, the backend wrapper's aliasing checks and Dynamo guard), which are the host time of a
step that calls the op once per projection (LoRA).

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
from torch import _C
from torch.library import Library, infer_schema, register_fake, triton_op

from ._common import use_triton


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # "liger::rms_norm"
    op: Any  # triton_op's CustomOpDef, or an opaque op's OpOverload; torch.ops.liger.<name> is the same op
    launcher: Callable  # the Triton path; callable directly on CPU tensors under TRITON_INTERPRET=1
    reference: Callable  # the plain-torch path, whose signature is the op's schema
    module: str  # the declaring module
    triton: bool  # a triton_op (Inductor sees its kernels), else an opaque op (low-level torch.library)
    differentiable: bool  # has an autograd formula (the *_backward ops have none: they run inside one)
    # (device, width) -> argument tuples for the launcher, each a call small enough for Triton's interpreter that
    # launches at least one kernel; width is a row width where the op has one (it picks narrow or wide tiles)
    examples: Optional[Callable[[str, int], list]]


REGISTRY: dict[str, Op] = {}
_LIBRARY = Library("liger", "FRAGMENT")  # the opaque ops' definitions (triton_op keeps its own)


def declare(name: str, launcher: Callable, reference: Callable, *, triton: bool = True,
            fake: Optional[Callable] = None, setup_context: Optional[Callable] = None,
            backward: Optional[Callable] = None, examples: Optional[Callable] = None):
    """Defines ``torch.ops.liger.<name>`` and records it in REGISTRY; returns the op (a CustomOpDef for a triton_op,
    the OpOverload ``torch.ops.liger.<name>.default`` for an opaque one).

    ``setup_context`` and ``backward`` are ``register_autograd``'s; ``fake`` is required with ``triton=False`` (a
    triton_op's own function, run on fake tensors, serves as its fake)."""
    qualname = f"liger::{name}"
    if qualname in REGISTRY:
        raise ValueError(f"{qualname} is declared twice ({REGISTRY[qualname].module} and {reference.__module__})")
    if not triton and fake is None:
        raise ValueError(f"{qualname}: an opaque op needs a fake implementation for torch.compile")

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
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
    else:
        op = _declare_opaque(name, dispatch, launcher, reference, fake, setup_context, backward)
    REGISTRY[qualname] = Op(qualname, op, launcher, reference, reference.__module__, triton, backward is not None,
                            examples)
    return op


def _declare_opaque(name, dispatch, launcher, reference, fake, setup_context, backward):
    # the dispatcher calls the launcher (CUDA) and the reference (every other device) with the schema's arguments
    # and leaves out trailing ones equal to their defaults: both must take them, with the same defaults
    expected = [(p.name, p.default) for p in inspect.signature(reference).parameters.values()]
    if [(p.name, p.default) for p in inspect.signature(launcher).parameters.values()][:len(expected)] != expected:
        raise ValueError(f"liger::{name}: the launcher's leading arguments differ from the reference's")
    _LIBRARY.define(name + infer_schema(dispatch, mutates_args=()))
    op = getattr(torch.ops.liger, name).default
    _LIBRARY.impl(name, launcher, "CUDA")
    _LIBRARY.impl(name, reference, "CompositeExplicitAutograd")
    register_fake(op, fake, lib=_LIBRARY)
    if backward is not None:
        _LIBRARY.impl(name, _autograd_kernel(op, inspect.signature(reference), setup_context, backward), "Autograd")
    # no autograd formula (the *_backward ops, called inside one): the dispatcher's own fallback, in C++
    return op


def _autograd_kernel(op, signature: inspect.Signature, setup_context: Callable, backward: Callable) -> Callable:
    """The op's Autograd-key kernel: through an autograd.Function when a gradient is to be recorded, else straight
    below autograd (what Inductor's compiled code does at every step: it runs with gradients off)."""
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()):
        raise ValueError(f"{op}: an opaque op takes positional-or-keyword arguments only")

    def forward(ctx, *args):
        with _C._AutoDispatchBelowAutograd():
            output = op(*args)
        setup_context(ctx, args, output)
        return output

    function = type(f"{op._opname}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def kernel(*args):
        if _C.is_grad_enabled() and _C._any_requires_grad(*args):
            bound = signature.bind(*args)  # the dispatcher drops trailing arguments equal to their defaults;
            bound.apply_defaults()  # setup_context and backward see every one, as register_autograd's do
            return function.apply(*bound.arguments.values())
        with _C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel


def all_ops() -> dict[str, Op]:
    """REGISTRY, once every module of this package is imported (each declares its ops when imported)."""
    package = sys.modules[__package__]
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
    return REGISTRY


def sample(device: str, *shape: int, seed: int = 0) -> torch.Tensor:
    """fp32 normal values of this shape on device, the same on every device (drawn on the CPU): for examples."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)
