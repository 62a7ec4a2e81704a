"""Kernel table case: liger_compile.kernels.linear_cross_entropy."""
import torch

from ._shared import DEV, DT, liger_installed, show_fusions

ORDER = 50


def case():
    import torch.nn.functional as F  # noqa: PLC0415

    import liger_compile.kernels.linear_cross_entropy  # noqa: F401, PLC0415

    n, h, v = 16384, 4096, 128256
    x = (torch.randn(n, h, device=DEV, dtype=DT) * 0.5).requires_grad_()
    w = (torch.randn(v, h, device=DEV, dtype=DT) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (n,), device=DEV)
    labels[::7] = -100  # one in seven ignored

    def hf(x, w):  # written as HF's loss writes it (.view(-1, V)), so backend="liger" recognises it
        return F.cross_entropy(F.linear(x, w).float().view(-1, v), labels, ignore_index=-100)

    variants = {"hf_eager": hf, "inductor": torch.compile(hf),
                "ours": lambda x, w: torch.ops.liger.linear_cross_entropy(x, w, None, labels, None, -100, 0.0, 0.0,
                                                                         "mean")[0],
                "ours_backend": torch.compile(hf, backend="liger")}
    if liger_installed():
        from liger_kernel.transformers.fused_linear_cross_entropy import (  # noqa: PLC0415
            LigerFusedLinearCrossEntropyLoss,
        )

        lce = LigerFusedLinearCrossEntropyLoss()
        variants["liger"] = lambda x, w: lce(w, x, labels)
    show_fusions(hf, x, w)
    return [x, w], [x, w], variants, {"flops": 3 * 2 * n * h * v}
