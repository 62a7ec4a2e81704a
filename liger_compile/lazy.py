"""Graph outputs computed only if they are read: how a training graph returns `logits` without materialising them.

A fused loss never builds the [tokens, vocab] logits, but the model still returns them. In a training graph the
rewrite replaces that output with a `LazyTensor`: it has the right shape, dtype and device, and the first time any
operation touches it, it computes the real values from the tensors it was made from (the last hidden state and the
lm_head weight), with the model's own code for them (a copy of that part of the graph). If those tensors changed
in place since (an optimizer step), it raises instead of returning numbers for other weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node
from torch.utils._pytree import tree_map

SKIP_LOGITS_HINT = (
    "liger_compile did not keep the logits of this training step (the fused loss never builds them). "
    "Compile with options={'skip_logits': False} to get real logits from the fused op."
)


class LazyTensor(torch.Tensor):
    """A tensor whose values are computed from `inputs` by `compute` on first use."""

    @staticmethod
    def __new__(cls, compute, inputs, shape, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)

    def __init__(self, compute, inputs, shape, dtype, device):
        self._compute = compute
        self._inputs = inputs
        self._versions = [t._version if isinstance(t, torch.Tensor) else None for t in inputs]
        self._value = None

    def materialize(self) -> torch.Tensor:
        if self._value is None:
            for t, v in zip(self._inputs, self._versions):
                if isinstance(t, torch.Tensor) and t._version != v:
                    raise RuntimeError(
                        "these logits would be computed with weights that changed after the forward pass "
                        "(e.g. an optimizer step). " + SKIP_LOGITS_HINT
                    )
            with torch.no_grad():
                self._value = self._compute(*self._inputs)
            self._inputs = None  # the hidden state is no longer needed
        return self._value

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def real(x):
            return x.materialize() if isinstance(x, LazyTensor) else x

        return func(*tree_map(real, args), **tree_map(real, kwargs or {}))

    def __repr__(self, *, tensor_contents=None):
        state = "computed" if self._value is not None else "not computed yet; computed on first use"
        return f"LazyTensor(shape={tuple(self.shape)}, dtype={self.dtype}, {state})"


@dataclass
class LazyOutput:
    """Output slot `slot` of a graph is computed by `compute` from the graph's extra outputs `extra`."""

    slot: int
    extra: slice
    compute: GraphModule
    dtype: torch.dtype
    device: torch.device


def extract(returned: Node, inputs: list[Node], outer: dict[Node, Node] | None = None
            ) -> tuple[GraphModule, list[Node]]:
    """A GraphModule computing `returned` from those of `inputs` it depends on (copied from the graph), and
    those inputs. Raises if `returned` depends on anything else. `outer` maps the inputs of a nested graph (the body
    of an activation-checkpointed region) to the values the enclosing graph passes in, so the copy can follow them."""
    graph = Graph()
    env: dict[Node, Node] = {}
    outer = outer or {}
    for i, n in enumerate(inputs):
        env[n] = graph.placeholder(f"in{i}")

    def copy(n: Node) -> Node:
        if n not in env:
            if n.op == "placeholder" and n in outer:
                env[n] = copy(outer[n])
                return env[n]
            if n.op not in ("call_function", "call_method"):
                raise ValueError(f"{returned.name} depends on the graph input {n.name}")
            for a in n.all_input_nodes:
                copy(a)
            env[n] = graph.node_copy(n, lambda a: env[a])
        return env[n]

    graph.output(copy(returned))
    used = []
    for n in inputs:
        if env[n].users:
            used.append(n)
        else:
            graph.erase_node(env[n])
    return GraphModule(torch.nn.Module(), graph), used


def wrap_outputs(compiled, lazy: list[LazyOutput]):
    """Wraps a compiled graph function so the lazy slots come back as LazyTensors and extras are dropped."""
    if not lazy:
        return compiled
    keep = min(l.extra.start for l in lazy)

    def run(*args):
        outs = list(compiled(*args))  # arguments passed through untouched, boxed or not
        for l in lazy:
            inputs = outs[l.extra]
            outs[l.slot] = LazyTensor(l.compute, inputs, _shape_of(l.compute, inputs), l.dtype, l.device)
        return outs[:keep]

    run._liger_lazy = lazy  # visible for debugging
    run._boxed_call = getattr(compiled, "_boxed_call", False)  # Dynamo calls boxed functions with one list
    return run


def _shape_of(compute: GraphModule, inputs) -> torch.Size:
    metas = [torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
             if isinstance(t, torch.Tensor) else t for t in inputs]
    with torch.no_grad():
        return compute(*metas).shape
