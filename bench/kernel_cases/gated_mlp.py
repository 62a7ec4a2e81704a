"""Kernel table case: liger_compile.kernels.gated_mlp."""
import torch

from ._shared import DEV, DT, liger_installed, show_fusions

ORDER = 40


def case():
    import liger_compile.kernels.gated_mlp  # noqa: F401, PLC0415

    n, f = 16384, 14336
    a = torch.randn(n, f, device=DEV, dtype=DT, requires_grad=True)
    b = torch.randn(n, f, device=DEV, dtype=DT, requires_grad=True)

    def hf(a, b):
        return torch.nn.functional.silu(a) * b

    variants = {"hf_eager": hf, "inductor": torch.compile(hf),
                "ours": lambda a, b: torch.ops.liger.gated_mlp(a, b, "silu"),
                "ours_backend": torch.compile(hf, backend="liger")}
    if liger_installed():
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: PLC0415

        variants["liger"] = LigerSiLUMulFunction.apply
    show_fusions(hf, a, b)
    # fwd: read a, b, write c; bwd: read dc, a, b, write da, db
    return [a, b], [a, b], variants, {"bytes": 8 * n * f * 2}
