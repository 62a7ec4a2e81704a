"""Graph patterns, one module per fused subgraph family, installed as ``liger_compile.patterns``.

Each module defines ``PATTERNS``: a list of ``liger_compile.pattern.Pattern``. The backend imports every module
found here, so a new pattern is a new file here plus its op in ``kernels/``.
"""
