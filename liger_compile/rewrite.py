"""Find every pattern in a Dynamo graph and replace it with its fused op; record what happened and why not."""
from __future__ import annotations

from typing import Iterable

from torch.fx import Graph, GraphModule, Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from .matcher import DtypeOf, Match, MatchFailure, op_name, pattern_root, try_match
from .pattern import Pattern
from .report import GraphReport, NearMiss, Site, where

_COPIED_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "example_value", "val")


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A new GraphModule over a copy of gm's graph (parameters shared), so the original stays intact."""
    graph = Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return GraphModule(gm, graph, gm.__class__.__name__)


def _insert_replacement(graph: Graph, m: Match, pattern: Pattern) -> Node:
    tracer = GraphAppendingTracer(graph)
    args = {}
    for name, value in m.bindings.items():
        if isinstance(value, DtypeOf):
            value = m.dtype(name)
        args[name] = Proxy(value, tracer) if isinstance(value, Node) else value
    with graph.inserting_before(m.root):
        out = pattern.replace(**args)
    new = out.node if isinstance(out, Proxy) else out
    for key in _COPIED_META:
        if key in m.root.meta:
            new.meta[key] = m.root.meta[key]
    m.root.replace_all_uses_with(new)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(m.nodes, key=order.__getitem__, reverse=True):  # users before their inputs
        if not n.users:
            graph.erase_node(n)
    return new


def rewrite(gm: GraphModule, patterns: Iterable[Pattern], index: int = 0) -> GraphReport:
    """Rewrites gm in place; returns the report. Exceptions propagate (the backend falls back on them)."""
    graph = gm.graph
    patterns = list(patterns)
    report = GraphReport(index=index, nodes_before=len(graph.nodes))
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
            m, failure, visited = try_match(pattern.graph, node)
            if m is not None and covered.intersection(m.nodes):
                m, failure = None, MatchFailure("overlaps a site another pattern already fused", 10**6)
            if m is not None:
                reason = pattern.check(m)
                if reason:
                    m, failure = None, MatchFailure(reason, 10**6)
            if m is None:
                failures.append((pattern, failure, visited))
                continue
            m.pattern = pattern
            site = Site(pattern.name, pattern.variant, where(m.root))
            covered.update(m.nodes)
            _insert_replacement(graph, m, pattern)
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
            report.near_misses.append(NearMiss(name, node_where[a], reason))

    graph.lint()
    gm.recompile()
    report.nodes_after = len(graph.nodes)
    return report
