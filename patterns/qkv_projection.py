"""q, k and v projections of one input as one matmul: ``F.linear(x, cat([Wq, Wk, Wv]))`` split into the three.

With grouped key/value heads, k and v are narrow (512 columns beside q's 2048 for Llama-3.2-1B, 256 beside 1536 for
Qwen2-1.5B) and cuBLAS runs such matmuls well below the card's rate; one matmul over the concatenated weights, and
in backward one input-gradient matmul, run faster even with the weights concatenated at every step
(bench/results/horizontal_gemm.md). In a whole TRL SFT step at that shape it did not win (more matmul time and
memory: bench/results/sft_llama-1b_4x2048_qkv-merged.md), so the rewrite is off unless the `enable` option (or
LIGER_COMPILE_ENABLE) names `qkv_projection`. The parameters stay as they are (the optimizer, FSDP and checkpoints
still see three weights); autograd splits the concatenated weight's gradient back into them.

Only q/k/v with k and v narrower than q are merged: gate and up (each as wide as the MLP) ran slower as one matmul
in the same measurement. Nothing is fused into a kernel of ours: the rewrite is plain torch, which Inductor compiles.
"""
import torch
import torch.nn.functional as F

from liger_compile.matcher import Match, op_name
from liger_compile.pattern import Pattern

ON_BY_DEFAULT = False
PRIORITY = 30  # last: the other patterns read the projections' outputs (views of the split are the same values)


def qkv(x, wq, bq, wk, bk, wv, bv):
    """The biases are wildcards: None where the model has none (Llama), tensors where it has them (Qwen2)."""
    return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)


def merged(x, wq, bq, wk, bk, wv, bv):
    bias = None if bq is None else torch.cat([bq, bk, bv])
    out = F.linear(x, torch.cat([wq, wk, wv]), bias)
    # torch.split, not out.split: a method call on a node the rewrite made (no example value) would make
    # AOTAutograd's cache bypass the graph
    parts = torch.split(out, [wq.size(0), wk.size(0), wv.size(0)], dim=-1)
    return parts[0], parts[1], parts[2]


def check(m: Match) -> str | None:
    x = m.value("x")
    weights = [m.value(k) for k in ("wq", "wk", "wv")]
    if not isinstance(x, torch.Tensor) or not all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights):
        return "the input or a projection's weight is not a tensor of the expected rank"
    wq, wk, wv = weights
    if any(_distributed(w) for w in weights):
        return "a weight is a DTensor (tensor parallelism): concatenating shards would change what each rank holds"
    if len({w.dtype for w in weights}) > 1 or len({w.device for w in weights}) > 1:
        return "the three weights differ in dtype or device"
    if not (wq.shape[1] == wk.shape[1] == wv.shape[1] == x.shape[-1]):
        return "the three projections do not read the same width"
    if wk.shape != wv.shape or wk.shape[0] >= wq.shape[0]:
        return (f"k and v ({wk.shape[0]}, {wv.shape[0]} columns) are not one width narrower than q's "
                f"({wq.shape[0]}): merging was measured only for grouped key/value heads")
    biases = [m.value(k) for k in ("bq", "bk", "bv")]
    if all(b is None for b in biases):
        return None
    if not all(isinstance(b, torch.Tensor) and b.shape == (w.shape[0],) and b.dtype == w.dtype
               for b, w in zip(biases, weights)):
        return "the projections' biases are not one per weight (all three or none), each of its weight's width"
    return None


def _distributed(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # noqa: PLC0415
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _shares_its_input(node) -> bool:
    """A candidate site for near-miss reports: a projection whose input two other projections read too."""
    if op_name(node) != "linear" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    return sum(op_name(u) == "linear" and u.args[0] is node.args[0] for u in node.args[0].users) >= 3


PATTERNS = [Pattern("qkv_projection", "q, k, v", qkv, merged, check, anchor=_shares_its_input)]
