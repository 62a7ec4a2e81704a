"""lm_head + cross-entropy's exp-epilogue path (bf16 on Hopper, no bias, no smoothing, logits not kept: where
paths.exp_matmul_applies). Our own logits matmul finishes each tile in registers as P = exp(zc - ref), ref the
label's logit, so the chunk's logits are written once and never read back by a row pass; a per-row factor
r = (1/D) / sum(exp(zc - ref)) then turns P into dz inside the backward's matmuls (dh = diag(r) (P @ W) in our
matmul's epilogue, dW += P^T diag(r) h by cuBLAS). The kernels: label_logit.py, exp_matmul.py, row_combine.py,
row_scaled_matmul.py. How it compares with the row-kernel path and the plain matmuls: bench/results/lce_notes.md.
"""
import torch
import triton

from . import exp_matmul, label_logit, row_combine, row_scaled_matmul
from ._shared import accumulate_grad_weight, direct_launch, sm_count

# The exp-epilogue path's whole working memory (one chunk's P, its partial sums and a few vectors of chunk length)
# stays under this: 0.25 GiB less 1 MiB. With Llama-3's 128256-word vocabulary that is 1024 rows per chunk, so
# 16384 tokens go in 16 chunks (the row-kernel path has its own budget, LOGITS_CHUNK_BYTES: 18 chunks of 912).
EXP_MATMUL_WORKSPACE_BYTES = 255 * 2**20


def exp_matmul_chunks(n: int, v: int, block_rows: int, n_col_tiles: int) -> list[tuple[int, int]]:
    """(start, end) of each chunk: whole blocks of block_rows rows (the matmul's row tile, so no tile runs part
    empty) spread evenly over the fewest chunks whose working memory fits EXP_MATMUL_WORKSPACE_BYTES (at least one
    block per chunk)."""
    per_row = triton.cdiv(v, 8) * 8 * 2 + n_col_tiles * 4 + 6 * 4  # P row (bf16, padded), partial sums, vectors
    budget_blocks = max(1, EXP_MATMUL_WORKSPACE_BYTES // per_row // block_rows)
    blocks = triton.cdiv(n, block_rows)
    n_chunks = triton.cdiv(blocks, budget_blocks)
    per, extra = divmod(blocks, n_chunks)
    bounds, start = [], 0
    for i in range(n_chunks):
        end = min(n, start + (per + (i < extra)) * block_rows)
        bounds.append((start, end))
        start = end
    return bounds


def forward(h, weight, y, inv_denom, ignore_index, softcap, config=None):
    """Per chunk of C tokens (grad_h's [C, H] slice serves as scratch until the chunk's dh lands in it):
      1. label_logit: zc_y, the label's soft-capped logit (fp32, like the matmul's logits); ref = zc_y, or +inf
         on rows that take no part;
      2. exp_matmul: P = exp(zc - ref) (label column 0), partial sums, row max;
      3. row_combine: loss, row factor r, P's label entry, diag(r) h_c (bf16, into the scratch); 2 and 3 run
         again only if a row overflowed (a flag on the device);
      4. dW += P^T (diag(r) h_c) by cuBLAS;
      5. dh_c = diag(r) (P @ W) by row_scaled_matmul, into grad_h's slice."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    n, k_dim = h.shape
    v = weight.shape[0]
    device = h.device
    cfg = dict(config or exp_matmul.config(device.type))
    bm, bn, bk = cfg.pop("BM"), cfg.pop("BN"), cfg.pop("BK")
    persistent = cfg.pop("PERSISTENT", False)
    programs_per_sm = cfg.pop("PROGRAMS_PER_SM", 1)
    subtile = cfg.pop("SUBTILE", 1)
    n_col_tiles = triton.cdiv(v, bn)
    chunks = exp_matmul_chunks(n, v, bm, n_col_tiles)
    rows = max(end - start for start, end in chunks)
    sms = sm_count(device) if device.type == "cuda" else 1
    dh_cfg = dict(row_scaled_matmul.config(device.type, rows, k_dim, sms))
    dh_bm, dh_bn, dh_bk = dh_cfg.pop("BM"), dh_cfg.pop("BN"), dh_cfg.pop("BK")

    grad_h = torch.empty(h.shape, dtype=h.dtype, device=device)  # contiguous: its slices are the combine's scratch
    grad_w = torch.empty_like(weight)  # bf16 (see _shared.GRAD_WEIGHT_ACC_DTYPE); the first chunk writes it whole
    losses = torch.empty(n, dtype=torch.float32, device=device)
    v_pad = triton.cdiv(v, 8) * 8  # 16-byte row stride for TMA
    buffer = torch.empty((rows, v_pad), dtype=h.dtype, device=device)
    part_sum = torch.empty((n_col_tiles, rows), dtype=torch.float32, device=device)
    row_max = torch.empty(rows, dtype=torch.float32, device=device)
    ref = torch.empty(rows, dtype=torch.float32, device=device)
    z_label = torch.empty(rows, dtype=torch.float32, device=device)
    row_scale = torch.empty(rows, dtype=torch.float32, device=device)
    # one flag per chunk, each at a 16-byte boundary: Triton specialises a kernel on whether each pointer argument is
    # 16-byte aligned, so flags packed at 4 bytes apart would make every odd chunk compile its own copy of the
    # matmul and combine kernels (tests/kernels/test_kernel_lce_exp_matmul.py checks the alignment)
    rerun = torch.zeros((len(chunks), 4), dtype=torch.int32, device=device)
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    w_kn_desc = TensorDescriptor.from_tensor(weight, [dh_bk, dh_bn])
    upcast = device.type != "cuda"
    block_r, block_t = 8, 128

    for i, (start, end) in enumerate(chunks):
        c = end - start
        h_c, y_c = h[start:end], y[start:end]
        p = buffer[:c, :v]
        scratch = grad_h[start:end]
        direct_launch(label_logit.label_logit_kernel)[(c,)](
            h_c, weight, y_c, z_label, ref, row_max, h_c.stride(0), v, k_dim, ignore_index, softcap,
            HAS_SOFTCAP=softcap > 0, BLOCK_K=min(1024, triton.next_power_of_2(k_dim)),
            num_warps=4)
        tiles = triton.cdiv(c, bm) * n_col_tiles
        grid = (min(tiles, programs_per_sm * sms) if persistent and device.type == "cuda" else tiles,)
        descs = (TensorDescriptor.from_tensor(h_c, [bm, bk]), w_desc,
                 TensorDescriptor.from_tensor(p, [bm, bn // subtile]))
        flag = rerun[i, :1]
        for is_rerun in (False, True):
            direct_launch(exp_matmul.exp_matmul_kernel)[grid](
                *descs, ref, y_c, part_sum, row_max, flag, c, v, k_dim, n_col_tiles, softcap,
                HAS_SOFTCAP=softcap > 0, IS_RERUN=is_rerun, UPCAST_DOT=upcast, BM=bm, BN=bn, BK=bk,
                SUBTILE=subtile, PLAIN=False, **cfg)
            direct_launch(row_combine.row_combine_kernel)[(triton.cdiv(c, block_r),)](
                p, v_pad, ref, y_c, part_sum, row_max, z_label, losses[start:end], row_scale, inv_denom, flag,
                h_c, scratch, h_c.stride(0), c, v, n_col_tiles, k_dim, ignore_index, softcap,
                exp_matmul.SAFE_EXP, HAS_SOFTCAP=softcap > 0, IS_RERUN=is_rerun, ROUND_BY_HAND=upcast,
                BLOCK_R=block_r, BLOCK_T=block_t, BLOCK_K=min(512, triton.next_power_of_2(k_dim)), num_warps=4)
        accumulate_grad_weight(grad_w, p.t(), scratch, first=i == 0)
        direct_launch(row_scaled_matmul.row_scaled_matmul_kernel)[
            (triton.cdiv(c, dh_bm) * triton.cdiv(k_dim, dh_bn),)](
            TensorDescriptor.from_tensor(p, [dh_bm, dh_bk]), w_kn_desc,
            TensorDescriptor.from_tensor(scratch, [dh_bm, dh_bn]), row_scale, c, v,
            UPCAST_DOT=upcast, BM=dh_bm, BN=dh_bn, BK=dh_bk, **dh_cfg)
    return losses, grad_h, grad_w
