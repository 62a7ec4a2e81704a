"""One module per kernel of the op registry that bench/bench_kernels.py times: `case()` returns (inputs, params
needing grad, {variant: fn(*inputs) or (fn, params)}, floor: {"bytes": ...} or {"flops": ...}); ORDER places it in
the table (lower first). bench_kernels.py finds every module here, so a new kernel's bench entry is one new file."""
