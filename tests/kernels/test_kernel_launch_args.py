"""Every launch passes every kernel parameter by name or position, constexprs included.

Triton fills in a parameter's default when a kernel is called directly, but Inductor's wrapper for user kernels
(torch.library.wrap_triton under torch.compile on CUDA) checks the arguments against the kernel's parameters and
rejects a call that leaves one to its default; the rewrite then falls back to plain Inductor for the whole graph.
This test catches that on CPU, where the kernels run in Triton's interpreter and the wrapper never checks.

It runs every op in the kernels' registry (liger_compile.kernels._op.all_ops) on the examples its declaration gives,
through its Triton launcher, with the launch points (wrap_triton, direct_launch) of every kernel module swapped for
a checking one; and every module-level Triton function named *_kernel must be launched by some op's examples.
"""
import sys

import pytest
import triton
from triton.runtime.autotuner import Autotuner

from liger_compile.kernels._op import all_ops
from models import DEVICE

OPS = all_ops()
LAUNCH_POINTS = ("wrap_triton", "direct_launch")


def _kernel_modules():
    return [m for name, m in sorted(sys.modules.items()) if name.startswith("liger_compile.kernels.") and m is not None]


@pytest.fixture
def checked_launches(monkeypatch):
    launched = []
    for module in _kernel_modules():
        for point in LAUNCH_POINTS:
            if not hasattr(module, point):
                continue

            def checking(kernel, real=getattr(module, point)):
                fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
                from_configs = set().union(*(c.kwargs for c in kernel.configs)) if isinstance(kernel, Autotuner) \
                    else set()

                class Grid:
                    def __getitem__(self, grid):
                        def launch(*args, **kwargs):
                            given = set(fn.arg_names[: len(args)]) | set(kwargs) | from_configs
                            missing = [name for name in fn.arg_names if name not in given]
                            assert not missing, f"{fn.__name__} launched without {missing}"
                            launched.append(fn.__name__)
                            return real(kernel)[grid](*args, **kwargs)
                        return launch
                return Grid()

            monkeypatch.setattr(module, point, checking)
    return launched


def test_every_op_gives_examples():
    assert OPS, "no op registered"
    assert not [name for name, op in OPS.items() if op.examples is None]


@pytest.mark.parametrize("cols", [64, 1000])  # narrow and wide tiles
def test_every_launch_passes_every_parameter(checked_launches, cols):
    silent = []
    for name, op in OPS.items():
        if op.launcher is op.reference:  # plain torch on every device (cuBLAS calls only): nothing to launch
            continue
        for args in op.examples(DEVICE, cols):
            before = len(checked_launches)
            op.launcher(*args)
            if len(checked_launches) == before:
                silent.append(name)
    assert not silent, f"examples that launched no kernel: {silent}"
    kernels = {name for m in _kernel_modules() for name, obj in vars(m).items()
               if name.endswith("_kernel") and isinstance(obj, triton.runtime.KernelInterface)}
    assert kernels, "no Triton kernel found in liger_compile.kernels"
    assert kernels <= set(checked_launches), f"never launched: {sorted(kernels - set(checked_launches))}"
