"""Kernel table case: liger_compile.kernels.layer_norm."""
import torch

from ._shared import DEV, DT, liger_installed, show_fusions

ORDER = 60


def case():
    """nn.LayerNorm with weight and bias (GPT-NeoX, Phi, StableLM, OPT), at the other cases' rows and width."""
    import liger_compile.kernels.layer_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = torch.nn.LayerNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)
    hf.bias.data.normal_(0.0, 0.1)
    variants = {
        "hf_eager": hf,
        "inductor": torch.compile(hf),
        "ours": lambda t: torch.ops.liger.layer_norm(t, hf.weight, hf.bias, 1e-5)[0],
        "ours_backend": torch.compile(hf, backend="liger"),
    }
    if liger_installed():
        from liger_kernel.transformers.layer_norm import LigerLayerNorm  # noqa: PLC0415

        lg = LigerLayerNorm(d, eps=1e-5, bias=True).to(DEV, DT)
        lg.weight.data.copy_(hf.weight.data)
        lg.bias.data.copy_(hf.bias.data)
        variants["liger"] = (lg, [x, lg.weight, lg.bias])
    show_fusions(hf, x)
    # fwd: read x, write y; bwd: read dy and x, write dx (weight, bias, mean and rstd are negligible)
    return [x], [x, hf.weight, hf.bias], variants, {"bytes": 5 * n * d * 2}
