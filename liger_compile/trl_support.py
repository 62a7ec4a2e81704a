"""Under torch.compile, TRL's fused LM head runs on ``liger::token_logprobs``, inside the model's graph.

TRL's trainers (SFT, DPO, KTO, GRPO, RLOO) score tokens with ``trl.trainer.utils.add_fused_lm_head``: the model's
forward ends in ``ChunkedLogProbFunction``, an autograd.Function that writes matmuls into preallocated ``out=``
tiles. Dynamo cannot trace that ("non-contiguous `out=` tensor"), so the compiled graph stops at the last hidden
state and the head runs eagerly after a graph break; on GPUs the head first gathers the labelled rows
(``hidden[mask]``, a shape that depends on the data), a second reason to break.

While Dynamo traces, and only then, the two module globals of ``trl.trainer.utils`` that the head reads at call
time answer differently:
- ``_ChunkedLogProbFunction.apply`` calls our op (same arguments, same outputs, ``None`` where TRL returns none);
- ``_use_triton`` says False, so the head takes its every-position path (labels clamped to 0 and the outputs
  masked afterwards), whose shapes do not depend on the data.
Run eagerly, both are TRL's own, unchanged. Under DeepSpeed ZeRO-3 the head stays TRL's (its backward gathers the
sharded head weight again, which our op does not).

Installed when ``liger_compile`` is imported (or, if TRL is imported later, when ``trl.trainer.utils`` is), only
where TRL's function has the signature this was written for; tested with TRL 1.16.0. Anything else leaves TRL
as it is, with a debug line saying why. ``LIGER_COMPILE_TRL_HEAD=0`` leaves it alone too.
"""
from __future__ import annotations

import importlib.abc
import inspect
import logging
import os
import sys

import torch

log = logging.getLogger("liger_compile")

MODULE = "trl.trainer.utils"
# ChunkedLogProbFunction.forward's parameters after ctx, as TRL 1.16 declares them
SIGNATURE = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
             "logit_scale", "outputs")
OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # after log_probs, in TRL's order
IGNORE_INDEX = -100  # TRL's label for "not scored"


def _zero3() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled  # noqa: PLC0415
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


class _CompiledHead:
    """Stands in for TRL's ChunkedLogProbFunction: ``apply`` is our op while Dynamo traces, TRL's otherwise."""

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        if not torch.compiler.is_compiling() or _zero3():
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        import liger_compile.kernels.token_logprobs  # noqa: F401, PLC0415 - declares the op

        device = hidden.device.type
        # TRL multiplies in autocast's dtype when autocast is on; the op takes one dtype for all three
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            values = torch.ops.liger.token_logprobs(
                hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), targets, IGNORE_INDEX,
                float(temperature), float(final_logit_softcapping or 0.0), float(logit_scale))
        log_probs, *rest = values[:5]
        return (log_probs, *(value if name in outputs else None for name, value in zip(OPTIONAL_OUTPUTS, rest)))

    def __getattr__(self, name):  # anything else (forward, backward, ...) is TRL's
        return getattr(self.original, name)


def _patch(module) -> bool:
    if os.environ.get("LIGER_COMPILE_TRL_HEAD", "1") == "0":
        log.debug("liger_compile: LIGER_COMPILE_TRL_HEAD=0, TRL's fused LM head left as it is")
        return False
    head, use_triton = getattr(module, "_ChunkedLogProbFunction", None), getattr(module, "_use_triton", None)
    if isinstance(head, _CompiledHead):
        return True
    try:
        params = tuple(inspect.signature(head.forward).parameters)[1:]
    except (TypeError, ValueError, AttributeError):
        params = None
    if params != SIGNATURE or not callable(use_triton):
        log.debug("liger_compile: this TRL's fused LM head is not the one liger_compile knows (%s); left as it is",
                  params)
        return False

    def _use_triton(device):
        return False if torch.compiler.is_compiling() else use_triton(device)

    module._ChunkedLogProbFunction = _CompiledHead(head)
    module._use_triton = _use_triton
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches MODULE right after it is first imported (TRL imported after liger_compile)."""

    def find_spec(self, name, path, target=None):
        if name != MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    _patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def install() -> None:
    """Patches TRL's head now if TRL is imported, else when it is."""
    if MODULE in sys.modules:
        _patch(sys.modules[MODULE])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
