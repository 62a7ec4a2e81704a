"""The `liger` backend: rewrite the Dynamo graph with our patterns, then hand it to Inductor."""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import traceback

import torch
from torch._dynamo.exc import RestartAnalysis
from torch.fx import GraphModule

from . import cache_key, facts, kernel_analysis, offload
from . import options as _options
from .lazy import wrap_outputs
from .pattern import all_output_checks, all_patterns, off_by_default
from .report import GraphReport, Site
from .rewrite import Plan, copy_graph_module, rewrite

log = logging.getLogger("liger_compile")
try:
    from torch._dynamo.utils import dynamo_timed as _timed
except ImportError:  # a private helper: without it the rewrite is simply not in the compile-time metrics
    _timed = contextlib.nullcontext
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


def rewrite_graph(gm: GraphModule, opts: _options.Options, assume: bool = True, index: int | None = None,
                  record: bool = True) -> tuple[Plan, GraphReport]:
    """Returns (plan: the graph to compile and what to do around it at run time, report). Never raises when
    opts.fallback: the plan is then the original graph, with nothing to do at run time.
    `assume`: whether sites may be fused on assumptions tested at run time (liger_compile/facts.py); `record`:
    whether the report and dump count this rewrite (not for a graph's second version without assumptions)."""
    if index is None:  # numbered per report (each `explain` call starts at 0), else per process
        index = len(opts.report.graphs) if opts.report is not None else next(_graph_ids)
    off = off_by_default() - set(opts.enable)
    patterns = [p for p in all_patterns() if p.name not in opts.disable and p.name not in off]
    checks = [c for c in all_output_checks() if c.fact not in opts.disable]
    new_gm = None
    try:
        new_gm = copy_graph_module(gm)
        plan, report = rewrite(new_gm, patterns, index=index, skip_logits=opts.skip_logits, assume=assume,
                               output_checks=checks)
    except RestartAnalysis:
        raise
    except Exception as e:
        if not opts.fallback:
            raise
        report = GraphReport(index=index, nodes_before=len(gm.graph.nodes), nodes_after=len(gm.graph.nodes))
        report.fallback = f"{type(e).__name__}: {e}"
        log.warning("liger_compile: rewrite of graph %d failed, compiling it unchanged with Inductor: %s\n%s",
                    index, report.fallback, traceback.format_exc(limit=4))
        plan, new_gm = Plan(gm), None
    if not record:
        return plan, report
    counts = ", ".join(f"{k}={v}" for k, v in report.counts.items()) or "nothing fused"
    log.info("liger_compile: graph %d: %s; %d near misses", index, counts, len(report.near_misses))
    log.debug("liger_compile: %s", report)  # the table explain() prints: each site's variant, every near miss
    if opts.dump:
        _dump(opts.dump, index, gm, new_gm, report)
    if opts.report is not None:
        opts.report.add(report)
    return plan, report


def _finish(compiled, plan: Plan):
    """The compiled graph function as Dynamo gets it: facts of its outputs recorded, lazy logits in place."""
    return wrap_outputs(facts.checking_outputs(compiled, plan.output_checks), plan.lazy_outputs)


def _symbolic(example_inputs) -> bool:
    return any(isinstance(x, torch.SymInt) or (isinstance(x, torch.Tensor) and not all(
        isinstance(d, int) for d in x.shape)) for x in example_inputs)


def _without_assumptions(gm: GraphModule, inputs, opts: _options.Options, report: GraphReport):
    """The graph's second version, for inputs its assumptions do not hold for: every other fusion, none that
    assumed. Compiled for the inputs at hand (the graph's shapes are static), or run as it is if that fails."""
    fb_plan, fb_report = rewrite_graph(gm, opts, assume=False, index=report.index, record=False)
    report.near_misses += [m for m in fb_report.near_misses if m not in report.near_misses]
    first = {(s.pattern, s.where) for s in report.fused}
    report.fused += [Site(s.pattern, f"{s.variant}, for inputs the assumptions do not hold for", s.where, s.modules)
                     for s in fb_report.fused if (s.pattern, s.where) not in first]
    log.info("liger_compile: graph %d received inputs its fusions' run-time assumptions do not hold for; its "
             "version without them is compiled for such inputs", report.index)
    if not opts.inductor:
        return _finish(fb_plan.gm.forward, fb_plan)
    try:
        return _finish(_inductor(fb_plan.gm, inputs, opts), fb_plan)
    except Exception as e:  # correct either way: the rewritten graph runs uncompiled
        log.warning("liger_compile: compiling graph %d without its assumptions failed (%s); it runs eagerly",
                    report.index, e)
        return _finish(fb_plan.gm.forward, fb_plan)


def _inductor(gm: GraphModule, example_inputs, opts: _options.Options):
    """Inductor's compile_fx with the user's config patches, our sources in its cache key, and our activation
    offloading when asked for."""
    from torch._inductor.compile_fx import compile_fx  # noqa: PLC0415

    config = cache_key.stamped(opts.inductor_config)
    if not opts.offload_activations:
        return compile_fx(gm, example_inputs, config_patches=config)
    if not offload.supported():
        log.warning("liger_compile: this torch has no activation offloading in AOTAutograd; option "
                    "offload_activations is ignored")
        return compile_fx(gm, example_inputs, config_patches=config)
    try:
        with offload.partitioner_config():
            return compile_fx(gm, example_inputs, config_patches=offload.inductor_config(config))
    except RestartAnalysis:
        raise
    except Exception as e:  # a memory option must not cost the compile: the same graph without it
        if not opts.fallback:
            raise
        log.warning("liger_compile: compiling with offload_activations failed (%s: %s); compiling without it",
                    type(e).__name__, e)
        return compile_fx(gm, example_inputs, config_patches=config)


def _triton_set_up_as_inductor() -> None:
    """The kernels our ops launch themselves compile in this process with Triton's own defaults unless told
    otherwise, and two of those defaults are set by Inductor only when it compiles a kernel itself (not when it
    loads one from its cache): TRITON_CACHE_DIR (its own cache directory) and TRITON_PTXAS_PATH (the ptxas shipped
    with torch; the ptxas version is part of Triton's cache key). Without this a warm restart, where Inductor
    compiles nothing, looked for our kernels in another directory under another key, and compiled them again.
    Set both as Inductor would, before anything compiles."""
    if not torch.cuda.is_available():
        return
    # private helpers of torch, each on its own: one a torch lacks is left to Inductor (a restart may recompile)
    if "TRITON_CACHE_DIR" not in os.environ:
        try:
            from torch._inductor.runtime.cache_dir_utils import triton_cache_dir  # noqa: PLC0415
        except ImportError:
            pass
        else:
            os.environ["TRITON_CACHE_DIR"] = triton_cache_dir(torch.cuda.current_device())
    try:
        from torch._inductor.runtime.compile_tasks import _set_triton_ptxas_path  # noqa: PLC0415
    except ImportError:
        return
    _set_triton_ptxas_path()  # leaves a TRITON_PTXAS_PATH the user set


def liger_backend(gm: GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """`torch.compile(model, backend="liger", mode=..., options=...)` lands here."""
    _triton_set_up_as_inductor()
    kernel_analysis.install()
    opts = _options.parse(mode, options)
    with _timed("liger_compile.rewrite"):  # listed by torch._dynamo.utils.compile_times() beside Inductor's phases
        plan, report = rewrite_graph(gm, opts)
    if not plan.assumptions:
        return _compile(gm, plan, example_inputs, opts, report)
    if _symbolic(example_inputs):  # no concrete shapes to compile either version for later: build both now
        fn = _compile(gm, plan, example_inputs, opts, report)
        fallback = _without_assumptions(gm, example_inputs, opts, report)
        return facts.dispatching(lambda inputs: fn, plan.assumptions, lambda inputs: fallback)
    # static shapes: each version is compiled when the first call that needs it comes (a trainer whose batches
    # never pass the test, e.g. left-padded ones, compiles one version, not two)
    return facts.dispatching(lambda inputs: _compile(gm, plan, inputs, opts, report), plan.assumptions,
                             lambda inputs: _without_assumptions(gm, inputs, opts, report))


def _compile(gm: GraphModule, plan: Plan, example_inputs, opts: _options.Options, report: GraphReport):
    """Inductor on the rewritten graph; on the original graph (no fusions, no assumptions) if that fails."""
    if not opts.inductor:
        return _finish(plan.gm.forward, plan)
    if report.fused or plan.output_checks:
        try:
            compiled = _inductor(plan.gm, example_inputs, opts)
            return _finish(compiled, plan)
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
            report.run_time_checks.clear()
            plan.clear()
            log.warning("liger_compile: %s; compiling graph %d unchanged", report.fallback, report.index)
    return _inductor(gm, example_inputs, opts)
