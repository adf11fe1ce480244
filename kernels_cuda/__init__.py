"""Triton kernels for NVIDIA GPUs (the kernels issue fills this in); each kernel has a reference twin in the backend ops."""
