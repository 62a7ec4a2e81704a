"""LM head + cross-entropy as one op: ``liger::linear_cross_entropy``; the [N, V] logits never exist in full.

Math (h: [N, H] tokens, W: [V, H], b: [V] optional, y: [N] labels, all row math in fp32):
    z     = h @ W^T + b                     in the input dtype, like F.linear, then read as fp32
    z     = c * tanh(z / c)                 only with softcap c > 0 (Gemma2)
    lse   = log(sum_j exp(z_j))
    nll   = lse - z_y
    loss_row = (1 - eps) * nll + eps * (lse - mean_j z_j)       label smoothing eps; torch's formula
    loss  = sum over rows with y != ignore_index of loss_row, divided by
            D = number of such rows ("mean"), 1 ("sum"), or num_items (HF Trainer's num_items_in_batch; "sum")
Gradient of the loss with respect to z (p = softmax(z)):
    dz_j  = (p_j - (1 - eps) * [j == y] - eps / V) / D          times (1 - tanh^2) = 1 - (z_j / c)^2 with softcap
    dh    = dz @ W,   dW = dz^T @ h,   db = sum over rows of dz

The forward pass computes the gradients too (the loss is a scalar, so its gradient needs nothing but the loss's own
inputs), so backward only scales them by grad_output. Tokens go in chunks whose [C, V] working buffer fits a fixed
budget, by one of two paths:

    op.py                the op: declaration, argument checks, fake, autograd
    paths.py             launch_forward: the loss's denominator, the choice of path, the fallback between them
    exp_epilogue.py      exp_matmul path (bf16 on Hopper, no bias, no smoothing: the common training case): our
                         logits matmul writes P = exp(z - z_label) and a per-row factor turns it into dz inside the
                         backward's matmuls; its kernels: label_logit.py, exp_matmul.py, row_combine.py,
                         row_scaled_matmul.py
    row_kernel.py        row_kernel path (every other case): cuBLAS logits per chunk, one Triton program per row
    _shared.py           what both paths use

Settings (LOGITS_CHUNK_BYTES, EXP_MATMUL_WORKSPACE_BYTES, FORCED_PATH, ...) are read in the module that defines them:
set or patch them there. Measured figures behind the choices: bench/results/lce_notes.md.
"""
from . import exp_epilogue, exp_matmul, label_logit, op, paths, row_combine, row_kernel, row_scaled_matmul  # noqa: F401
from ._shared import GRAD_WEIGHT_ACC_DTYPE, accumulate_grad_weight, direct_launch  # noqa: F401
from .exp_epilogue import exp_matmul_chunks  # noqa: F401
from .op import check_inputs, linear_cross_entropy  # noqa: F401
from .paths import (  # noqa: F401
    EXP_MATMUL_MIN_HIDDEN,
    exp_matmul_applies,
    exp_matmul_exact,
    exp_matmul_runs,
    launch_forward,
)
from .row_kernel import CHUNK_ROW_MULTIPLE, MAX_BLOCK_V, chunk_rows, kernel_config, launch_chunk_kernel  # noqa: F401
from .row_kernel import reference_chunk  # noqa: F401
