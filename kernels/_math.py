"""Scalar math that triton.language lacks, shared by the lm_head kernels (cross-entropy, per-token log-probs)."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tl has no tanh; 1 - 2 / (e^{2x} + 1) saturates to +-1 as e^{2x} overflows to inf or underflows to 0.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def log1p(x):
    # log1p from log: u = 1 + x is rounded, and log(u) * x / (u - 1) cancels that rounding (Goldberg's trick).
    u = 1.0 + x
    d = tl.where(u == 1.0, 1.0, u - 1.0)  # keeps the unused branch free of 0/0
    return tl.where(u == 1.0, x, tl.log(u) * (x / d))


@triton.jit
def round_to_bf16(x, BY_HAND: tl.constexpr):
    """x (fp32) rounded to the nearest bf16, ties to even, returned as fp32. BY_HAND does it on the bits, for
    Triton's interpreter, whose fp32 -> bf16 cast truncates (finite x only; the GPU's cast rounds correctly)."""
    if BY_HAND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def expm1(x):
    # expm1 from exp: u = e^x is rounded, and (u - 1) * x / log(u) cancels that rounding (Kahan's trick).
    u = tl.exp(x)
    lu = tl.where((u == 1.0) | (u == 0.0), 1.0, tl.log(u))  # keeps the unused branches free of 0/0
    return tl.where(u == 1.0, x, tl.where(u == 0.0, -1.0, (u - 1.0) * (x / lu)))
