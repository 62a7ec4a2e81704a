"""liger_compile/kernel_analysis.py: torch's analysis of a Triton kernel's call is asked once per kernel and
argument signature for our kernels, every time for anything else, and each caller gets its own copy."""
import torch
import torch._higher_order_ops.triton_kernel_wrap as wrap

import liger_compile  # noqa: F401  (the backend installs the memo when it first compiles)
from liger_compile import kernel_analysis
from liger_compile.kernels import rms_norm  # noqa: F401  (one of our kernel modules)


def our_kernel():
    import sys

    return sys.modules["liger_compile.kernels.rms_norm"]._rms_norm_fwd_kernel  # a JITFunction (interpreted on CPU)


class ForeignKernel:
    def __init__(self):
        def fn():
            pass
        fn.__module__ = "somebody_else"
        self.fn = fn


def test_our_kernels_are_analysed_once_per_signature_and_others_every_time():
    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return {"written": [n for n, v in kwargs.items() if isinstance(v, torch.Tensor)]}

    memo = kernel_analysis.memoized(analysis)
    ours, x = our_kernel(), torch.empty(4)
    first = memo(ours, {"x": x, "n": 4, "flag": True}, {})
    again = memo(ours, {"flag": True, "n": 4, "x": torch.empty(8)}, {})  # other shape, same signature
    assert first == again == {"written": ["x"]} and first is not again and len(calls) == 1
    memo(ours, {"x": x.half(), "n": 4, "flag": True}, {})  # another dtype
    memo(ours, {"x": x, "n": 5, "flag": True}, {})  # another value
    memo(ours, {"x": x, "n": True, "flag": True}, {})  # True is not 1 to the IR
    assert len(calls) == 4
    memo(ours, {"x": x, "n": object()}, {})  # an unknown kind of value: every time
    memo(ours, {"x": x, "n": 4, "flag": True}, {"x": ("stable", ([4],))})  # descriptor metadata: every time
    foreign = ForeignKernel()
    memo(foreign, {"x": x}, {})
    memo(foreign, {"x": x}, {})
    assert len(calls) == 8 and calls[-2:] == [foreign, foreign]


def test_the_backend_installs_it_on_torchs_analysis():
    torch.compile(torch.nn.Linear(4, 4), backend="liger")(torch.randn(2, 4))
    names = kernel_analysis.install()
    wrapped = [n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(wrap, n)]
    assert wrapped and all(hasattr(getattr(wrap, n), "liger_memo") for n in wrapped)
    assert set(names) <= set(wrapped)
