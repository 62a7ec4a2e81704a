"""What a pattern is, and how the backend finds them all.

A pattern module in `patterns/` (installed as `liger_compile.patterns`) defines `PATTERNS`, a list of `Pattern`:
the search function (the Hugging Face math as plain torch code), the replacement (a call to our op, same
parameters), and a check that reads shapes and dtypes from the match and says why a site must not be fused.
The backend imports every module it finds there; adding a pattern never touches the backend.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.fx import Graph

from .matcher import Match

log = logging.getLogger("liger_compile")



def _no_objection(match: Match) -> str | None:
    return None


@dataclass
class Assume:
    """What a check returns to fuse a site provided that, at run time, graph input `node` holds `fact`. By default
    an earlier graph's OutputCheck records the fact (liger_compile/facts.py); with `test`, the graph itself tests
    its inputs `node, *more` at every call (`test(*those inputs) -> bool`, e.g. "the mask built from this
    attention_mask is causal for every real token"). Where that cannot be arranged (a nested graph, the graph's
    version without assumptions), the site is a near miss with reason `unproved`."""
    node: object  # torch.fx.Node, a placeholder of the graph being rewritten
    fact: str
    unproved: str
    more: tuple = ()  # further placeholders the test reads
    test: Callable | None = None


@dataclass
class OutputCheck:
    """A fact a graph's returned value may have, for graphs after a graph break to rely on (Assume). A pattern
    module lists them in OUTPUT_CHECKS."""
    fact: str
    candidate: Callable[[torch.Tensor], bool]  # on the output's example value, while compiling: worth checking?
    holds: Callable[[torch.Tensor], bool]  # on the real value, at run time (may synchronise with the GPU)


@dataclass
class Pattern:
    name: str  # report key, e.g. "rms_norm"
    variant: str  # which source form it matches, e.g. "llama" or "gemma"
    search: Callable  # the model's math, as plain torch code; its parameters are the wildcards
    replace: Callable  # same parameters; builds the fused call
    check: Callable[[Match], str | Assume | None] = _no_objection  # why a site must not be fused, or None
    # what marks a candidate site, for near-miss reports: an op name (e.g. "rsqrt") or a test of a node
    anchor: str | Callable | None = None
    # An interior value the graph also returns (the logits next to a fused loss) may be provided by the rewrite:
    # lazily (computed from the match's inputs on first use) or, with `replace_keeping`, by the fused op itself,
    # which then returns (value, kept interior value).
    returned_ok: bool = False
    replace_keeping: Callable | None = None
    _graph: Graph | None = field(default=None, repr=False)

    @property
    def graph(self) -> Graph:
        if self._graph is None:
            with _torch_functionals():
                self._graph = torch.fx.symbolic_trace(self.search).graph
        return self._graph

    @property
    def label(self) -> str:
        return f"{self.name}[{self.variant}]"


@contextlib.contextmanager
def _torch_functionals():
    """A pattern is torch's math: trace it with torch's own F.linear even where a library has replaced it in
    torch.nn.functional (DeepSpeed ZeRO-3 installs its own autograd function there, which cannot be traced)."""
    F, builtin = torch.nn.functional, torch._C._nn.linear
    current = F.linear
    if current is builtin:
        yield
        return
    F.linear = builtin
    try:
        yield
    finally:
        F.linear = current


@functools.cache
def _pattern_modules() -> tuple:
    from . import patterns as package  # noqa: PLC0415 - imported lazily: pattern modules import torch ops

    modules = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            modules.append(importlib.import_module(f"{package.__name__}.{info.name}"))
        except Exception as e:  # a broken optional pattern must not take the backend down
            log.warning("liger_compile: pattern module %s failed to import (%s); it is skipped", info.name, e)
    # A module's PRIORITY (default 10) orders it among the others, lower first: a pattern that must see a site before
    # another one (the plain-causal attention rewrite before the variable-length one) says so; ties go by name.
    return tuple(sorted(modules, key=lambda m: (getattr(m, "PRIORITY", 10), m.__name__)))


@functools.cache
def all_patterns() -> tuple[Pattern, ...]:
    """Every pattern of every module in liger_compile.patterns, in module (priority) then list order."""
    return tuple(p for module in _pattern_modules() for p in getattr(module, "PATTERNS", ()))


@functools.cache
def all_output_checks() -> tuple[OutputCheck, ...]:
    return tuple(c for module in _pattern_modules() for c in getattr(module, "OUTPUT_CHECKS", ()))


@functools.cache
def off_by_default() -> frozenset[str]:
    """Patterns whose module sets ON_BY_DEFAULT = False: rewrites not shown to win in a whole training step (slower
    where measured, or not yet measured), fused only when the `enable` option names them."""
    return frozenset(p.name for module in _pattern_modules() if not getattr(module, "ON_BY_DEFAULT", True)
                     for p in getattr(module, "PATTERNS", ()))


def pattern_names() -> list[str]:
    """Every pattern's report key, in priority order: each always appears in `report.counts`, 0 when nothing fused."""
    return list(dict.fromkeys(p.name for p in all_patterns()))
