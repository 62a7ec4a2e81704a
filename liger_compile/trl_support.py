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

GKD (``trl.experimental.gkd``) computes its loss from both models' [B, T, V] logits outside any graph; with
``torch_compile_backend="liger"`` its compute_loss takes the two last hidden states instead and calls
``liger::linear_jsd`` (``_patch_gkd``).

Installed when ``liger_compile`` is imported (or, if TRL is imported later, when each module is), only where
TRL's functions have the signatures this was written for; tested with TRL 1.16.0. Anything else leaves TRL as it
is, with a debug line saying why. ``LIGER_COMPILE_TRL_HEAD=0`` leaves both alone.
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
        grad = torch.is_grad_enabled()
        with torch.autocast(device, enabled=False):
            values = torch.ops.liger.token_logprobs(
                hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype), targets, IGNORE_INDEX,
                float(temperature), float(final_logit_softcapping or 0.0), float(logit_scale),
                grad and hidden.requires_grad, grad and weight.requires_grad)
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


GKD_MODULE = "trl.experimental.gkd.gkd_trainer"


def _plain_head(model) -> bool:
    """The model's logits are hidden @ lm_head.weight^T, nothing after (no bias, scale or soft-cap), and its forward
    can skip them (logits_to_keep)."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings()
    return (head is not None and getattr(head, "bias", None) is None and callable(getattr(model, "get_decoder", None))
            and "logits_to_keep" in inspect.signature(model.forward).parameters
            and not any(getattr(config, name, None) not in (None, 1.0) for name in
                        ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                         "lm_head_multiplier")))


def _patch_gkd(module) -> bool:
    """GKDTrainer.compute_loss, when the trainer compiles with torch_compile_backend="liger": the student's and the
    teacher's last hidden states (logits_to_keep=empty: no logits) into liger::linear_jsd, instead of both [B, T, V]
    logits into TRL's generalized_jsd_loss. The same loss (beta, TRL's default temperature of 1, the -100 mask,
    num_items_in_batch or the count of labelled tokens), the student's gradients in chunks. Anything else (another
    backend, return_outputs, a model whose logits are not a plain lm_head) is TRL's own compute_loss."""
    if os.environ.get("LIGER_COMPILE_TRL_HEAD", "1") == "0":
        return False
    trainer = getattr(module, "GKDTrainer", None)
    original = getattr(trainer, "compute_loss", None)
    if original is None or getattr(original, "liger_compile", False):
        return original is not None
    try:
        params = tuple(inspect.signature(original).parameters)
    except (TypeError, ValueError):
        params = None
    if params != ("self", "model", "inputs", "return_outputs", "num_items_in_batch"):
        log.debug("liger_compile: this TRL's GKDTrainer.compute_loss is not the one liger_compile knows (%s)", params)
        return False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrap = self.accelerator.unwrap_model
        student, teacher = unwrap(model), unwrap(self.teacher_model)
        student = getattr(student, "_orig_mod", student)
        teacher = getattr(teacher, "_orig_mod", teacher)
        if (return_outputs or getattr(self.args, "torch_compile_backend", None) != "liger"
                or not (_plain_head(student) and _plain_head(teacher))):
            return original(self, model, inputs, return_outputs, num_items_in_batch)
        try:
            return _fused_gkd_loss(self, model, student, teacher, inputs, num_items_in_batch)
        except Exception as e:  # a bug of ours must not stop the user's run: TRL's own loss, said once per trainer
            if not getattr(self, "_liger_compile_warned", False):
                log.warning("liger_compile: GKD's fused loss failed (%s: %s); using TRL's own compute_loss",
                            type(e).__name__, str(e)[:300])
                self._liger_compile_warned = True
            return original(self, model, inputs, return_outputs, num_items_in_batch)

    compute_loss.liger_compile = True
    compute_loss.__wrapped__ = original
    trainer.compute_loss = compute_loss
    return True


def _last_hidden_state(call, model, kwargs) -> torch.Tensor:
    """The last hidden state of `model` (called through `call`: the trainer's wrapped or compiled model), caught by a
    forward hook on its decoder. output_hidden_states=True would give it too, but transformers collects those through
    hooks it installs per call, which graph-break and recompile under torch.compile."""
    decoder = model.get_decoder()
    store = getattr(decoder, "_liger_compile_last_hidden", None)
    if store is None:  # registered once and kept: adding or removing hooks per call would recompile the graph
        store = decoder._liger_compile_last_hidden = {}

        def keep(module, args, output):
            store["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

        decoder.register_forward_hook(keep)
    call(**kwargs)
    return store.pop("hidden")


def _fused_gkd_loss(self, model, student, teacher, inputs, num_items_in_batch):
    """GKD's loss on liger::linear_jsd: both models' last hidden states (no logits), each lm_head's weight."""
    import liger_compile.ops as ops  # noqa: PLC0415

    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  logits_to_keep=torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device))
    student_hidden = _last_hidden_state(model, student, kwargs)[:, :-1]
    self.teacher_model.eval()
    with torch.no_grad():
        teacher_hidden = _last_hidden_state(self.teacher_model, teacher, kwargs)[:, :-1]
    device = student_hidden.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    hidden, weights = [], []
    for h, m in ((student_hidden, student), (teacher_hidden, teacher)):
        w = m.get_output_embeddings().weight
        # each lm_head matmul in the dtype eager's runs in: autocast's, else the weight's
        dtype = autocast or w.dtype
        hidden.append(h.to(dtype))
        weights.append(w.to(dtype))
    return ops.linear_jsd(hidden[0], weights[0], hidden[1], weights[1], inputs["labels"][:, 1:], beta=self.beta,
                          num_items_in_batch=num_items_in_batch)


PATCHES = {MODULE: _patch, GKD_MODULE: _patch_gkd}  # module -> what is changed in it when it is imported


class _AfterImport(importlib.abc.MetaPathFinder):
    """Patches a module of PATCHES right after it is first imported (TRL imported after liger_compile)."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run, patch=PATCHES[name]):
                    run(module)
                    patch(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def install() -> None:
    """Patches what of PATCHES is imported now, and the rest when it is."""
    for name, patch in PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not all(name in sys.modules for name in PATCHES) and not any(isinstance(f, _AfterImport)
                                                                    for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
