"""Metal kernels for Apple Silicon via mx.fast.metal_kernel (the kernels issue fills this in)."""
