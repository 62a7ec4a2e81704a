"""Kernel table case: liger_compile.kernels.add_rms_norm."""
import torch

from ._shared import DEV, DT, liger_installed, show_fusions

ORDER = 20


def case():
    """A decoder's residual add feeding its RMSNorm: `h = residual + branch_out; normed = norm(h)`, h kept (it is
    the next residual), so every variant returns both."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: PLC0415

    import liger_compile.kernels.add_rms_norm  # noqa: F401, PLC0415

    n, d = 16384, 4096
    x = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    residual = torch.randn(n, d, device=DEV, dtype=DT, requires_grad=True)
    hf = LlamaRMSNorm(d, eps=1e-5).to(DEV, DT)
    hf.weight.data.normal_(1.0, 0.1)

    def hf_block(x, residual):
        h = residual + x
        return h, hf(h)

    variants = {
        "hf_eager": hf_block,
        "inductor": torch.compile(hf_block),
        "ours": lambda x, r: torch.ops.liger.add_rms_norm(x, r, hf.weight, 1e-5, 0.0, True)[:2],
        "ours_backend": torch.compile(hf_block, backend="liger"),
    }
    if liger_installed():
        try:  # not in every Liger-Kernel release
            from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm  # noqa: PLC0415
        except ImportError:
            print("add_rms_norm/liger: this Liger-Kernel has no fused add + RMSNorm; skipped", flush=True)
        else:
            lg = LigerFusedAddRMSNorm(d, eps=1e-5).to(DEV, DT)  # returns (normed, sum)
            lg.weight.data.copy_(hf.weight.data)
            variants["liger"] = (lg, [x, residual, lg.weight])
    show_fusions(hf_block, x, residual)
    # fwd: read x and residual, write the sum and y; bwd: read dy, the sum's gradient and the sum, write dx (the
    # gradient of both addends: one tensor); weight and rstd are negligible
    return [x, residual], [x, residual, hf.weight], variants, {"bytes": 8 * n * d * 2}
