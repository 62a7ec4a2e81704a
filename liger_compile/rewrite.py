"""Find every pattern in a Dynamo graph and replace it with its fused op; record what happened and why not.

`rewrite()` goes through the patterns in priority order, in stages:
  - candidates: each node carrying the pattern's output op, matched against the pattern (a Match, or how far the
    match got and why it stopped);
  - verdict: for a match, whether and how it is fused (`Fuse`: how the values the graph also returns are provided,
    and what it assumes about the graph's inputs; or `Refuse`, with the reason);
  - apply: the fused op in place of the match; what the compiled graph must do at run time goes into the `Plan`;
then near misses: every anchor op left unfused, explained by the attempt that came closest to fusing it.
The plan goes to the backend; the `GraphReport` (what the user reads) holds the sites and near misses.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from . import autocast
from .facts import Assumption
from .lazy import LazyOutput, extract
from .matcher import DtypeOf, Match, MatchFailure, example_value, is_output_cast, op_name, pattern_root, try_match
from .pattern import Assume, OutputCheck, Pattern
from .report import GraphReport, NearMiss, Site, module_path, where


@dataclass
class Plan:
    """What the backend compiles, and what the compiled function must do around it when it runs."""

    gm: GraphModule
    lazy_outputs: list[LazyOutput] = field(default_factory=list)  # outputs computed on first use (lazy.py)
    assumptions: list[Assumption] = field(default_factory=list)  # facts about inputs the fused sites rely on
    output_checks: list[tuple[int, OutputCheck]] = field(default_factory=list)  # (output slot, check) each call

    def clear(self) -> None:
        """Nothing to do at run time (the graph is compiled unchanged). In place: the function dispatching on the
        assumptions (facts.dispatching) holds this list, and with none left it always runs the version built."""
        self.lazy_outputs.clear()
        self.assumptions.clear()
        self.output_checks.clear()


class Returned(enum.Enum):
    """How a fused site provides the interior values the graph also returns (a fused loss's logits); the value is
    what the site's variant says of it."""

    NOTHING = ""  # it returns none
    LAZY = ", logits lazy"  # a LazyTensor computes them from the site's inputs on first use (lazy.py)
    KEPT = ", logits kept"  # the fused op writes them too (Pattern.replace_keeping)


@dataclass(frozen=True)
class Fuse:
    """Verdict: fuse the site; `assuming`: a fact about the graph's inputs the fusion relies on, tested at run time
    (the graph's second version, for inputs without it, does not fuse the site)."""

    returned: Returned = Returned.NOTHING
    assuming: Assumption | None = None


@dataclass(frozen=True)
class Refuse:
    """Verdict: leave the site to Inductor; the reason is its near miss."""

    reason: str


Verdict = Fuse | Refuse


@dataclass(frozen=True)
class _Scope:
    """Where the graph being rewritten sits, which bounds what a verdict may grant."""

    top: Graph  # the outermost graph: an assumption can be tested at run time only if it is about its inputs
    outer: dict[Node, Node]  # for a nested graph: its inputs -> the enclosing graph's values passed to them
    nested: bool  # a nested graph's outputs are not the user's: nothing may be returned lazily from there
    skip_logits: bool
    assume: bool


@dataclass
class _Attempt:
    """A pattern tried at a node and not fused, kept to explain the near misses."""

    pattern: Pattern
    reason: str
    visited: set[Node]  # the graph nodes the matcher looked at
    progress: int | None  # pattern nodes matched before the match stopped; None: matched in full, then refused
    root: Node | None = None  # where the match started (the site's output)


def _closeness(a: _Attempt) -> tuple[bool, int]:
    """A full match refused by its verdict explains a near miss better than any partial one; full matches rank
    equal, so the first tried (the most specific variant) is the one reported."""
    return (a.progress is None, a.progress or 0)


def rewrite(gm: GraphModule, patterns: Iterable[Pattern], index: int = 0, skip_logits: bool = True,
            nested: bool = False, outer: dict[Node, Node] | None = None, assume: bool = True,
            output_checks: Iterable[OutputCheck] = (), top: Graph | None = None) -> tuple[Plan, GraphReport]:
    """Rewrites gm (and the graphs nested in it) in place; returns (plan, report). Exceptions propagate (the backend
    falls back on them). In a nested graph (e.g. an activation-checkpointed layer's body) the outputs are not the
    user's, so no intermediate may be returned lazily there. With `assume`, a site whose check returns an Assume
    about a graph input is fused and the assumption put in the plan for the backend to test at run time;
    `output_checks` name returned values whose facts the compiled graph records (plan.output_checks)."""
    graph = gm.graph
    scope = _Scope(top=top or graph, outer=outer or {}, nested=nested, skip_logits=skip_logits, assume=assume)
    patterns = list(patterns)
    plan = Plan(gm)
    report = GraphReport(index=index, nodes_before=len(graph.nodes))
    if not nested:
        plan.output_checks = _checked_outputs(graph, output_checks)
        report.run_time_checks = [(slot, check.fact) for slot, check in plan.output_checks]
    anchors = _anchors(graph, patterns)
    covered: set[Node] = set()
    attempts: list[_Attempt] = []

    for pattern in patterns:
        for m, failure, visited, root in _candidates(graph, pattern, covered, scope):
            if m is None:
                attempts.append(_Attempt(pattern, failure.reason, visited, failure.progress, root))
                continue
            verdict = _verdict(m, pattern, covered, scope)
            if isinstance(verdict, Refuse):
                attempts.append(_Attempt(pattern, verdict.reason, visited, None, m.root))
                continue
            covered.update(m.nodes)
            report.fused.append(_apply(graph, m, pattern, verdict, plan))

    report.near_misses += _near_misses(anchors, covered, attempts)

    for name, sub in gm.named_children():
        if isinstance(sub, GraphModule):
            call = _call_site(gm, name)
            if call is not None:
                autocast.called_from(sub.graph, call)
            inner_plan, inner = rewrite(sub, patterns, index, skip_logits, nested=True,
                                        outer=_inputs_from_enclosing(call, sub, scope.outer), assume=assume,
                                        top=scope.top)
            report.fused += [Site(s.pattern, s.variant, f"{s.where} [in {name}]", s.modules) for s in inner.fused]
            plan.assumptions += [a for a in inner_plan.assumptions if a not in plan.assumptions]
            report.near_misses += inner.near_misses
            report.nodes_before += inner.nodes_before
            report.nodes_after += inner.nodes_after

    graph.lint()
    gm.recompile()
    report.nodes_after += len(graph.nodes)
    return plan, report


# --- candidates ----------------------------------------------------------------------------------------------------
def _candidates(graph: Graph, pattern: Pattern, covered: set[Node], scope: _Scope
                ) -> Iterator[tuple[Match | None, MatchFailure | None, set[Node], Node]]:
    """The pattern tried at each node carrying its output op, in graph order: (match or None, failure or None,
    graph nodes looked at, the node tried). Lazily: each site fused changes the graph the next tries see (its
    nodes are gone, its users read the fused op)."""
    root_op = op_name(pattern_root(pattern.graph))
    for node in list(graph.nodes):
        if node in covered or node.graph is not graph or op_name(node) != root_op:
            continue
        m, failure, visited = try_match(pattern.graph, node, allow_returned=pattern.returned_ok and not scope.nested)
        if m is not None:
            m.outer = scope.outer
        yield m, failure, visited, node


# --- verdict -------------------------------------------------------------------------------------------------------
def _verdict(m: Match, pattern: Pattern, covered: set[Node], scope: _Scope) -> Verdict:
    if covered.intersection(m.nodes):
        return Refuse("overlaps a site another pattern already fused")
    objection = _subclass_input(m) or _unplaceable(m) or pattern.check(m)
    assuming = None
    if isinstance(objection, Assume):  # fused if every input it is about can be tested at run time
        assuming = _testable(objection, scope)
        objection = None if assuming is not None else objection.unproved
    if objection:
        return Refuse(objection)
    return _providing_returned(m, pattern, scope.skip_logits, assuming)


def _subclass_input(m: Match) -> str | None:
    """Our ops take plain tensors. A tensor subclass reaching a site (a DTensor under tensor/sequence parallelism,
    a quantized or float8 weight) would reach the op, which has no rule for it (DTensor: no sharding strategy);
    the site is left to Inductor, which runs the model's own ops on it."""
    found = {}
    for name, value in m.bindings.items():
        v = example_value(value) if isinstance(value, Node) else None
        if isinstance(v, torch.Tensor) and is_traceable_wrapper_subclass(v):
            found[name] = type(v).__name__
    if not found:
        return None
    names = ", ".join(f"{name} ({kind})" for name, kind in found.items())
    return f"tensor subclass inputs: {names}; the fused op takes plain tensors only"


def _testable(a: Assume, scope: _Scope) -> Assumption | None:
    """The assumption with the input slots it is about, if the compiled function can test them all at run time."""
    if not scope.assume:
        return None
    slots = tuple(_assumable(n, scope.top) for n in (a.node, *a.more))
    return None if None in slots else Assumption(slots, a.fact, a.test)


def _assumable(node: Node, top: Graph) -> int | None:
    """The input slot of a node an assumption is about, if the compiled function of the outermost graph `top` can
    test it at run time (an input of that graph), or None."""
    if node.op != "placeholder" or node.graph is not top:
        return None
    return [n for n in top.nodes if n.op == "placeholder"].index(node)


def _providing_returned(m: Match, pattern: Pattern, skip_logits: bool, assuming: Assumption | None) -> Verdict:
    """Fused, with the interior values the graph also returns provided, if they can be."""
    if not m.returned:
        return Fuse(Returned.NOTHING, assuming)
    values = [example_value(n) for n in m.returned]
    if not all(isinstance(v, torch.Tensor) and v.requires_grad for v in values):
        return Refuse("its intermediate value is returned by a graph without gradients (evaluation); kept as eager "
                      "does")
    if len(m.returned) > 1:
        return Refuse("more than one intermediate value is returned by the graph")
    if skip_logits:
        return Fuse(Returned.LAZY, assuming)
    if any(u.op != "output" for n in m.returned for u in n.users if u not in m.nodes):
        return Refuse("the returned logits are cast on their way out (mixed precision) and skip_logits=False")
    if pattern.replace_keeping is None:
        return Refuse("an intermediate is returned and skip_logits=False")
    return Fuse(Returned.KEPT, assuming)


# --- apply ---------------------------------------------------------------------------------------------------------
def _apply(graph: Graph, m: Match, pattern: Pattern, verdict: Fuse, plan: Plan) -> Site:
    """Replaces the match by the fused op; what the compiled graph must do at run time goes into `plan`."""
    m.pattern = pattern
    modules = tuple(dict.fromkeys(p for p in map(module_path, m.nodes) if p))
    site = Site(pattern.name, _variant(pattern, verdict), where(m.root), modules)
    if verdict.assuming is not None and verdict.assuming not in plan.assumptions:
        plan.assumptions.append(verdict.assuming)
    if verdict.returned is Returned.LAZY:
        _make_lazy(graph, m, plan.lazy_outputs)
    _insert_replacement(graph, m, pattern, keep=verdict.returned is Returned.KEPT)
    return site


def _variant(pattern: Pattern, verdict: Fuse) -> str:
    text = pattern.variant + verdict.returned.value
    if verdict.assuming is not None:
        slots, fact = verdict.assuming.slots, verdict.assuming.fact
        text += (f", if input{'s' * (len(slots) > 1)} {', '.join(map(str, slots))} "
                 f"{'are' if len(slots) > 1 else 'is'} {fact} at run time")
    return text


_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "example_value", "val")


def _insert_replacement(graph: Graph, m: Match, pattern: Pattern, keep: bool = False) -> Node:
    tracer = GraphAppendingTracer(graph)
    args = {}
    for name, value in m.bindings.items():
        if isinstance(value, DtypeOf):
            value = m.dtype(name)
        args[name] = Proxy(value, tracer) if isinstance(value, Node) else value
    with _insertion_point(graph, m):
        if keep:
            out, kept = pattern.replace_keeping(**args)
            (returned,) = m.returned
            _node(kept).meta.update({k: returned.meta[k] for k in _COPIED_META if k in returned.meta})
            returned.replace_all_uses_with(_node(kept), delete_user_cb=lambda u: u.op == "output")
        else:
            out = pattern.replace(**args)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for root, value in zip(m.roots or [m.root], outs):
        new = _node(value)
        for key in _COPIED_META:
            if key in root.meta:
                new.meta[key] = root.meta[key]
        root.replace_all_uses_with(new)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(m.nodes, key=order.__getitem__, reverse=True):  # users before their inputs
        if not n.users:
            graph.erase_node(n)
    return new


def _placement(m: Match) -> tuple[str, Node] | str:
    """Where the fused op goes: before the match's root, unless an input of it is computed after the root (a model
    that rotates q, then computes k and rotates it: the one op for both goes after k, before q's first use); or why
    there is no such place."""
    order = {n: i for i, n in enumerate(m.root.graph.nodes)}
    inputs = [v for v in m.bindings.values() if isinstance(v, Node)]
    last_input = max(inputs, key=order.__getitem__, default=None)
    if last_input is None or order[last_input] < order[m.root]:
        return "before", m.root
    first_use = min((order[u] for r in m.roots or [m.root] for u in r.users), default=len(order))
    if order[last_input] >= first_use:
        return (f"one of its outputs ({m.root.name}) is used before {last_input.name}, an input of the fused op, is "
                "computed")
    return "after", last_input


def _unplaceable(m: Match) -> str | None:
    placement = _placement(m)
    return placement if isinstance(placement, str) else None


def _insertion_point(graph: Graph, m: Match):
    where_to, node = _placement(m)
    return graph.inserting_before(node) if where_to == "before" else graph.inserting_after(node)


def _node(x):
    return x.node if isinstance(x, Proxy) else x


def _returned_forms(node: Node) -> list[Node]:
    """node and the output-only casts of it (accelerate's `logits.float()`): what the graph's output holds."""
    forms = [node]
    for u in node.users:
        if is_output_cast(u):
            forms += _returned_forms(u)
    return forms


def _make_lazy(graph: Graph, m: Match, lazy: list[LazyOutput]) -> None:
    """Replace the returned interior value (as it is or cast) in the graph's outputs by a LazyTensor built after
    the call; the casts then have no use left and go."""
    (returned,) = m.returned
    inputs = [b for b in m.bindings.values() if isinstance(b, Node)]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    forms = _returned_forms(returned)
    for form in forms:
        slots = [i for i, o in enumerate(outs) if o is form]
        if not slots:
            continue
        compute, used = extract(form, inputs)
        start = len(outs)
        for slot in slots:
            outs[slot] = used[0]  # a stand-in; the wrapper puts the LazyTensor there
        outs += used
        ev = example_value(form)
        for slot in slots:
            lazy.append(LazyOutput(slot, slice(start, start + len(used)), compute, ev.dtype, ev.device))
    output.args = (tuple(outs),)
    for cast in reversed(forms[1:]):  # users before what they cast
        graph.erase_node(cast)


# --- near misses ---------------------------------------------------------------------------------------------------
def _anchors(graph: Graph, patterns: list[Pattern]) -> dict[str, list[tuple[Node, str]]]:
    """Per pattern name, the nodes carrying the anchor of any of its variants (a variant that only explains a
    near miss marks its own kind of site) and where they are in the source: taken before the rewrite erases any."""
    ops: dict[str, list] = {}
    for p in patterns:
        if p.anchor and p.anchor not in ops.setdefault(p.name, []):
            ops[p.name].append(p.anchor)

    def marks(anchor, node):
        return op_name(node) == anchor if isinstance(anchor, str) else anchor(node)

    return {name: [(n, where(n)) for n in graph.nodes if any(marks(op, n) for op in anchors)]
            for name, anchors in ops.items()}


def _near_misses(anchors: dict[str, list[tuple[Node, str]]], covered: set[Node], attempts: list[_Attempt]
                 ) -> list[NearMiss]:
    """Each anchor left unfused, with the reason of the attempt that came closest to fusing it: of those that
    looked at the anchor, else of those tried at a node a few ops after it (the site's output: a form whose
    table or cast differs stops there before it reaches the anchor) that matched more than that node's op (any
    product matches a pattern's final product, which says nothing of the site)."""
    misses = []
    for name, nodes in anchors.items():
        for a, place in nodes:
            if a in covered:
                continue
            tried = [t for t in attempts if t.pattern.name == name and a in t.visited]
            if not tried:
                after = _downstream(a)
                tried = [t for t in attempts if t.pattern.name == name and t.root in after
                         and (t.progress is None or t.progress > 1)]
            if tried:
                best = max(tried, key=_closeness)
                reason = f"[{best.pattern.variant}] {best.reason}"
            else:
                reason = "no variant of this pattern matches the code around it"
                if _returned_soon(a):
                    reason += ("; this graph returns a value computed from it, so the rest of the site may be in "
                               "the next graph (a graph break, or a DDP bucket boundary under compiled DDP)")
            misses.append(NearMiss(name, place, reason))
    return misses


def _downstream(node: Node, steps: int = 4) -> set[Node]:
    """The nodes at most `steps` uses after `node` (not node itself)."""
    found, frontier = set(), {node}
    for _ in range(steps):
        frontier = {u for n in frontier for u in n.users if u.op != "output"} - found
        found |= frontier
    return found


def _returned_soon(node: Node, steps: int = 3) -> bool:
    """Whether the graph returns `node` or a value at most `steps` ops after it (a site cut by a graph split)."""
    frontier = {node}
    for _ in range(steps + 1):
        if any(u.op == "output" for n in frontier for u in n.users):
            return True
        frontier = {u for n in frontier for u in n.users}
    return False


# --- graphs --------------------------------------------------------------------------------------------------------
def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of gm's graph (parameters shared; nested graphs, such as the bodies of
    activation-checkpointed regions, copied too), so the original stays intact."""
    graph = Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    new = GraphModule(gm, graph, gm.__class__.__name__)
    for name, sub in list(new.named_children()):
        if isinstance(sub, GraphModule):
            setattr(new, name, copy_graph_module(sub))
    return new


def _checked_outputs(graph: Graph, checks: Iterable[OutputCheck]) -> list[tuple[int, OutputCheck]]:
    """(output slot, check) for each returned tensor a check wants to look at when the graph runs."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    found = []
    for slot, node in enumerate(outs):
        value = example_value(node) if isinstance(node, Node) else None
        if isinstance(value, torch.Tensor):
            found += [(slot, c) for c in checks if c.candidate(value)]
    return found


def _call_site(gm: GraphModule, name: str) -> Node | None:
    """The node that calls gm's child `name` as op(body, *operands), where exactly one does."""
    getattrs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    calls = [u for g in getattrs for u in g.users if u.op == "call_function" and u.args and u.args[0] is g]
    return calls[0] if len(calls) == 1 else None


def _inputs_from_enclosing(call: Node | None, body: GraphModule, outer: dict[Node, Node]) -> dict[Node, Node]:
    """For a body called once by a higher-order op as op(body, *operands): body input i -> operand i."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if call is None or len(call.args) - 1 != len(placeholders):
        return {}
    return {**outer, **dict(zip(placeholders, call.args[1:]))}
