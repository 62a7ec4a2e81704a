"""Which path lm_head + cross-entropy takes, and ``launch_forward``, the op's whole algorithm up to the path.

exp_matmul (exp_epilogue.py) where ``exp_matmul_applies``: bf16 on Hopper, no bias, no smoothing, logits not kept,
hidden size from EXP_MATMUL_MIN_HIDDEN up (the common training case); row_kernel (row_kernel.py) everywhere else.
LIGER_COMPILE_LCE_PATH pins one. A default exp path that fails to build on a device (a Triton or driver that cannot
compile it) warns once and leaves that device to the row kernel.
"""
import os
import warnings

import torch

from . import exp_epilogue, row_kernel

# LIGER_COMPILE_LCE_PATH=row_kernel pins the row-kernel path, =exp_matmul the exp path wherever it is exact and
# runs (any hidden size), for comparisons and diagnosis
FORCED_PATH = os.environ.get("LIGER_COMPILE_LCE_PATH") or None
if FORCED_PATH not in (None, "row_kernel", "exp_matmul"):
    raise ValueError(f"LIGER_COMPILE_LCE_PATH must be row_kernel or exp_matmul, not {FORCED_PATH!r}")

# The exp path is the default from this hidden size up, where it measured faster than the row-kernel path (at a
# smaller hidden size our dh matmul has too few output tiles; bench/check_lce_paths.py, bench/results/lce_notes.md).
EXP_MATMUL_MIN_HIDDEN = 1536

# device -> True once the exp-epilogue path ran there, False once it failed to build there (row-kernel path after)
_EXP_MATMUL_BUILDS: dict = {}


def exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits) -> bool:
    """Whether the exp-epilogue path computes this call's result (else it would be wrong, not just slow):
    - bf16 hidden and weight: exp(z - ref) needs fp32's exponent range, which bf16 has and fp16 (max 65504) has
      not; fp32 inputs would need a tf32 or fp32 matmul of their own;
    - no bias (no HF causal LM has an lm_head bias), no label smoothing: both add terms that are not one factor
      per row (db needs sum_i r_i P_ij; smoothing adds eps / V to every column, times 1 - t^2 with softcap);
    - logits not kept: the epilogue writes exp(z - ref), not z."""
    return (h.dtype == weight.dtype == torch.bfloat16 and bias is None and label_smoothing == 0
            and not keep_logits)


def exp_matmul_runs(h, weight) -> bool:
    """Whether the exp-epilogue kernels can run on these tensors: CUDA with TMA (compute capability 9.0+; the
    matmuls are fed by tensor descriptors), hidden size a multiple of 8, unit column strides and 16-byte aligned
    starts (what TMA reads)."""
    return (h.device.type == "cuda" and torch.cuda.get_device_capability(h.device) >= (9, 0)
            and h.shape[-1] % 8 == 0 and h.stride(-1) == 1 and h.stride(0) % 8 == 0 and weight.is_contiguous()
            and h.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def exp_matmul_applies(h, weight, bias, label_smoothing, keep_logits) -> bool:
    """Where the op takes the exp-epilogue path by default: where it is exact, where it runs, and from a hidden
    size of EXP_MATMUL_MIN_HIDDEN up (where it was measured faster; see there). Everything else: the row kernel."""
    return (exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits) and exp_matmul_runs(h, weight)
            and h.shape[-1] >= EXP_MATMUL_MIN_HIDDEN)


def _default_path(h, weight, bias, label_smoothing, keep_logits, use_kernel) -> str:
    """The path when the caller names none: LIGER_COMPILE_LCE_PATH's pin if set (exp_matmul only where it is exact
    and runs), else exp_matmul where exp_matmul_applies and it has not failed to build on this device."""
    if FORCED_PATH == "row_kernel" or not use_kernel:
        return "row_kernel"
    if FORCED_PATH == "exp_matmul":
        exp = exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits) and exp_matmul_runs(h, weight)
    else:
        exp = exp_matmul_applies(h, weight, bias, label_smoothing, keep_logits) \
            and _EXP_MATMUL_BUILDS.get(h.device) is not False
    return "exp_matmul" if exp else "row_kernel"


def _denominator(labels, num_items, ignore_index, reduction, device) -> torch.Tensor:
    """D (the package docstring's) as a 0-dim fp32 tensor on the device, computed there (no host round trip)."""
    if num_items is not None:
        return num_items.to(device=device, dtype=torch.float32)
    if reduction == "mean":
        return (labels != ignore_index).sum().to(torch.float32)  # 0 -> loss 0/0 = nan, as torch
    return torch.ones((), dtype=torch.float32, device=device)


def launch_forward(hidden, weight, bias, labels, num_items, ignore_index, label_smoothing, softcap, reduction,
                   use_kernel, config=None, keep_logits=False, path=None, matmul_config=None):
    """The chunked algorithm. path: "exp_matmul" (our matmul with the softmax in its epilogue, see
    exp_matmul_applies), "row_kernel" (cuBLAS logits and a Triton pass over each row; use_kernel False runs
    reference_chunk instead), or None: the first of them that applies. config: the row kernel's settings,
    matmul_config: exp_matmul.py's (exp_matmul.config by default). Returns (loss, grad_hidden, grad_weight,
    grad_bias or an empty tensor, kept logits or an empty tensor) for grad_output = 1."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).long()
    n, v = h.shape[0], weight.shape[0]
    device = h.device
    denom = _denominator(y, num_items, ignore_index, reduction, device)
    inv_denom = (1.0 / denom).reshape(1)
    if n == 0:  # no tokens, nothing to chunk: torch's value (nan for "mean", 0 for "sum") and zero gradients
        grad_b = torch.zeros_like(bias) if bias is not None else h.new_empty(0)
        kept = h.new_empty((0, v)) if keep_logits else h.new_empty(0)
        return (h.new_zeros((), dtype=torch.float32) / denom, torch.zeros_like(hidden), torch.zeros_like(weight),
                grad_b, kept)
    may_fall_back = path is None and not FORCED_PATH  # a build failure of the default path is not the caller's
    if path is None:
        path = _default_path(h, weight, bias, label_smoothing, keep_logits, use_kernel)
    elif path == "exp_matmul" and not exp_matmul_exact(h, weight, bias, label_smoothing, keep_logits):
        raise ValueError("linear_cross_entropy: the exp_matmul path takes bf16 inputs without bias, label smoothing "
                         "or kept logits")
    if path == "exp_matmul":
        try:
            losses, grad_h, grad_w = exp_epilogue.forward(h, weight, y, inv_denom, ignore_index, softcap,
                                                          matmul_config)
            _EXP_MATMUL_BUILDS[device] = True
            loss = losses.sum() / denom
            return loss, grad_h.view(hidden.shape), grad_w.to(weight.dtype), h.new_empty(0), h.new_empty(0)
        except Exception as e:  # noqa: BLE001
            if not may_fall_back or _EXP_MATMUL_BUILDS.get(device):
                raise  # asked for by name, or it ran here before: a real error, not a build failure
            # a Triton or driver that cannot build the kernel (shared memory, an older TMA API): the other path
            warnings.warn(f"liger_compile: lm_head + cross-entropy's exp-epilogue matmul did not build on {device} "
                          f"({type(e).__name__}: {str(e)[:200]}); using cuBLAS logits and the per-row kernel")
            _EXP_MATMUL_BUILDS[device] = False

    losses, grad_h, grad_w, grad_b, kept = row_kernel.forward(h, weight, bias, y, inv_denom, ignore_index,
                                                              label_smoothing, softcap, use_kernel, config,
                                                              keep_logits)
    loss = losses.sum() / denom
    grad_b = grad_b.to(bias.dtype) if bias is not None else h.new_empty(0)
    return loss, grad_h.view(hidden.shape), grad_w.to(weight.dtype), grad_b, kept
