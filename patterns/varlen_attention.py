"""Masked SDPA whose mask is not provably causal (padded or packed batches) becomes ``liger::varlen_attention``:
causal attention within the mask's segments, read off the mask when the graph runs, without the dense mask's work.

Tried after `causal_mask` (patterns run in priority order): a site that pattern fuses, or fuses assuming plain
inputs, never gets here; the graph's second version, for batches whose inputs are not plain, does. The op checks
the mask's form itself at every call and computes any other mask as given (kernels/varlen_attention.py), so the
fusion needs no proof about the mask while compiling. What it gives the padding positions' own outputs differs
from HF's (see the op); the trainers' losses ignore them.
"""
import torch

from liger_compile.kernels import varlen_attention as _op  # noqa: F401  (defines the op)
from liger_compile.lazy import extract
from liger_compile.matcher import Match
from liger_compile.pattern import Pattern
from liger_compile.patterns.causal_mask import (_check_budget, _static, masked_sdpa, masked_sdpa_repeated_kv,
                                                repeated_heads_line_up)

PRIORITY = 20  # after causal_mask's plain-causal rewrite
DTYPES_ON_GPU = _op.FLASH_DTYPES  # fp32 on a GPU would run the op's plain-torch path: slower than SDPA's own


def _varlen(query, key, value, mask, scale):
    out = torch.ops.liger.varlen_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                                          scale)[0]
    return out.transpose(1, 2)


def varlen_sdpa(query, key, value, mask, dropout_p, scale, enable_gqa):
    return _varlen(query, key, value, mask, scale)


def varlen_sdpa_gqa(query, key, value, mask, dropout_p, scale, batch, kv_heads, n_rep, seq, head_dim, heads):
    return _varlen(query, key, value, mask, scale)  # the shared key/value heads, not HF's repeated copies


def check(m: Match) -> str | None:
    q, k, mask = m.value("query"), m.value("key"), m.value("mask")
    if not all(isinstance(x, torch.Tensor) for x in (q, k, mask)) or q.dim() != 4 or k.dim() != 4:
        return "query/key/mask are not tensors of [B, H, T, D] attention"
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1:
        return f"the mask is not a [B, 1, T, T] boolean mask ({mask.dtype}, {tuple(mask.shape)})"
    if m["dropout_p"] != 0.0:
        return f"attention dropout ({m['dropout_p']}) is not supported"
    if q.shape[-2] != k.shape[-2]:
        return "query and key lengths differ (a KV cache)"
    v = m.value("value")
    if not isinstance(v, torch.Tensor) or v.shape != k.shape or k.shape[-1] != q.shape[-1]:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        return (f"query {tuple(q.shape)}, key {tuple(k.shape)} and value {shape} differ in head size (the op "
                "takes one head size for all three)")
    if mask.shape[-2:] != q.shape[-2:-1] * 2 or mask.shape[0] not in (1, q.shape[0]):
        return f"the mask {tuple(mask.shape)} is not [B or 1, 1, T, T] for T = {q.shape[-2]}"
    if q.device.type == "cuda" and q.dtype not in DTYPES_ON_GPU:
        return f"{q.dtype} on a GPU: FlashAttention takes {', '.join(map(str, DTYPES_ON_GPU))}"
    if "enable_gqa" in m.bindings and m["enable_gqa"] and q.shape[1] % k.shape[1]:
        return "the key/value heads do not divide the query heads"
    return _known_without_segments(m)


def _known_without_segments(m: Match) -> str | None:
    """A mask computed from shapes alone is known while compiling: one without segments (a sliding window) would
    only take the op's plain-torch path, so it is left to SDPA."""
    mask = m.value("mask")
    if not _static(mask.shape) or mask.numel() > _check_budget(mask.device):
        return None
    try:
        compute, _ = extract(m["mask"], [], outer=m.outer)
    except ValueError:  # built from runtime inputs: the op reads it when it runs
        return None
    from torch._subclasses.fake_tensor import unset_fake_temporarily  # noqa: PLC0415

    with unset_fake_temporarily(), torch.no_grad():
        found = _op.segments(compute())
    return None if found is not None else "the mask (known while compiling) is not causal within segments"


def check_gqa(m: Match) -> str | None:
    return repeated_heads_line_up(m) or check(m)


PATTERNS = [
    Pattern("varlen_attention", "sdpa, repeat_kv -> enable_gqa", masked_sdpa_repeated_kv, varlen_sdpa_gqa, check_gqa,
            anchor="scaled_dot_product_attention"),
    Pattern("varlen_attention", "sdpa", masked_sdpa, varlen_sdpa, check, anchor="scaled_dot_product_attention"),
]
