"""Fused ops, one module per op, installed as ``liger_compile.kernels``.

Each module defines its ``torch.library`` op(s) in the ``liger`` namespace when imported: a Triton path for CUDA
tensors, a plain-torch path for every other device, a fake implementation and an autograd formula. The pattern
that uses an op imports its module.
"""
