"""Gradients of a chunked lm_head op computed in its forward pass, where the loss weights every scored token alike.

A per-token op (``liger::token_logprobs``) cannot know in forward how the loss will weight each token, so its
backward computes the logits again: four vocabulary-wide matmuls where three would do. SFT's loss is
``sum(-log_probs) / n_tokens``: every scored token's gradient is the same number, and entropy gets none. Once a
backward of the op has seen such a gradient for a weight, later forwards for that weight compute d/dhidden,
d/dweight and d/dbias with that number as the guess (three matmuls); their backward checks that the gradient it
receives is uniform again and rescales the kept gradients by received / guessed (exactly 1 while the token count
stays the same). Any other gradient (DPO's, KTO's and GRPO's per-sequence weights, an entropy bonus) takes the
recomputing backward, as without this, and ends the guessing for weights of that shape. Deciding costs one host
synchronisation per backward (none once guessing has ended for the shape); inside a CUDA-graph capture nothing is
guessed or checked.

At most one forward per weight shape keeps gradients: a second forward before the first one's backward replaces
them, and that first backward recomputes (correct, only slower).
"""
import dataclasses
import sys
from typing import Optional

import torch

_UNDECIDED = "undecided"  # a weight shape whose forwards expect gradients, before its first backward
_OFF = "off"  # a weight shape whose gradients were seen to be non-uniform


@dataclasses.dataclass
class Kept:
    token: torch.UntypedStorage  # the forward's log_z storage: held, so no later call's log_z can take its address
    guess: float  # the per-token gradient the kept gradients were computed with
    grads: tuple  # (d hidden, d weight, d bias), None where not computed


_guesses: dict = {}  # weight key -> _UNDECIDED, _OFF or the last uniform gradient seen (a float)
_kept: dict[tuple, Kept] = {}
stats = {"kept": 0, "used": 0, "recomputed": 0}  # forwards that kept gradients; backwards that used / recomputed


def weight_key(weight: torch.Tensor) -> tuple:
    # by shape, not address: under autocast the weight is a new cast copy at every call. Two heads of one shape
    # share a guess, which costs at most a recompute: kept gradients are used only by their own forward's backward
    return tuple(weight.shape), weight.dtype, weight.device


def capturing(t: torch.Tensor) -> bool:
    """Inside a CUDA-graph capture, or inside the eager warm-up run that Inductor's CUDA-graph trees
    (mode="reduce-overhead") make before one: that run allocates from the graphs' private pool, and a tensor kept
    past the call there is refused ("tensor(s) in the cudagraph pool not tracked as outputs"). Both run on the tree
    manager's own stream."""
    if not t.is_cuda:
        return False
    if torch.cuda.is_current_stream_capturing():
        return True
    trees = sys.modules.get("torch._inductor.cudagraph_trees")  # loaded by Inductor once it uses CUDA graphs
    manager = trees.get_manager(t.device.index, create_if_none_exists=False) if trees is not None else None
    return manager is not None and torch.cuda.current_stream(t.device) == manager.stream


def guess(weight: torch.Tensor) -> Optional[float]:
    """The per-token gradient to compute this forward's gradients with, or None to leave them to the backward."""
    if capturing(weight):
        return None
    state = _guesses.setdefault(weight_key(weight), _UNDECIDED)
    return state if isinstance(state, float) else None


def keep(weight: torch.Tensor, log_z: torch.Tensor, guessed: float, grads: tuple) -> None:
    _kept[weight_key(weight)] = Kept(log_z.untyped_storage(), guessed, grads)
    stats["kept"] += 1


def uniform_gradient(grad_log_probs, grad_entropy, labels, ignore_index) -> Optional[float]:
    """The gradient every scored token's log-prob received when they all received the same one and the entropy
    none; None otherwise. One host synchronisation."""
    scored = labels.reshape(-1) != ignore_index
    g = grad_log_probs.reshape(-1).float()
    lo = torch.where(scored, g, float("inf")).amin()
    hi = torch.where(scored, g, float("-inf")).amax()
    ent = torch.where(scored, grad_entropy.reshape(-1).float().abs(), 0.0).amax()
    lo, hi, ent = torch.stack([lo, hi, ent]).tolist()
    if lo == float("inf"):  # nothing scored: every gradient is zero
        return 0.0
    return lo if lo == hi and ent == 0.0 and abs(lo) < float("inf") else None


def kept_gradients(grad_log_probs, grad_entropy, weight, labels, log_z, ignore_index, needs) -> Optional[tuple]:
    """In the backward: the forward's kept gradients rescaled to the gradient received, or None where the backward
    must compute them (none kept, not all asked for kept, or the gradient received is not uniform). Records what it
    saw for the next forwards."""
    key = weight_key(weight)
    if capturing(weight) or _guesses.get(key, _OFF) == _OFF:  # no forward expected gradients, or guessing ended
        _kept.pop(key, None)
        return None
    kept = _kept.get(key)
    if kept is not None and kept.token.data_ptr() != log_z.untyped_storage().data_ptr():
        kept = None  # another forward's, this backward's were replaced
    else:
        _kept.pop(key, None)
    received = uniform_gradient(grad_log_probs, grad_entropy, labels, ignore_index)
    if received is None:
        _guesses[key] = _OFF
    elif received != 0.0 or not isinstance(_guesses[key], float):  # a guess is never 0 (it divides)
        _guesses[key] = received if received != 0.0 else 1.0
    if kept is None or received is None or any(need and g is None for need, g in zip(needs, kept.grads)):
        stats["recomputed"] += 1
        return None
    stats["used"] += 1
    scale = received / kept.guess
    return tuple(g if g is None or scale == 1.0 else g.mul_(scale) for g in kept.grads)


def reset() -> None:
    """Forgets every weight's guess and every kept gradient (tests)."""
    _guesses.clear()
    _kept.clear()
    for k in stats:
        stats[k] = 0
