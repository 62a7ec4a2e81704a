"""How kernels/_op.py declares an opaque op (torch.library's low-level API and an autograd kernel of its own): the
gradient with every argument given and with trailing defaults left out (the dispatcher drops those before our
kernel sees them), no autograd record where none is needed (Inductor's compiled code calls it so), torch.compile
through it, and the refusal of a launcher whose arguments differ from the reference's."""
import pytest
import torch

from liger_compile.kernels._op import REGISTRY, declare


def _scaled_sum_reference(x: torch.Tensor, y: torch.Tensor, scale: float = 2.0, square: bool = False) -> torch.Tensor:
    return (x * x if square else x) * scale + y


def _setup_context(ctx, inputs, output):
    x, _y, scale, square = inputs
    ctx.save_for_backward(x)
    ctx.scale, ctx.square = scale, square


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    dx = grad * ctx.scale * (2 * x if ctx.square else 1)
    return dx, grad, None, None


def _declare(name, launcher=_scaled_sum_reference):
    op = declare(name, launcher, _scaled_sum_reference, triton=False,
                 fake=lambda x, y, scale=2.0, square=False: torch.empty_like(x),
                 setup_context=_setup_context, backward=_backward)
    del REGISTRY[f"liger::{name}"]  # a test op: the suites that iterate every op must not see it
    return op


OP = _declare("_test_scaled_sum")


def _inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(3, 5, generator=g, requires_grad=True), torch.randn(3, 5, generator=g, requires_grad=True))


@pytest.mark.parametrize("args", [(), (3.0,), (3.0, True), (2.0, False)], ids=["defaults", "scale", "both", "explicit"])
def test_gradients_with_and_without_trailing_defaults(args):
    x, y = _inputs()
    OP(x, y, *args).square().sum().backward()
    x_ref, y_ref = (t.detach().clone().requires_grad_() for t in (x, y))
    _scaled_sum_reference(x_ref, y_ref, *args).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(y.grad, y_ref.grad)


def test_no_autograd_record_without_a_gradient_to_record():
    x, y = _inputs()
    with torch.no_grad():
        assert OP(x, y).grad_fn is None
    assert OP(x.detach(), y.detach()).grad_fn is None
    assert OP(x, y).grad_fn is not None


def test_compiles_through_the_op():
    x, y = _inputs()
    compiled = torch.compile(lambda a, b: OP(a, b, 3.0, True).sin().sum(), backend="aot_eager", fullgraph=True)
    compiled(x, y).backward()
    x_ref, y_ref = (t.detach().clone().requires_grad_() for t in (x, y))
    _scaled_sum_reference(x_ref, y_ref, 3.0, True).sin().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(y.grad, y_ref.grad)


def test_a_launcher_with_other_arguments_is_refused():
    def launcher(x, y, scale=1.0, square=False):  # another default than the reference's
        return _scaled_sum_reference(x, y, scale, square)

    with pytest.raises(ValueError, match="leading arguments differ"):
        _declare("_test_scaled_sum_refused", launcher)
