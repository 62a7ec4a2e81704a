"""Fused ops, one module (or package) per op family, installed as ``liger_compile.kernels``.

Each module defines its ``torch.library`` op(s) in the ``liger`` namespace when imported: a Triton path for CUDA
tensors, a plain-torch path for every other device, a fake implementation and an autograd formula. An op with a Triton
launcher is declared by ``_op.declare`` from the launcher and its plain-torch reference, which records it in
``_op.REGISTRY``; ``_op.all_ops()`` imports every module first, for the tests and benchmarks that iterate the ops. The
pattern that uses an op imports its module.
"""
