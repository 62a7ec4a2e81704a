"""Find every pattern in a Dynamo graph and replace it with its fused op; record what happened and why not."""
from __future__ import annotations

from typing import Iterable

from torch.fx import Graph, GraphModule, Node
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import torch

from .lazy import LazyOutput, extract
from .matcher import DtypeOf, Match, MatchFailure, example_value, is_output_cast, op_name, pattern_root, try_match
from .pattern import Assume, OutputCheck, Pattern
from .report import GraphReport, NearMiss, Site, where

_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "example_value", "val")


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


def _node(x):
    return x.node if isinstance(x, Proxy) else x


def _insert_replacement(graph: Graph, m: Match, pattern: Pattern, keep: bool = False) -> Node:
    tracer = GraphAppendingTracer(graph)
    args = {}
    for name, value in m.bindings.items():
        if isinstance(value, DtypeOf):
            value = m.dtype(name)
        args[name] = Proxy(value, tracer) if isinstance(value, Node) else value
    with graph.inserting_before(m.root):
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


def _returned_soon(node: Node, steps: int = 3) -> bool:
    """Whether the graph returns `node` or a value at most `steps` ops after it (a site cut by a graph split)."""
    frontier = {node}
    for _ in range(steps + 1):
        if any(u.op == "output" for n in frontier for u in n.users):
            return True
        frontier = {u for n in frontier for u in n.users}
    return False


def _returned_policy(m: Match, pattern: Pattern, skip_logits: bool) -> str:
    """How to provide the interior values the graph also returns: 'none' needed, 'lazy', 'keep', or a reason."""
    if not m.returned:
        return "none"
    values = [example_value(n) for n in m.returned]
    if not all(isinstance(v, torch.Tensor) and v.requires_grad for v in values):
        return "its intermediate value is returned by a graph without gradients (evaluation); kept as eager does"
    if len(m.returned) > 1:
        return "more than one intermediate value is returned by the graph"
    if skip_logits:
        return "lazy"
    if any(u.op != "output" for n in m.returned for u in n.users if u not in m.nodes):
        return "the returned logits are cast on their way out (mixed precision) and skip_logits=False"
    return "keep" if pattern.replace_keeping is not None else "an intermediate is returned and skip_logits=False"


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


def _inputs_from_enclosing(gm: GraphModule, name: str, body: GraphModule, outer: dict[Node, Node]
                           ) -> dict[Node, Node]:
    """For a body called once by a higher-order op as op(body, *operands): body input i -> operand i."""
    getattrs = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name]
    calls = [u for g in getattrs for u in g.users if u.op == "call_function" and u.args and u.args[0] is g]
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(calls) != 1 or len(calls[0].args) - 1 != len(placeholders):
        return {}
    return {**outer, **dict(zip(placeholders, calls[0].args[1:]))}


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


def _assumable(node: Node, top: Graph) -> int | None:
    """The input slot of a node an assumption is about, if the compiled function of the outermost graph `top` can
    test it at run time (an input of that graph), or None."""
    if node.op != "placeholder" or node.graph is not top:
        return None
    return [n for n in top.nodes if n.op == "placeholder"].index(node)


def rewrite(gm: GraphModule, patterns: Iterable[Pattern], index: int = 0, skip_logits: bool = True,
            nested: bool = False, outer: dict[Node, Node] | None = None, assume: bool = True,
            output_checks: Iterable[OutputCheck] = (), top: Graph | None = None) -> GraphReport:
    """Rewrites gm (and the graphs nested in it) in place; returns the report. Exceptions propagate (the backend
    falls back on them). In a nested graph (e.g. an activation-checkpointed layer's body) the outputs are not the
    user's, so no intermediate may be returned lazily there. With `assume`, a site whose check returns an Assume
    about a graph input is fused and the assumption recorded (report.assumptions) for the backend to test at run
    time; `output_checks` name returned values whose facts the compiled graph records (report.output_checks)."""
    graph = gm.graph
    top = top or graph  # the graph whose inputs an assumption may be about
    patterns = list(patterns)
    report = GraphReport(index=index, nodes_before=len(graph.nodes))
    if not nested:
        report.output_checks = _checked_outputs(graph, output_checks)
    anchors = [(p.name, p.anchor) for p in patterns if p.anchor]
    anchor_nodes = {name: [n for n in graph.nodes if op_name(n) == op] for name, op in dict(anchors).items()}
    node_where = {n: where(n) for ns in anchor_nodes.values() for n in ns}
    covered: set[Node] = set()
    failures: list[tuple[Pattern, MatchFailure, set[Node]]] = []

    for pattern in patterns:
        root_op = op_name(pattern_root(pattern.graph))
        for node in list(graph.nodes):
            if node in covered or node.graph is not graph or op_name(node) != root_op:
                continue
            m, failure, visited = try_match(pattern.graph, node, allow_returned=pattern.returned_ok and not nested)
            if m is not None and covered.intersection(m.nodes):
                m, failure = None, MatchFailure("overlaps a site another pattern already fused", 10**6)
            policy, assumed = "none", None
            if m is not None:
                m.outer = outer or {}
                reason = _subclass_input(m) or pattern.check(m)
                if isinstance(reason, Assume):  # fused if every input it is about can be tested at run time
                    slots = tuple(_assumable(n, top) if assume else None for n in (reason.node, *reason.more))
                    assumed, reason = (None, reason.unproved) if None in slots else (
                        (slots, reason.fact, reason.test), None)
                policy = _returned_policy(m, pattern, skip_logits) if not reason else "none"
                reason = reason or (policy if policy not in ("none", "lazy", "keep") else None)
                if reason:
                    m, failure = None, MatchFailure(reason, 10**6)
            if m is None:
                failures.append((pattern, failure, visited))
                continue
            m.pattern = pattern
            variant = pattern.variant + {"lazy": ", logits lazy", "keep": ", logits kept"}.get(policy, "")
            if assumed is not None:
                slots, fact, _ = assumed
                variant += (f", if input{'s' * (len(slots) > 1)} {', '.join(map(str, slots))} "
                            f"{'are' if len(slots) > 1 else 'is'} {fact} at run time")
                if assumed not in report.assumptions:
                    report.assumptions.append(assumed)
            site = Site(pattern.name, variant, where(m.root))
            covered.update(m.nodes)
            if policy == "lazy":
                _make_lazy(graph, m, report.lazy_outputs)
            _insert_replacement(graph, m, pattern, keep=policy == "keep")
            report.fused.append(site)

    for name, nodes in anchor_nodes.items():
        for a in nodes:
            if a in covered:
                continue
            tried = [(f, p) for p, f, visited in failures if p.name == name and a in visited]
            if tried:
                best, p = max(tried, key=lambda t: t[0].progress)
                reason = f"[{p.variant}] {best.reason}"
            else:
                reason = "no variant of this pattern matches the code around it"
                if _returned_soon(a):
                    reason += ("; this graph returns a value computed from it, so the rest of the site may be in "
                               "the next graph (a graph break, or a DDP bucket boundary under compiled DDP)")
            report.near_misses.append(NearMiss(name, node_where[a], reason))

    for name, sub in gm.named_children():
        if isinstance(sub, GraphModule):
            inner = rewrite(sub, patterns, index, skip_logits, nested=True,
                            outer=_inputs_from_enclosing(gm, name, sub, outer or {}), assume=assume, top=top)
            report.fused += [Site(s.pattern, s.variant, f"{s.where} [in {name}]") for s in inner.fused]
            report.assumptions += [a for a in inner.assumptions if a not in report.assumptions]
            report.near_misses += inner.near_misses
            report.nodes_before += inner.nodes_before
            report.nodes_after += inner.nodes_after

    graph.lint()
    gm.recompile()
    report.nodes_after += len(graph.nodes)
    return report
