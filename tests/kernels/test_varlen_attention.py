"""liger::varlen_attention against masked SDPA: padded (right, left), packed and other masks, forward and backward.

Every query that sees itself (a real token) and every query that sees nothing (a leading pad) gets masked SDPA's
output; the gradients of a loss over those rows equal SDPA's. Trailing pads get finite values of their own (see the
op). Any other mask (a sliding window) is computed as given, every row. On CPU the op's plain-torch path (fp32); on a
GPU the FlashAttention path (bf16, as accurate against a float64 reference as SDPA's own bf16).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from liger_compile.kernels import varlen_attention as op
from models import DEVICE

DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
B, T, H, HKV, D = 3, 16, 4, 2, 16


def causal(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """HF's mask for a padding mask `valid` [B, T]: causal and the key a real token."""
    return (causal(valid.shape[1])[None] & valid[:, None, :])[:, None]


def right_padded():
    return padding_mask(torch.arange(T) < torch.tensor([16, 11, 5])[:, None])


def left_padded():
    return padding_mask(torch.arange(T) >= T - torch.tensor([16, 9, 3])[:, None])


def packed():
    docs = [[16], [5, 7, 4], [9, 7]]
    ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in docs])
    return (causal(T)[None] & (ids[:, None, :] == ids[:, :, None]))[:, None]


def sliding_window():
    pos = torch.arange(T)
    return ((pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 4)).expand(B, 1, T, T)


MASKS = {"right": right_padded, "left": left_padded, "packed": packed, "window": sliding_window}


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, n, D, generator=g) for n in (H, HKV, HKV))
    return q, k, v


def sdpa(q, k, v, mask):
    """Masked SDPA on [B, T, H, D] inputs, k/v heads repeated as HF does."""
    rep = q.shape[2] // k.shape[2]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                         v.transpose(1, 2).repeat_interleave(rep, 1), attn_mask=mask)
    return out.transpose(1, 2)


def checked_rows(mask):
    """The queries whose outputs must equal SDPA's: those that see themselves, and those that see nothing."""
    m = mask[:, 0]
    return m.diagonal(dim1=-2, dim2=-1) | ~m.any(-1)


def run(fn, q, k, v, mask, rows, dout):
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, mask)
    (out * dout * rows[:, :, None, None]).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("name", list(MASKS))
def test_matches_masked_sdpa_on_every_checked_row(name):
    mask = MASKS[name]()
    rows = checked_rows(mask) if name != "window" else torch.ones(B, T, dtype=torch.bool)
    q, k, v = inputs()
    dout = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(9))
    ref = run(sdpa, *(x.double() for x in (q, k, v)), mask, rows, dout.double())
    cast = [x.to(DEVICE, DTYPE) for x in (q, k, v)]
    got = run(lambda *a: torch.ops.liger.varlen_attention(*a, None)[0], *cast, mask.to(DEVICE), rows.to(DEVICE),
              dout.to(DEVICE, DTYPE))
    base = run(sdpa, *cast, mask.to(DEVICE), rows.to(DEVICE), dout.to(DEVICE, DTYPE))  # SDPA in the same dtype
    for label, g, r, b in zip(("out", "dq", "dk", "dv"), got, ref, base):
        g, r, b = g.double().cpu(), r, b.double().cpu()
        sel = rows[:, :, None, None].expand_as(g) if label in ("out", "dq") else torch.ones_like(g, dtype=torch.bool)
        err, base_err = (g - r)[sel].abs().max(), (b - r)[sel].abs().max()
        assert err <= max(2 * base_err, 1e-5), f"{name} {label}: {err:.3g} against SDPA's own {base_err:.3g}"
        assert torch.isfinite(g).all(), f"{name} {label} has non-finite values"


def test_segments_are_read_off_the_mask():
    offsets, longest = op.segments(right_padded())
    assert offsets.tolist() == [0, 16, 27, 32, 37, 48] and longest == 16
    offsets, longest = op.segments(left_padded())
    assert offsets.tolist() == [0, 16, 23, 32, 45, 48] and longest == 16
    assert op.sees_something(left_padded()).reshape(B, T).sum(1).tolist() == [16, 9, 3]  # leading pads see nothing
    offsets, _ = op.segments(packed())
    assert offsets.tolist() == [0, 16, 21, 28, 32, 41, 48]
    assert op.segments(sliding_window()) is None
    assert op.segments(torch.ones(B, 2, T, T, dtype=torch.bool)) is None  # a per-head mask


def test_segments_are_read_once_per_mask_and_again_after_a_write():
    mask = right_padded()
    first = op.segments(mask)
    assert op.segments(mask) is first
    mask[1, 0, 3, 2] = False  # no longer causal within its segment
    assert op.segments(mask) is None


def test_bad_shapes_are_clear_errors():
    q, k, v = inputs()
    with pytest.raises(ValueError, match="do not divide"):
        torch.ops.liger.varlen_attention(q, k[:, :, :1].expand(B, T, 3, D).contiguous(), v[:, :, :1].expand(
            B, T, 3, D).contiguous(), right_padded(), None)
    with pytest.raises(ValueError, match=r"is not \[B or 1, 1, 16, 16\]"):
        torch.ops.liger.varlen_attention(q, k, v, right_padded()[:, :, :8], None)


def test_value_head_size_other_than_the_query_s_is_left_to_sdpa():
    """Multi-head latent attention (DeepSeek-V3 style): values with a smaller head size than queries and keys. The op
    takes one head size, so the fusion is refused with that reason and the compiled attention equals eager's."""
    import liger_compile

    def attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 8)
    real = torch.arange(8) < torch.tensor([8, 5])[:, None]
    mask = (torch.ones(8, 8, dtype=torch.bool).tril() & real[:, None, :])[:, None]  # right padding
    report = liger_compile.Report()
    got = torch.compile(attention, backend="liger", options={"report": report})(q, k, v, mask)
    torch.testing.assert_close(got, attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
    assert report.counts.get("varlen_attention", 0) == 0, str(report)
    assert any(m.pattern == "varlen_attention" and "differ in head size" in m.reason for m in report.near_misses), \
        str(report)
