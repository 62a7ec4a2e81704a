"""Kernel table case: liger_compile.kernels.add_layer_norm (a residual add feeding nn.LayerNorm, GPT-2 / OPT style)."""
import torch

from ._shared import DEV, DT, show_fusions

ORDER = 65


def case():
    import liger_compile.kernels.add_layer_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    residual = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = torch.nn.LayerNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)
    hf.bias.data.normal_(0.0, 0.1)

    def hf_block(x, residual):
        h = residual + x
        return h, hf(h)

    variants = {
        "hf_eager": hf_block,
        "inductor": torch.compile(hf_block),
        "ours": lambda x, r: torch.ops.liger.add_layer_norm(x, r, hf.weight, hf.bias, 1e-5)[:2],
        "ours_backend": torch.compile(hf_block, backend="liger"),
    }
    # Liger-Kernel has no fused add + LayerNorm: its row would be its LayerNorm after a separate add
    show_fusions(hf_block, x, residual)
    # fwd: read x and residual, write the sum and y; bwd: read dy, the sum's gradient and the sum, write dx
    return [x, residual], [x, residual, hf.weight, hf.bias], variants, {"bytes": 8 * n * d * 2}
