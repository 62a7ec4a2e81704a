"""Facts about tensors that cross graph breaks: one compiled graph checks a value it returns, a later graph relies on it.

A graph break (FSDP's per-layer hooks, a `torch.compiler.disable`d call, compiled DDP's buckets) puts the code that
builds a value in one graph and the code that uses it in another. While compiling the user, nothing says what the
input will hold: HF's attention mask, built in the model's graph, reaches each decoder layer's graph as an input.
So:
  - the producing graph's compiled function checks, at run time, each returned value a pattern module's
    `OUTPUT_CHECKS` names as a candidate (e.g. "this [B, 1, T, T] boolean mask is lower-triangular") and records
    the tensors for which the check holds;
  - a consuming graph's pattern may fuse assuming a fact about one of its inputs (`Assume`); that graph is then
    compiled twice, with and (on first need) without those fusions, and each call runs the version whose
    assumptions hold for the tensors it was actually given.
A fact belongs to one tensor object at one version: written in place after the check, it no longer holds.

Some facts need no earlier graph: an assumption may carry its own test of the graph's inputs, run at each call
("the mask built from this attention_mask is causal for every real token": a few small kernels and a host read, as
eager HF reads the mask before choosing its causal attention), with the same two versions of the graph.
"""
from __future__ import annotations

import logging
import weakref
from collections import Counter
from typing import Callable, NamedTuple

import torch

log = logging.getLogger("liger_compile")


class Assumption(NamedTuple):
    """A fact a compiled graph's fused sites rely on, about the graph inputs at `slots`."""

    slots: tuple[int, ...]
    fact: str
    test: Callable | None  # tests those inputs at each call; None: an earlier graph records the fact (`mark`)


# (id(tensor), fact) -> (weak reference to the tensor, its version counter when the fact was checked)
_known: dict[tuple[int, str], tuple[weakref.ref, int]] = {}
# calls of graphs compiled with assumptions: how many ran the fused version ("assumed") and how many the other
stats: Counter = Counter()


def mark(t: torch.Tensor, fact: str) -> None:
    key = (id(t), fact)
    _known[key] = (weakref.ref(t, lambda _ref, key=key: _known.pop(key, None)), t._version)


def holds(t, fact: str) -> bool:
    entry = _known.get((id(t), fact))
    return entry is not None and entry[0]() is t and t._version == entry[1]


def checking_outputs(fn, checks: list) -> Callable:
    """fn, recording the facts `checks` [(output slot, OutputCheck)] find true of its outputs at run time."""
    if not checks:
        return fn

    def run(*args):
        outs = fn(*args)
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():  # no sync inside a capture
            for slot, check in checks:
                value = outs[slot]
                try:
                    found = isinstance(value, torch.Tensor) and check.holds(value)
                except Exception as e:  # a check that cannot run proves nothing: the layers run their unfused version
                    log.warning("liger_compile: run-time check %s failed (%s); not relied on", check.fact, e)
                    found = False
                if found:
                    mark(value, check.fact)
        return outs

    return run


def _holds(args, slots: tuple, fact: str, test) -> bool:
    if test is None:  # a fact an earlier graph records
        return holds(args[slots[0]], fact)
    try:
        return bool(test(*(args[s] for s in slots)))
    except Exception as e:  # a test that cannot run proves nothing: the graph runs its version without the fusion
        log.warning("liger_compile: run-time test %r failed (%s); not relied on", fact, e)
        return False


def dispatching(make_assumed: Callable[[list], Callable], assumptions: list[Assumption],
                make_fallback: Callable[[list], Callable]) -> Callable:
    """A graph function that runs the version with the assumed fusions when every assumption holds for the inputs
    it is given, and otherwise the version without them; each built once, by
    make_assumed(inputs) / make_fallback(inputs), on the first call that needs it. An assumption with a test runs it
    on those inputs at each call; one without was recorded by an earlier graph (`mark`). (Dynamo calls a backend's
    function with the graph's inputs as arguments, as every function here takes them.)"""
    built: dict[bool, Callable] = {}

    def run(*args):
        holds_now = all(_holds(args, slots, fact, test) for slots, fact, test in assumptions)
        stats["assumed" if holds_now else "fallback"] += 1
        if holds_now not in built:
            built[holds_now] = (make_assumed if holds_now else make_fallback)(list(args))
        return built[holds_now](*args)

    run._liger_assumptions = assumptions  # visible for debugging and tests
    run._liger_versions = built
    return run
