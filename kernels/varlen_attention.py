"""Attention under a padding or packed-sequence mask without the dense mask: ``liger::varlen_attention``.

HF, under torch.compile, turns a batch's `attention_mask` (padding) or restarting `position_ids` (packed documents)
into a dense [B, 1, T, T] boolean mask and runs masked SDPA: every query against every key of its row, the mask read
for each pair. Such a mask is causal within *segments* of each row: a padded row is [leading pads][tokens][trailing
pads], a packed row is one segment per document. This op reads the segments off the mask and runs causal attention
within each, as one variable-length FlashAttention call over the B*T tokens (`aten._flash_attention_forward` with
cumulative segment offsets), so no work is spent across segments or on the mask.

What it computes, exactly:
  - every query that sees itself in the mask (a real token): causal attention over the keys of its segment, which
    is what the mask allows it (checked: the op verifies that the mask's row equals that, for every such query);
  - a query that sees nothing (a leading pad of a left-padded row): 0, as masked SDPA gives (HF's shifted loss reads
    the last such position: its logits predict the row's first token);
  - every other query (a trailing pad of a right-padded row): causal attention within its run of padding, where
    masked SDPA attends to the row's real tokens. These outputs are finite and reach only later pad positions,
    whose logits predict pad labels (-100 in every HF and TRL collator); a loss that reads them would differ.
A mask of any other form (a sliding window, a per-head mask) is computed as given, by masked attention, on CPU and
GPU alike. Off CUDA, or for dtypes FlashAttention lacks, the same semantics run in plain torch.

Shapes: q [B, T, H, D], k and v [B, T, Hkv, D] (Hkv divides H: grouped-query heads are read, not copied), mask
[B or 1, 1, T, T] bool. Returns (out [B, T, H, D], logsumexp [H, B*T] fp32, and two FlashAttention state tensors its
backward takes).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch.library import custom_op

ROW_BLOCK_ELEMENTS = 2**26  # mask elements compared per step while reading the segments (bounds the temporaries)
FLASH_DTYPES = (torch.bfloat16, torch.float16)

# id(mask) -> (weak reference, version, segments): the layers of one forward (and their backward) share one mask
_segments_cache: dict[int, tuple] = {}


def segments(mask: torch.Tensor, batch: int | None = None) -> tuple[torch.Tensor, int] | None:
    """(cumulative segment offsets into the flattened B*T tokens, int32; longest segment) when `mask` (broadcast to
    `batch` rows) is causal within segments for every query that sees itself, else None. Synchronises with the
    device, once per mask: the layers of a forward and their backward pass the same mask tensor."""
    if mask.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # reading them synchronises, which a CUDA graph capture forbids: the mask is used as given
    batch = batch or mask.shape[0]
    key = id(mask)
    hit = _segments_cache.get(key)
    if hit is not None and hit[0]() is mask and hit[1] == (mask._version, batch):
        return hit[2]
    found = _read_segments(mask.expand(batch, *mask.shape[1:]) if mask.dim() == 4 else mask)
    _segments_cache[key] = (weakref.ref(mask, lambda _r, key=key: _segments_cache.pop(key, None)),
                            (mask._version, batch), found)
    return found


def sees_something(mask: torch.Tensor) -> torch.Tensor:
    """[B, T, 1, 1] 1 for the queries the mask lets see some key, 0 for the others (no synchronisation)."""
    return mask[:, 0].any(-1)[:, :, None, None]


def _read_segments(mask: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.dtype != torch.bool or mask.shape[-1] != mask.shape[-2]:
        return None
    m = mask[:, 0]
    b, t = m.shape[0], m.shape[-1]
    valid = m.diagonal(dim1=-2, dim2=-1)  # [B, T]: the token sees itself
    start = torch.ones_like(valid)
    if t > 1:
        sees_previous = m[:, 1:, :-1].diagonal(dim1=-2, dim2=-1)
        start[:, 1:] = (valid[:, 1:] != valid[:, :-1]) | (valid[:, 1:] & ~sees_previous)
    segment = start.reshape(-1).cumsum(0).reshape(b, t)  # ids increase along each row and across rows
    rows_per_step = max(1, ROW_BLOCK_ELEMENTS // max(1, b * t))
    keys = torch.arange(t, device=m.device)
    for r0 in range(0, t, rows_per_step):
        r1 = min(t, r0 + rows_per_step)
        expected = (keys[None, None, :] <= keys[r0:r1, None]) & (segment[:, None, :] == segment[:, r0:r1, None])
        wrong = (m[:, r0:r1] != expected) & valid[:, r0:r1, None]
        if bool(wrong.any()):
            return None
    starts = start.reshape(-1).nonzero().reshape(-1)
    offsets = torch.cat([starts, starts.new_tensor([b * t])]).to(torch.int32)
    return offsets, int((offsets[1:] - offsets[:-1]).max())


def _flash_runs(q: torch.Tensor) -> bool:
    return (q.device.type == "cuda" and q.dtype in FLASH_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
            and torch.backends.cuda.is_flash_attention_available())


def _scale(q, scale):
    return scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])


def _check(q, k, v, mask):
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"varlen_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} are not "
                         "[B, T, H, D] with k/v [B, T, Hkv, D]")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"varlen_attention: {k.shape[2]} key/value heads do not divide {q.shape[2]} query heads")
    t = q.shape[1]
    if mask.dim() != 4 or mask.shape[-2:] != (t, t) or mask.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"varlen_attention: mask {tuple(mask.shape)} is not [B or 1, 1, {t}, {t}]")


def _segment_mask(offsets: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """The [B, 1, T, T] mask the segments stand for, every query included: causal within its segment."""
    ids = torch.zeros(b * t, dtype=torch.long, device=offsets.device)
    ids[offsets[1:-1].long()] = 1
    ids = ids.cumsum(0).reshape(b, t)
    pos = torch.arange(t, device=offsets.device)
    return ((pos[None, :] <= pos[:, None]) & (ids[:, None, :] == ids[:, :, None]))[:, None]


def _effective_mask(mask, offsets):
    """The mask the flash path computes with (causal within the segments; nothing for queries that see nothing), or
    `mask` itself when it has no segments (offsets None)."""
    if offsets is None:
        return mask
    b, t = mask.shape[0], mask.shape[-1]
    return _segment_mask(offsets, b, t) & sees_something(mask).reshape(b, 1, t, 1)


def _masked_forward(q, k, v, mask, scale):
    """Plain torch attention under a boolean mask, fp32, q [B, T, H, D]; a query that sees nothing gets 0. Returns
    (out, probabilities) (what backward recomputes from)."""
    rep = q.shape[2] // k.shape[2]
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ vf).transpose(1, 2).to(q.dtype), p


def _masked_backward(dout, q, k, v, mask, scale):
    rep = q.shape[2] // k.shape[2]
    out, p = _masked_forward(q, k, v, mask, scale)
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    kf, vf = kf.repeat_interleave(rep, dim=1), vf.repeat_interleave(rep, dim=1)
    do = dout.float().transpose(1, 2)
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True)) * scale
    dq, dk = ds @ kf, ds.transpose(-1, -2) @ qf

    def heads_back(x):  # [B, H, T, D] -> [B, T, Hkv, D], the query heads of each group summed
        b, h, t, d = x.shape
        return x.reshape(b, h // rep, rep, t, d).sum(2).transpose(1, 2)

    return (dq.transpose(1, 2).to(q.dtype).contiguous(), heads_back(dk).to(k.dtype).contiguous(),
            heads_back(dv).to(v.dtype).contiguous())


def _flat(x):
    b, t = x.shape[:2]
    return x.reshape(b * t, *x.shape[2:])


def _state_like(q):
    """What FlashAttention's forward returns besides out and logsumexp (its random state), for the other paths."""
    return (torch.zeros(2, dtype=torch.uint64, device=q.device), torch.zeros((), dtype=torch.uint64, device=q.device))


_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()  # it synchronises


# Besides out and logsumexp the op returns FlashAttention's state, and what its backward must reuse rather than read
# off the mask again (which could decide differently, e.g. inside a CUDA graph capture): the segment offsets in a
# fixed [B*T + 1] buffer and, on the host, (number of segments, 0 if the mask had none; longest segment).
@custom_op("liger::varlen_attention", mutates_args=(), tags=_TAGS)
def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: Optional[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(q, k, v, mask)
    b, t, h, _ = q.shape
    sc = _scale(q, scale)
    found = segments(mask, b)
    mask = mask.expand(b, 1, t, t)
    offsets_out = torch.full((b * t + 1,), b * t, dtype=torch.int32, device=q.device)
    info = torch.zeros(2, dtype=torch.int64)
    if found is None:
        out, _ = _masked_forward(q, k, v, mask, sc)
        return out.contiguous(), q.new_zeros((h, b * t), dtype=torch.float32), *_state_like(q), offsets_out, info
    offsets, longest = found
    offsets_out[: offsets.numel()] = offsets
    info[0], info[1] = offsets.numel() - 1, longest
    if _flash_runs(q):
        out, lse, state, unused, _ = torch.ops.aten._flash_attention_forward(
            _flat(q).contiguous(), _flat(k).contiguous(), _flat(v).contiguous(), offsets, offsets, longest, longest,
            0.0, True, False, scale=sc)
        return out.reshape(q.shape) * sees_something(mask), lse, state, unused, offsets_out, info
    out, _ = _masked_forward(q, k, v, _effective_mask(mask, offsets), sc)
    return out.contiguous(), q.new_zeros((h, b * t), dtype=torch.float32), *_state_like(q), offsets_out, info


@varlen_attention.register_fake
def _(q, k, v, mask, scale):
    b, t, h, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((h, b * t), dtype=torch.float32), q.new_empty(2, dtype=torch.uint64),
            q.new_empty((), dtype=torch.uint64), q.new_empty(b * t + 1, dtype=torch.int32),
            torch.empty(2, dtype=torch.int64, device="cpu"))


@custom_op("liger::varlen_attention_backward", mutates_args=(), tags=_TAGS)
def varlen_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, state: torch.Tensor, unused: torch.Tensor, offsets: torch.Tensor, info: torch.Tensor,
    scale: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, _, _ = q.shape
    sc = _scale(q, scale)
    mask = mask.expand(b, 1, t, t)
    count, longest = info.tolist()  # a host tensor: no synchronisation
    if not count:
        return _masked_backward(dout, q, k, v, mask, sc)
    offsets = offsets[: count + 1]
    if not _flash_runs(q):
        return _masked_backward(dout, q, k, v, _effective_mask(mask, offsets), sc)
    dout = dout * sees_something(mask)  # the queries that see nothing output 0: no gradient flows through them
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        _flat(dout).contiguous(), _flat(q).contiguous(), _flat(k).contiguous(), _flat(v).contiguous(),
        _flat(out).contiguous(), lse, offsets, offsets, longest, longest, 0.0, True, state, unused, scale=sc)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


@varlen_attention_backward.register_fake
def _(dout, q, k, v, mask, out, lse, state, unused, offsets, info, scale):
    return tuple(x.new_empty(x.shape) for x in (q, k, v))  # contiguous, whatever the inputs' strides


def _setup_context(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    ctx.save_for_backward(q, k, v, mask, *output)
    ctx.scale = scale
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dout, *_grads_of_the_rest):
    q, k, v, mask, out, *rest = ctx.saved_tensors
    dq, dk, dv = torch.ops.liger.varlen_attention_backward(dout, q, k, v, mask, out, *rest, ctx.scale)
    return dq, dk, dv, None, None


varlen_attention.register_autograd(_backward, setup_context=_setup_context)
