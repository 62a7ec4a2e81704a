"""Attention whose mask lets every real token see exactly the tokens before it becomes SDPA with `is_causal=True`
and no mask.

Under torch.compile, transformers builds an explicit [B, 1, T, T] boolean mask (from position ids, with its
packed-sequence detection) and calls SDPA with `attn_mask=mask, is_causal=False`; eager passes `is_causal=True`.
The masked call is several times slower at long context and the mask costs T^2 bytes.

The condition, on a mask's value: every query that sees itself (a real token) sees exactly the keys 0..i
(`_real_rows_causal`). Then `is_causal` gives every real token the output the mask gives it. That holds for the
plain causal mask and for right padding, where the padding comes after every real token of a row; not for left
padding, packed documents or sliding windows. The queries that do not see themselves (the padding after a row's
tokens) get causal attention over everything before them, where the mask gives them the row's real tokens only:
finite values that reach only later padding positions, whose logits predict padding labels (-100 in every HF and
TRL collator).

When the mask is computed from shapes alone (no padding mask, no user position ids), its value is fixed for the
graph's static shapes: we compute it once while compiling and replace the call only if the condition holds.

When it is computed from graph inputs too (the trainers' collators always pass a 2D `attention_mask`, or
`position_ids`), the call is replaced assuming the condition, and the graph tests it at every call: it builds the
mask from those inputs with the model's own code (copied from the graph) and checks it, a few small kernels and a
host read, as eager HF reads the mask before it picks its causal kernel. Any other batch (left padding, packed
sequences) runs the graph's second version, compiled on first need. While compiling, the mask is evaluated for the
inputs' plain values (all ones, positions 0..T-1) so a mask that never passes (a sliding window) is not assumed.

Across a graph break (FSDP's per-layer hooks put every decoder layer in a graph of its own) the mask is built in
one graph and used in the next, where it is an input. The graph that returns a [B, 1, T, T] boolean mask checks
its value when it runs (OUTPUT_CHECKS; once per forward) and records it if the condition holds; the layer's graph
fuses assuming that (Assume) and runs its masked version for any other mask (liger_compile/facts.py).
"""
import itertools
import operator

import torch
import torch.nn.functional as F

from liger_compile.lazy import extract
from liger_compile.matcher import Match, example_value
from liger_compile.pattern import Assume, OutputCheck, Pattern

MAX_CHECKED_ELEMENTS_OFF_GPU = 2**31  # a bigger mask takes too long to evaluate on a CPU while compiling
# Building the mask may hold a few mask-sized tensors at once (the comparisons HF combines); a mask is checked only
# if that many fit in half the GPU memory free at compile time (at 1 x 65536 one mask is 4 GiB of bools).
MASK_COPIES_WHILE_BUILDING = 4
COMPARE_BLOCK_ELEMENTS = 2**28  # rows compared against the causal pattern per step (no second full-size mask)
MAX_ASSUMED_INPUTS = 3  # a mask built from more graph inputs than this is left as it is (candidates grow as 2^n)


def _check_budget(device: torch.device) -> int:
    """How many mask elements we allow ourselves to build while compiling on this device."""
    if device.type != "cuda":
        return MAX_CHECKED_ELEMENTS_OFF_GPU
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached, reusable
    return free // 2 // MASK_COPIES_WHILE_BUILDING


def _real_rows_causal(value: torch.Tensor) -> bool:
    """value [..., T, T] bool: every query that sees itself sees exactly the keys 0..i (checked block of rows by
    block of rows, no second full-size mask)."""
    t = value.shape[-1]
    rows = torch.arange(t, device=value.device)
    real = value.diagonal(dim1=-2, dim2=-1)
    step = max(1, COMPARE_BLOCK_ELEMENTS // max(1, value.numel() // value.shape[-2]))
    for r0 in range(0, value.shape[-2], step):
        block = value[..., r0:r0 + step, :]
        causal = rows[None, :] <= rows[r0:r0 + step, None]
        if bool(((block != causal) & real[..., r0:r0 + step, None]).any()):
            return False
    return True


class _MaskTest:
    """The run-time test of an assumption about graph inputs: builds the mask from them with the graph's own code
    (`compute`, a copy of that part of the graph) and checks the condition."""

    def __init__(self, compute):
        self.compute = compute

    def __call__(self, *inputs) -> bool:
        with torch.no_grad():
            return _real_rows_causal(self.compute(*inputs))


def repeat_kv(x, batch, kv_heads, n_rep, seq, head_dim, heads):
    """HF's repeat_kv: copies each key/value head n_rep times so plain SDPA sees as many as the queries."""
    return x[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq, head_dim).reshape(batch, heads, seq, head_dim)


def masked_sdpa(query, key, value, mask, dropout_p, scale, enable_gqa):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p, is_causal=False,
                                          scale=scale, enable_gqa=enable_gqa)


def causal_sdpa(query, key, value, mask, dropout_p, scale, enable_gqa):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=dropout_p, is_causal=True,
                                          scale=scale, enable_gqa=enable_gqa)


def masked_sdpa_repeated_kv(query, key, value, mask, dropout_p, scale, batch, kv_heads, n_rep, seq, head_dim, heads):
    """What HF runs under torch.compile for grouped-query attention: an explicit mask and copied k/v heads."""
    return F.scaled_dot_product_attention(
        query, repeat_kv(key, batch, kv_heads, n_rep, seq, head_dim, heads),
        repeat_kv(value, batch, kv_heads, n_rep, seq, head_dim, heads),
        attn_mask=mask, dropout_p=dropout_p, is_causal=False, scale=scale, enable_gqa=False)


def causal_sdpa_gqa(query, key, value, mask, dropout_p, scale, batch, kv_heads, n_rep, seq, head_dim, heads):
    """Causal SDPA reading the shared k/v heads directly (as eager HF does): no [B, H, T, D] copies to save."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=dropout_p, is_causal=True,
                                          scale=scale, enable_gqa=True)


def _static(shape) -> bool:
    return all(isinstance(s, int) for s in shape)


def repeated_heads_line_up(m: Match) -> str | None:
    """For HF's repeat_kv form: the copied key/value heads are the query heads (shared with varlen_attention)."""
    k, q = m.value("key"), m.value("query")
    if not isinstance(k, torch.Tensor) or k.dim() != 4 or q.dim() != 4:
        return "query/key are not [B, H, T, D]"
    if k.shape[1] != m["kv_heads"] or m["kv_heads"] * m["n_rep"] != m["heads"] or q.shape[1] != m["heads"]:
        return "the repeated heads do not line up with the query heads"
    return None


def check_gqa(m: Match) -> str | None:
    return repeated_heads_line_up(m) or check(m)


def check(m: Match) -> str | None:
    q, k, mask = m.value("query"), m.value("key"), m.value("mask")
    if not isinstance(mask, torch.Tensor):
        return "no mask"
    if mask.dtype != torch.bool:
        return f"the mask is additive ({mask.dtype}), not boolean"
    if not (_static(mask.shape) and _static(q.shape) and _static(k.shape)):
        # Testing it at run time would need the graph's version without the rewrite compiled at once (no concrete
        # shapes to compile it for later): twice the compile, for every symbolic-length graph. The
        # variable-length op serves these graphs (patterns/varlen_attention.py).
        return "dynamic shapes: the mask cannot be checked while compiling"
    t_q, t_k = q.shape[-2], k.shape[-2]
    if t_q != t_k or mask.shape[-2:] != (t_q, t_k):
        return f"query length {t_q} and key length {t_k} differ (a KV cache)"
    budget = _check_budget(mask.device)
    if mask.numel() > budget:
        return (f"mask of {mask.numel()} elements is too large to check while compiling "
                f"(at most {budget} on {mask.device})")
    try:
        compute, used = extract(m["mask"], [], outer=m.outer)  # through a checkpointed body's inputs too
    except ValueError as e:
        source = _graph_input_behind(m["mask"])
        while source is not None and source in m.outer:  # a checkpointed body's input: what the enclosing graph passes
            source = _graph_input_behind(m.outer[source])
        if source is not None:
            return Assume(source, "causal_mask", f"the mask is the graph input {source.name}, built by an earlier "
                          "graph, and was not checked to be plain causal")
        return _assuming_real_rows_causal(m, str(e))
    from torch._subclasses.fake_tensor import unset_fake_temporarily  # noqa: PLC0415

    with unset_fake_temporarily(), torch.no_grad():
        value = compute()
        same = _real_rows_causal(value)
        del value
    return None if same else "the mask is computed from shapes alone but is not plain causal"


def _outermost(node, outer):
    """`node`, or what the enclosing graphs pass in for it when it is a checkpointed body's input."""
    while node.op == "placeholder" and node in outer:
        node = outer[node]
    return node


def _graph_inputs_of(node, outer) -> list:
    """The graph inputs `node` is computed from (followed out of a checkpointed body through `outer`)."""
    seen, found, stack = set(), [], [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder" and n in outer:
            stack.append(outer[n])
        elif n.op == "placeholder":
            found.append(n)
        else:
            stack.extend(n.all_input_nodes)
    return found


def _plain_values(e: torch.Tensor) -> list[torch.Tensor]:
    """What a [B, T] input of an unpadded batch holds: an attention_mask of ones, or positions 0..T-1 in each row."""
    if e.dim() != 2 or not _static(e.shape):
        return []
    values = [torch.ones(e.shape, dtype=e.dtype, device=e.device)]
    if not e.dtype.is_floating_point and e.dtype != torch.bool:
        values.append(torch.arange(e.shape[-1], device=e.device, dtype=e.dtype).expand(e.shape).contiguous())
    return values


def _assuming_real_rows_causal(m: Match, why: str) -> Assume | str:
    """The assumption, tested at every call, that the mask built from the graph inputs behind it passes the
    condition, or the reason there is none. One Assume per mask node, so the layers sharing a mask share its test."""
    inputs = _graph_inputs_of(m["mask"], m.outer)
    holder = _outermost(m["mask"], m.outer)  # the same node for every checkpointed layer body given this mask
    cached = holder.meta.get("liger_causal_assumption")
    if cached is not None and cached.node in inputs:
        return cached
    if not inputs or len(inputs) > MAX_ASSUMED_INPUTS:
        return f"the mask depends on runtime inputs ({why})"
    try:
        compute, used = extract(m["mask"], inputs, outer=m.outer)
    except ValueError as e:  # it also depends on something that is not a graph input (a buffer, a constant)
        return f"the mask depends on runtime inputs ({e})"
    names = ", ".join(n.name for n in used)
    candidates = [_plain_values(example_value(n)) if isinstance(example_value(n), torch.Tensor) else []
                  for n in used]
    if not all(candidates):
        return f"the mask depends on runtime inputs ({names}) that are not [B, T] token rows"
    from torch._subclasses.fake_tensor import unset_fake_temporarily  # noqa: PLC0415

    with unset_fake_temporarily(), torch.no_grad():
        ever = any(_real_rows_causal(compute(*values)) for values in itertools.product(*candidates))
    if not ever:
        return (f"the mask depends on runtime inputs ({names}) and its real tokens do not see exactly the tokens "
                "before them even for an unpadded batch")
    assume = Assume(used[0], "a causal mask for its real tokens", f"the mask is computed from the graph inputs "
                    f"{names}; is_causal attention is right for it only where every real token sees exactly the "
                    "tokens before it, tested at run time", more=tuple(used[1:]), test=_MaskTest(compute))
    holder.meta["liger_causal_assumption"] = assume
    return assume


def _full_index(index) -> bool:
    """An index that selects everything in order: full slices and Ellipsis only (an index tensor can keep the shape
    and still reorder the values)."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is Ellipsis or (isinstance(p, slice) and p == slice(None)) for p in parts)


def _graph_input_behind(node):
    """The graph input `node` is, through views that change nothing (a full slice, an expand to its own shape)."""
    while True:
        if node.op == "placeholder":
            return node
        src = node.args[0] if node.args else None
        full_slice = node.target is operator.getitem and len(node.args) == 2 and _full_index(node.args[1])
        same_op = full_slice or node.target in ("expand", "contiguous")
        if not (same_op and hasattr(src, "op")):
            return None
        v, sv = example_value(node), example_value(src)
        if not (isinstance(v, torch.Tensor) and isinstance(sv, torch.Tensor) and v.shape == sv.shape
                and v.dtype == sv.dtype):
            return None
        node = src


def _square_bool_mask(v: torch.Tensor) -> bool:
    """Worth checking when the graph runs: a static [B, 1, T, T] boolean tensor."""
    return (v.dtype == torch.bool and v.dim() == 4 and all(isinstance(d, int) for d in v.shape)
            and v.shape[1] == 1 and v.shape[-1] == v.shape[-2])


OUTPUT_CHECKS = [OutputCheck("causal_mask", _square_bool_mask, _real_rows_causal)]


PATTERNS = [
    Pattern("causal_mask", "sdpa, repeat_kv -> enable_gqa", masked_sdpa_repeated_kv, causal_sdpa_gqa, check_gqa,
            anchor="scaled_dot_product_attention"),
    Pattern("causal_mask", "sdpa", masked_sdpa, causal_sdpa, check, anchor="scaled_dot_product_attention"),
]
