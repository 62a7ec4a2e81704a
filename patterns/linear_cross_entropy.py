"""lm_head + cross-entropy, as HF causal LMs compute their loss, fused into ``liger::linear_cross_entropy``.

The [tokens, vocab] logits are never built: the op works through the tokens in chunks. The model still returns
`logits`; in a training graph they come back lazily (computed only if read), or, with
`options={"skip_logits": False}`, written by the op itself.

Logits divided or multiplied by a constant before the loss (Granite's `logits / logits_scaling`, Cohere's
`logits * logit_scale`, also before soft-capping) are matched too: the op is fed `hidden / s` or `hidden * s` (and
the bias likewise), which gives the same logits without touching the [tokens, vocab] product.

Under autocast (a float32 model with the Trainer's bf16=True) the lm_head's matmul runs in autocast's dtype: the op
is fed hidden states, weight and bias cast to it, as autocast casts them for the matmul.
"""
import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from liger_compile.autocast import matmul_cast
from liger_compile.kernels import linear_cross_entropy as _op  # noqa: F401  (defines the op)
from liger_compile.kernels._common import FLOAT_DTYPES
from liger_compile.matcher import Match, op_name
from liger_compile.pattern import Pattern


def make_search(softcap: bool, upcast: bool, divide: bool, scaled: str | None = None):
    """The loss path of HF's ForCausalLMLoss: optional Gemma2 soft-capping, optional .float(), flatten, CE, and
    with the Trainer's num_items_in_batch a sum divided by it. `scaled` "/" or "*": the logits are first divided
    or multiplied by a constant (Granite's `logits / logits_scaling`, Cohere's `logits * logit_scale`)."""

    def search(hidden, weight, bias, labels, vocab, ignore_index, reduction, label_smoothing, cap, num_items, scale):
        logits = F.linear(hidden, weight, bias)
        if scaled == "/":
            logits = logits / scale
        elif scaled == "*":
            logits = logits * scale
        if softcap:
            logits = logits / cap
            logits = torch.tanh(logits)
            logits = logits * cap
        if upcast:
            logits = logits.float()
        loss = F.cross_entropy(logits.view(-1, vocab), labels, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=label_smoothing)
        if divide:
            loss = loss / num_items
        return loss

    return search


def make_fused(upcast: bool, keep_logits: bool = False, scaled: str | None = None):
    def fused(hidden, weight, bias, labels, vocab, ignore_index, reduction, label_smoothing, cap=0.0, num_items=None,
              scale=None):
        reduction = "sum" if num_items is not None else reduction
        loss_like, matmul = hidden, matmul_cast(hidden.node)
        if scaled == "/":  # (h @ W^T + b) / s == (h / s) @ W^T + b / s: scale the [N, H] input, not [N, V]
            hidden = hidden / scale
            bias = bias / scale if bias is not None else None
        elif scaled == "*":
            hidden = hidden * scale
            bias = bias * scale if bias is not None else None
        if matmul is not None:  # the casts autocast makes for the lm_head's matmul
            hidden, weight = hidden.to(matmul), weight.to(matmul)
            bias = bias.to(matmul) if bias is not None else None
        out = torch.ops.liger.linear_cross_entropy(
            hidden.flatten(0, -2), weight, bias, labels.reshape(-1), None, int(ignore_index), float(label_smoothing),
            float(cap), reduction, keep_logits,
        )
        loss = out[0]
        if not upcast:
            loss = loss.type_as(loss_like)  # eager's loss has the logits' dtype when they are not upcast
        loss = loss / num_items if num_items is not None else loss
        if keep_logits:  # the logits the model returns, in its shape: hidden's leading dims by the vocabulary
            return loss, out[4].unflatten(0, hidden.shape[:-1])
        return loss

    return fused


def check(m: Match) -> str | None:
    h, w, b, labels = m.value("hidden"), m.value("weight"), m.value("bias"), m.value("labels")
    if not all(isinstance(t, torch.Tensor) for t in (h, w, labels)):
        return "hidden, weight or labels is not a tensor"
    if h.dtype not in FLOAT_DTYPES or w.dtype != h.dtype:
        return f"unsupported dtypes hidden={h.dtype}, weight={w.dtype}"
    if w.dim() != 2 or h.shape[-1] != w.shape[1]:
        return f"weight shape {tuple(w.shape)} does not fit hidden size {h.shape[-1]}"
    if not statically_known_true(m["vocab"] == w.shape[0]):
        return f"logits are viewed with {m['vocab']} columns for a vocabulary of {w.shape[0]}"
    if b is not None and (not isinstance(b, torch.Tensor) or b.shape != (w.shape[0],)):
        return "bias is not a [vocab] tensor"
    if labels.dtype not in (torch.int64, torch.int32):
        return f"labels have dtype {labels.dtype}"
    if not statically_known_true(labels.numel() * h.shape[-1] == h.numel()):
        return "labels and hidden states hold different numbers of tokens"
    if not isinstance(m["ignore_index"], int) or m["reduction"] not in ("mean", "sum"):
        return f"unsupported ignore_index={m['ignore_index']!r} or reduction={m['reduction']!r}"
    if "num_items" in m.bindings and m["reduction"] != "sum":
        return "a loss divided by num_items must be a sum"
    if not isinstance(m["label_smoothing"], (int, float)) or not 0 <= m["label_smoothing"] <= 1:
        return f"label_smoothing {m['label_smoothing']!r} is not a constant in [0, 1]"
    if "scale" in m.bindings and not (isinstance(m["scale"], (int, float)) and not isinstance(m["scale"], bool)
                                      and m["scale"] != 0):
        return f"logits are divided or multiplied by {m['scale']!r}, not by a nonzero constant"
    if "cap" in m.bindings and not (isinstance(m["cap"], (int, float)) and m["cap"] > 0):
        return f"soft-cap {m['cap']!r} is not a positive constant"
    linear = next((n for n in m.nodes if op_name(n) == "linear"), None)
    logits = linear.meta.get("example_value") if linear is not None else None
    matmul = matmul_cast(m.bindings["hidden"]) or h.dtype  # what the op's matmul will run in
    if logits is not None and logits.dtype != matmul:
        return (f"the lm_head's logits are {logits.dtype} and its hidden states {h.dtype} (autocast to "
                f"{matmul if matmul != h.dtype else 'no other dtype'} where they are computed): the regions differ")
    for returned in m.returned:  # logits the graph returns must be the op's: [..., V] in the matmul's dtype
        r = returned.meta.get("example_value")
        if r is None or r.dtype != matmul or r.shape[:-1] != h.shape[:-1]:
            return "the graph returns an intermediate other than the logits (e.g. upcast ones)"
    return None


PATTERNS = [
    Pattern(
        "linear_cross_entropy",
        (f"{scaled} scale, " if scaled else "") + ("softcap, " if softcap else "")
        + ("fp32" if upcast else "no upcast") + (", / num_items" if divide else ""),
        make_search(softcap, upcast, divide, scaled), make_fused(upcast, scaled=scaled), check,
        anchor="cross_entropy", returned_ok=True, replace_keeping=make_fused(upcast, keep_logits=True, scaled=scaled),
    )
    for softcap in (True, False)  # the longer forms first: a soft-capped site also contains the plain one's tail
    for scaled in ("/", "*", None)
    for divide in (True, False)
    for upcast in (True, False)
]
