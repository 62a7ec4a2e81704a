"""What Inductor is left to call as opaque ops: the lm_head ops, once per graph, and the LoRA projection
(kernels/lora_linear.py says why), never another op per layer. An opaque op costs a trip
through the dispatcher and Python at every call. The ops torch.compile traces into (triton_ops: norms, rotary, the
gated MLP) leave no node of their own in the graphs Inductor compiles."""
import pytest
import torch

from models import batch
from test_gated_down_proj_fusion import EVERY_PROJECTION, lora_model

pytest.importorskip("peft")
HEAD_OPS = {"linear_cross_entropy", "token_logprobs", "token_logprobs_backward", "linear_jsd"}
LORA_OPS = {"lora_linear", "lora_linear_backward"}


class OpaqueCalls(torch._inductor.custom_graph_pass.CustomGraphPass):
    """Records the liger:: ops of every graph Inductor compiles (after AOTAutograd: forward and backward)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, graph):
        self.graphs.append([n.target._opname for n in graph.nodes if n.op == "call_function"
                            and isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "liger"])

    def uuid(self):
        return None  # never from the cache: the pass must see each graph


def test_lora_model_leaves_only_the_head_and_the_adapters_opaque():
    model, calls = lora_model(EVERY_PROJECTION), OpaqueCalls()
    compiled = torch.compile(model, backend="liger", options={"post_grad_custom_post_pass": calls})
    compiled(**batch()).loss.backward()
    assert len(calls.graphs) >= 2, calls.graphs  # a forward and a backward
    opaque = [name for graph in calls.graphs for name in graph]
    assert set(opaque) <= HEAD_OPS | LORA_OPS, calls.graphs
    assert all(sum(name in HEAD_OPS for name in graph) <= 1 for graph in calls.graphs), calls.graphs
    assert opaque.count("lora_linear") == opaque.count("lora_linear_backward") > 0, calls.graphs
