"""The `liger` backend: rewrite the Dynamo graph with our patterns, then hand it to Inductor."""
from __future__ import annotations

import itertools
import logging
import os
import traceback

from torch._dynamo.exc import RestartAnalysis
from torch.fx import GraphModule

from . import options as _options
from .lazy import wrap_outputs
from .pattern import all_patterns
from .report import GraphReport
from .rewrite import copy_graph_module, rewrite

log = logging.getLogger("liger_compile")
_graph_ids = itertools.count()


def _dump(directory: str, index: int, before: GraphModule, after: GraphModule | None, report: GraphReport):
    os.makedirs(directory, exist_ok=True)
    stem = os.path.join(directory, f"graph_{index:03d}")
    with open(f"{stem}_before.py", "w") as f:
        f.write(before.print_readable(print_output=False))
    if after is not None:
        with open(f"{stem}_after.py", "w") as f:
            f.write(after.print_readable(print_output=False))
    with open(f"{stem}_report.txt", "w") as f:
        f.write(str(report) + "\n")


def rewrite_graph(gm: GraphModule, opts: _options.Options) -> tuple[GraphModule, GraphReport]:
    """Returns (graph to compile, report). Never raises when opts.fallback: the original graph comes back."""
    index = next(_graph_ids)
    patterns = [p for p in all_patterns() if p.name not in opts.disable]
    new_gm = None
    try:
        new_gm = copy_graph_module(gm)
        report = rewrite(new_gm, patterns, index=index, skip_logits=opts.skip_logits)
        result = new_gm
    except RestartAnalysis:
        raise
    except Exception as e:
        if not opts.fallback:
            raise
        report = GraphReport(index=index, nodes_before=len(gm.graph.nodes), nodes_after=len(gm.graph.nodes))
        report.fallback = f"{type(e).__name__}: {e}"
        log.warning("liger_compile: rewrite of graph %d failed, compiling it unchanged with Inductor: %s\n%s",
                    index, report.fallback, traceback.format_exc(limit=4))
        result, new_gm = gm, None
    counts = ", ".join(f"{k}={v}" for k, v in report.counts.items()) or "nothing fused"
    log.info("liger_compile: graph %d: %s; %d near misses", index, counts, len(report.near_misses))
    if opts.dump:
        _dump(opts.dump, index, gm, new_gm, report)
    if opts.report is not None:
        opts.report.add(report)
    return result, report


def liger_backend(gm: GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """`torch.compile(model, backend="liger", mode=..., options=...)` lands here."""
    opts = _options.parse(mode, options)
    compiled_gm, report = rewrite_graph(gm, opts)
    if not opts.inductor:
        return wrap_outputs(compiled_gm.forward, report.lazy_outputs)
    from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

    if report.fused:
        try:
            compiled = compile_fx(compiled_gm, example_inputs, config_patches=opts.inductor_config)
            return wrap_outputs(compiled, report.lazy_outputs)
        except RestartAnalysis:
            # Dynamo's own control flow (e.g. specialising a float scalar and tracing again): not a failure. The
            # graph will come back re-traced; its report is the one that counts.
            if opts.report is not None and report in opts.report.graphs:
                opts.report.graphs.remove(report)
            raise
        except Exception as e:
            if not opts.fallback:
                raise
            report.fallback = f"Inductor failed on the rewritten graph: {type(e).__name__}: {e}"
            report.lazy_outputs.clear()
            log.warning("liger_compile: %s; compiling graph %d unchanged", report.fallback, report.index)
    return compile_fx(gm, example_inputs, config_patches=opts.inductor_config)
