"""liger_compile/autocast.py: the autocast state at each node of a Dynamo graph, from the state the graph is compiled
in and the autocast regions Dynamo records in it (nested, disabled, other devices, a checkpointed body's caller)."""
import torch
from torch.utils.checkpoint import checkpoint

from liger_compile.autocast import autocast_dtype, called_from
from liger_compile.rewrite import _call_site


def states_by_op(fn, *args) -> dict[str, list]:
    """Each call_function node's autocast dtype on CPU, by op name, from the graph Dynamo hands a backend."""
    seen: dict[str, list] = {}

    def backend(gm, example_inputs):
        for name, sub in gm.named_children():  # nested bodies start where their caller runs, as rewrite() records
            call = _call_site(gm, name)
            if call is not None:
                called_from(sub.graph, call)
        for g in [gm.graph] + [s.graph for s in gm.children() if isinstance(s, torch.fx.GraphModule)]:
            for n in g.nodes:
                if n.op == "call_function":
                    seen.setdefault(getattr(n.target, "__name__", str(n.target)), []).append(
                        autocast_dtype(n, "cpu"))
        return gm

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen


def test_regions_inside_the_graph_nested_and_disabled():
    def fn(x):
        a = torch.sin(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            b = torch.cos(a)
            with torch.autocast("cpu", enabled=False):
                c = torch.tan(b)
            d = torch.exp(c)
        return torch.log(d)

    seen = states_by_op(fn, torch.rand(4))
    assert seen["sin"] == [None] and seen["log"] == [None]
    assert seen["cos"] == [torch.bfloat16] and seen["exp"] == [torch.bfloat16]
    assert seen["tan"] == [None]


def test_autocast_around_the_compiled_call_and_another_devices_region():
    def fn(x):
        with torch.autocast("cuda", dtype=torch.float16, enabled=False):  # recorded for cuda: cpu's state stays
            y = torch.cos(x)
        return torch.sin(y)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = states_by_op(fn, torch.rand(4))
    assert seen["cos"] == [torch.bfloat16] and seen["sin"] == [torch.bfloat16]


def test_a_checkpointed_body_starts_in_its_callers_region():
    def body(x):
        return torch.cos(x)

    def fn(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return checkpoint(body, x, use_reentrant=False)

    seen = states_by_op(fn, torch.rand(4, requires_grad=True))
    assert seen["cos"] == [torch.bfloat16]


def test_float32_model_with_autocast_inside_its_forward_fuses_every_site():
    """accelerate's mixed precision (a float32 model, bf16=True) enters autocast inside the compiled forward: the
    down_proj and the lm_head's loss fuse there, fed what autocast casts for their matmuls, and give eager's loss
    and gradients within bf16 rounding."""
    import functools

    import liger_compile
    from models import batch, loss_and_grads, tiny

    model = tiny("llama")

    def forward(**inputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**inputs)

    report = liger_compile.explain(forward, **batch())
    variants = {s.variant for g in report.graphs for s in g.fused}
    assert report.counts["linear_cross_entropy"] == 1 and "silu, down_proj" in variants, report
    eager_loss, eager_grads = loss_and_grads(model, batch(), forward)
    torch._dynamo.reset()
    ours = torch.compile(forward, backend=functools.partial(liger_compile.liger_backend, options={"inductor": False}))
    loss, grads = loss_and_grads(model, batch(), ours)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-2, atol=1e-2)
    assert grads.keys() == eager_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32, name  # the float32 parameters get float32 gradients, as under eager
        scale = eager_grads[name].abs().max().item()
        # bf16 rounding: Inductor alone differs from eager by 0.7% of the largest gradient here, ours as much
        assert (g - eager_grads[name]).abs().max().item() <= 0.02 * scale + 1e-6, name
