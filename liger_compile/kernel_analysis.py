"""Inductor's analysis of our Triton kernels' calls, done once per kernel and argument signature.

For every call of a user Triton kernel in a graph, Inductor (in AOTAutograd's functionalization and again when
lowering) asks torch which tensor arguments the kernel reads and writes; torch answers by building the kernel's
Triton IR and walking it, at every call site, several times each. Our ops call the same few kernels once per layer,
so a 16-layer model asks the same question dozens of times, and the answers took more than a quarter of the cold
compile at the Llama-3.2-1B shape (bench/results/compile_llama-1b_4x4096*.md).

The answer depends on the kernel, on which arguments are tensors and of which dtype (the IR's pointer types), and on
the values of the others (constexprs, specialised integers). Only for our kernels, and only when every argument is a
tensor or a plain Python value, the answer is kept under that key; anything else (other kernels, symbolic sizes,
descriptor objects) goes to torch every time. Each caller gets its own copy.
"""
from __future__ import annotations

import copy
import functools

_ANALYSES = ("identify_accessed_tensors", "identify_mutated_tensors")  # torch 2.13 / earlier names
_PLAIN = (bool, int, float, str, type(None))


def _is_ours(kernel) -> bool:
    fn = kernel
    while hasattr(fn, "fn"):  # Autotuner / Heuristics -> JITFunction -> the Python function
        fn = fn.fn
    return getattr(fn, "__module__", "").startswith("liger_compile.")


def _signature(value):
    """What of an argument the analysis depends on, or None where that is not known to be all of it."""
    import torch  # noqa: PLC0415

    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype)
    if hasattr(value, "get_dtype") and hasattr(value, "get_name"):  # an Inductor IR buffer (TensorBox)
        return ("tensor", value.get_dtype())
    if isinstance(value, torch.dtype):
        return ("dtype", value)
    if isinstance(value, _PLAIN):
        return (type(value).__name__, value)
    return None


def key(kernel, kwargs: dict, rest: tuple):
    """The memo key of one analysis, or None where it must go to torch."""
    if not _is_ours(kernel) or any(rest):  # descriptor metadata (TMA) is not ours: not memoized
        return None
    parts = []
    for name in sorted(kwargs):
        sig = _signature(kwargs[name])
        if sig is None:
            return None
        parts.append((name, sig))
    try:
        hash(kernel)
    except TypeError:
        return None
    return kernel, tuple(parts)


def memoized(original):
    memo: dict = {}

    @functools.wraps(original)
    def analysis(kernel, kwargs, *rest, **more):
        k = key(kernel, kwargs, rest) if not more else None
        if k is None:
            return original(kernel, kwargs, *rest, **more)
        if k not in memo:
            memo[k] = original(kernel, kwargs, *rest)
        return copy.deepcopy(memo[k])

    analysis.liger_memo = memo
    return analysis


@functools.cache
def install() -> tuple[str, ...]:
    """Wraps torch's analysis functions (once per process); returns the names wrapped (none on a torch without)."""
    try:
        import torch._higher_order_ops.triton_kernel_wrap as wrap  # noqa: PLC0415
    except ImportError:
        return ()
    done = []
    for name in _ANALYSES:
        original = getattr(wrap, name, None)
        if callable(original) and not hasattr(original, "liger_memo"):
            setattr(wrap, name, memoized(original))
            done.append(name)
    return tuple(done)
