"""Kernel table case: liger_compile.kernels.rotary."""
import torch

from ._shared import DEV, DT, liger_installed, show_fusions

ORDER = 30


def case():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: PLC0415

    import liger_compile.kernels.rotary  # noqa: F401, PLC0415

    b, t, hq, hk, d = 4, 4096, 32, 8, 128
    # as HF makes them: views of the projections, transposed to [B, H, T, D]
    q = torch.randn(b, t, hq, d, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hk, d, device=DEV, dtype=DT).transpose(1, 2).requires_grad_()
    pos = torch.arange(t, device=DEV, dtype=torch.float32)
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d))
    emb = torch.cat([pos[:, None] * inv, pos[:, None] * inv], -1)[None]
    cos, sin = emb.cos().to(DT), emb.sin().to(DT)
    variants = {
        "hf_eager": lambda q, k: apply_rotary_pos_emb(q, k, cos, sin),
        "inductor": torch.compile(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)),
        "ours": lambda q, k: torch.ops.liger.rotary(q, k, cos, sin, 1),
        "ours_backend": torch.compile(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), backend="liger"),
    }
    if liger_installed():
        from liger_kernel.transformers.rope import liger_rotary_pos_emb  # noqa: PLC0415

        variants["liger"] = lambda q, k: liger_rotary_pos_emb(q, k, cos, sin)
    show_fusions(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), q, k)
    return [q, k], [q, k], variants, {"bytes": 4 * (q.numel() + k.numel()) * 2}
