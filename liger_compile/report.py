"""What the rewrite did: fused sites and near misses, per graph and summed."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from torch.fx import Node


def module_path(node: Node) -> str:
    """The path of the module the node's op ran in, as Dynamo recorded it ("" for none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", str(path))
    # the local the compiled frame reached the module from: L['self'], L['args'][0], L['fn'], or a value a
    # resumed frame carries over a graph break (L['__resume_frame_values'][2]); the path is relative to it
    return re.sub(r"^L\[[^\]]+\](\[[^\]]+\])*\.?", "", path)


def where(node: Node) -> str:
    """Source line and module path, as Dynamo recorded them on the node."""
    text = ""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', trace)
    if frames:
        path, line, fn = frames[-1]
        text = f"{path.rsplit('/', 1)[-1]}:{line} in {fn}"
    if node.meta.get("nn_module_stack"):
        path = module_path(node)
        text = f"{path} ({text})" if text else path
    return text or node.name


@dataclass
class Site:
    pattern: str
    variant: str
    where: str  # the site's output
    # every module an op of the site ran in (a norm module's call with the casts its caller put around it)
    modules: tuple[str, ...] = ()


@dataclass
class NearMiss:
    pattern: str
    where: str
    reason: str


@dataclass
class GraphReport:
    index: int
    fused: list[Site] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    fallback: str | None = None  # set when the rewrite failed and the graph went to Inductor untouched
    nodes_before: int = 0
    nodes_after: int = 0
    # (output slot, fact) the compiled graph records of its outputs when it runs (liger_compile/facts.py)
    run_time_checks: list[tuple[int, str]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(s.pattern for s in self.fused))

    def __str__(self) -> str:
        lines = [f"graph {self.index}: {self.nodes_before} nodes -> {self.nodes_after} after rewrite"]
        if self.fallback:
            lines.append(f"  FELL BACK to plain Inductor: {self.fallback}")
        by_pattern: dict[str, list[Site]] = {}
        for s in self.fused:
            by_pattern.setdefault(s.pattern, []).append(s)
        if by_pattern:
            lines.append(f"  {'pattern':<22} {'count':>5}  where")
            for name, sites in by_pattern.items():
                for i, s in enumerate(sites):
                    head = f"  {name:<22} {len(sites):>5}" if i == 0 else f"  {'':<22} {'':>5}"
                    lines.append(f"{head}  [{s.variant}] {s.where}")
        else:
            lines.append("  nothing fused")
        for miss in self.near_misses:
            lines.append(f"  near miss {miss.pattern}: {miss.where}: {miss.reason}")
        for slot, fact in self.run_time_checks:
            lines.append(f"  run-time check: output {slot} is recorded as {fact} when it is one")
        return "\n".join(lines)


class Report:
    """`counts` sums fused sites over every graph; `print(report)` shows each graph's table."""

    def __init__(self, known: list[str] | None = None):
        self.graphs: list[GraphReport] = []
        self._known = list(known) if known is not None else None

    def add(self, graph_report: GraphReport) -> None:
        self.graphs.append(graph_report)

    @property
    def counts(self) -> dict[str, int]:
        if self._known is None:  # looked up when first read: pattern discovery imports every op's kernels
            from .pattern import pattern_names  # noqa: PLC0415

            self._known = pattern_names()
        total = {name: 0 for name in self._known}
        for g in self.graphs:
            for name, n in g.counts.items():
                total[name] = total.get(name, 0) + n
        return total

    @property
    def near_misses(self) -> list[NearMiss]:
        return [m for g in self.graphs for m in g.near_misses]

    @property
    def fallbacks(self) -> list[str]:
        return [g.fallback for g in self.graphs if g.fallback]

    def __str__(self) -> str:
        head = "liger_compile report: " + ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return "\n".join([head, *(str(g) for g in self.graphs)])

    __repr__ = __str__
