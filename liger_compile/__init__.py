"""liger-compile: a torch.compile backend that fuses RMSNorm, rotary, gated MLP and lm_head+cross-entropy.

    model = torch.compile(model, backend="liger")       # no import needed once installed
    report = liger_compile.explain(model, **batch)       # what was fused, and why not
"""
from __future__ import annotations

import functools
import os

import torch

# Installed, `patterns/` and `kernels/` live inside this package. In a source checkout (running from the repo
# root, or with the repo on PYTHONPATH) they sit beside it: let the package find them there too.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(__file__), "kernels")) and os.path.isfile(
    os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)  # noqa: F821 - a package's __path__

from .backend import liger_backend
from .report import Report

__version__ = "0.1.0"
BACKEND_NAME = "liger"


def _register_backend_name() -> None:
    """Makes backend="liger" work in this process even without the installed entry point.

    When the entry point is installed, torch registers the name itself the first time it is looked up, and
    asserts on a duplicate; so we only register when no entry point will.
    """
    from torch._dynamo.backends import registry  # noqa: PLC0415

    if BACKEND_NAME in registry._COMPILER_FNS:
        return
    from importlib.metadata import entry_points  # noqa: PLC0415

    if any(ep.name == BACKEND_NAME for ep in entry_points(group="torch_dynamo_backends")):
        return
    registry.register_backend(compiler_fn=liger_backend, name=BACKEND_NAME)


_register_backend_name()

from .accelerate_support import register_with_accelerate  # noqa: E402

# `TrainingArguments(torch_compile_backend="liger")` goes through accelerate, whose backend enum must know the name.
register_with_accelerate()

from .trl_support import install as _install_trl_head  # noqa: E402

# Under torch.compile, TRL's fused LM head (SFT, DPO, KTO, GRPO, RLOO) runs on our op inside the model's graph.
_install_trl_head()


def explain(model, *args, **kwargs) -> Report:
    """Runs Dynamo and our rewrite on `model(*args, **kwargs)` (the rewritten graphs run eagerly, no Inductor)
    and returns the report: `report.counts` per pattern summed over graphs, `print(report)` for the tables."""
    report = Report()
    backend = functools.partial(liger_backend, options={"report": report, "inductor": False})
    torch.compile(model, backend=backend)(*args, **kwargs)
    return report


__all__ = ["liger_backend", "explain", "Report", "BACKEND_NAME", "__version__"]
