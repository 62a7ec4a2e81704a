"""Kernel table case: liger_compile.kernels.rms_norm."""
import torch

from ._shared import DEV, DT, liger_installed, show_fusions

ORDER = 10


def case():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415

    import liger_compile.kernels.rms_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = LlamaRMSNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)
    variants = {
        "hf_eager": hf,
        "inductor": torch.compile(hf),
        "ours": lambda t: torch.ops.liger.rms_norm(t, hf.weight, 1e-5, 0.0, True)[0],
        "ours_backend": torch.compile(hf, backend="liger"),
    }
    if liger_installed():
        from liger_kernel.transformers.rms_norm import LigerRMSNorm  # noqa: PLC0415

        lg = LigerRMSNorm(d, eps=1e-5).to(DEV, DT)
        lg.weight.data.copy_(hf.weight.data)
        variants["liger"] = (lg, [x, lg.weight])
    show_fusions(hf, x)
    # fwd: read x, write y; bwd: read dy and x, write dx (weight and rstd are negligible)
    return [x], [x, hf.weight], variants, {"bytes": 5 * n * d * 2}
