"""Option offload_activations: with gradient checkpointing the decoder layers' saved inputs are moved off the
GPU in forward and back in backward by AOTAutograd's offloading pass, and the step's loss and gradients are exactly
those without it. On CPU the move is a copy on the same device: the test proves the routing and the numbers; on a
GPU the copies run asynchronously into pinned memory."""
from __future__ import annotations

import copy

import pytest
import torch

from liger_compile import offload
from liger_compile import options as liger_options
from models import DEVICE, batch, loss_and_grads, tiny

pytestmark = pytest.mark.skipif(not offload.supported(), reason="this torch has no AOTAutograd activation offloading")


@pytest.fixture
def offloaded(monkeypatch):
    """Names of the forward-graph values each compile offloaded, read where AOTAutograd inserts the moves."""
    from torch._functorch._activation_offloading import activation_offloading as ao  # noqa: PLC0415

    names, original = [], ao.enable_activation_offloading

    def spy(fwd, bwd, *args):
        original(fwd, bwd, *args)
        names.append(sorted(n.name for n in fwd.graph.nodes if n.name.startswith(ao.CPU_OFFLOAD_PREFIX)))

    monkeypatch.setattr(ao, "enable_activation_offloading", spy)
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # every compile partitions anew
    monkeypatch.setattr(offload, "MIN_BYTES", 256)  # the tiny model's layer inputs: 2 x 16 x 32 x 4 bytes
    return names


@pytest.fixture
def our_copies(monkeypatch):
    """(copies out, copies back) in each graph Inductor compiles, after the pass that makes them ours."""
    counts, original = [], offload.AsyncCopies.__call__

    def spy(self, graph):
        original(self, graph)
        calls = [n.target for n in graph.nodes if n.op == "call_function"]
        liger = torch.ops.liger
        counts.append((calls.count(liger.offload_to_host.default),
                       calls.count(liger.reload_from_host.default) + calls.count(liger.take_prefetched.default)))
        # the first value back comes on the compute stream, every later one through a prefetch started after the
        # value before it came back
        assert calls.count(liger.prefetch_to_device.default) == calls.count(liger.take_prefetched.default)
        assert calls.count(liger.reload_from_host.default) <= 1
        assert not [n for n in graph.find_nodes(op="call_function", target=torch.ops.prims.device_put.default)
                    if n.name.startswith(("cpu_offload_", "gpu_reload_"))]

    monkeypatch.setattr(offload.AsyncCopies, "__call__", spy)
    return counts


def checkpointed(layers: int = 3):
    model = tiny("llama", layers=layers).to(DEVICE)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def step(model, x, **options):
    torch._dynamo.reset()
    return loss_and_grads(model, x, run=torch.compile(model, backend="liger", options=options))


def test_checkpointed_layer_inputs_are_offloaded_and_the_step_is_unchanged(offloaded, our_copies):
    model = checkpointed(layers=3)
    x = {k: v.to(DEVICE) for k, v in batch(t=16).items()}
    loss, grads = step(copy.deepcopy(model), x)
    assert offloaded == []  # off by default
    loss_off, grads_off = step(model, x, offload_activations=True)
    # the inputs of layers 2 and 3 (layer 1's input, the embedding lookup, is recomputed in backward)
    assert any(sum("add" in n for n in graph) >= 2 for graph in offloaded), offloaded
    # each offloaded value copied out by our op in a forward graph and back by our op in its backward graph
    moved = sum(map(len, offloaded))
    assert sum(o for o, _ in our_copies) == moved and sum(r for _, r in our_copies) == moved, our_copies
    # the same compiled math: bit for bit on CPU; on CUDA the embedding's gradient sums with atomics (any order)
    tol = 0 if DEVICE == "cpu" else 1e-6
    torch.testing.assert_close(loss_off, loss, rtol=tol, atol=tol)
    assert grads_off.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_only_computed_tensors_of_min_bytes_are_marked():
    graph = torch.fx.symbolic_trace(lambda x: (x * 2, torch.neg(x))).graph
    x, big, small = (n for n in graph.nodes if n.op in ("placeholder", "call_function"))
    x.meta["val"] = big.meta["val"] = torch.empty(offload.MIN_BYTES // 4, dtype=torch.float32, device="meta")
    small.meta["val"] = torch.empty(offload.MIN_BYTES // 4 - 1, dtype=torch.float32, device="meta")
    offload.MarkLargeActivations()(graph)
    assert [n.name for n in graph.nodes if n.meta.get("should_offload")] == [big.name]


def test_the_environment_variable_turns_it_on_and_is_checked(monkeypatch):
    monkeypatch.setenv("LIGER_COMPILE_OFFLOAD_ACTIVATIONS", "1")
    assert liger_options.parse().offload_activations
    monkeypatch.setenv("LIGER_COMPILE_OFFLOAD_ACTIVATIONS", "yes")
    with pytest.raises(ValueError, match="LIGER_COMPILE_OFFLOAD_ACTIVATIONS must be 0 or 1"):
        liger_options.parse()


def test_a_users_joint_pass_still_runs():
    ran = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            ran.append(len(graph.nodes))

        def uuid(self):
            return "user-pass"

    config = offload.inductor_config({"joint_custom_pre_pass": UserPass()})
    pass_ = config["joint_custom_pre_pass"]
    assert isinstance(pass_, offload.MarkLargeActivations) and pass_.uuid() is not None
    graph = torch.fx.symbolic_trace(lambda x: x * 2).graph
    pass_(graph)
    assert ran == [len(graph.nodes)]


def test_a_failure_inside_offloading_compiles_without_it(monkeypatch, liger_warnings):
    class Broken(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            raise RuntimeError("planted failure in the offload pass")

        def uuid(self):
            return None

    monkeypatch.setattr(offload, "inductor_config", lambda config: {**config, "joint_custom_pre_pass": Broken()})
    model = checkpointed(layers=2)
    x = {k: v.to(DEVICE) for k, v in batch(t=16).items()}
    loss, grads = loss_and_grads(copy.deepcopy(model), x)
    loss_off, grads_off = step(model, x, offload_activations=True)
    assert any("compiling with offload_activations failed" in m for m in liger_warnings), liger_warnings
    torch.testing.assert_close(loss_off, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_off[name], grads[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
