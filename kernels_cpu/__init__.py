"""CPU kernels in C for the decode hot paths, built once per machine with the system compiler (build.py)
and called through ctypes on torch's CPU tensors; each has a reference twin in the policy code:

- decode: (out, lse) of decode queries over a layer's tiers in one pass — full-precision tiers as
  stored, the packed 2/4/8-bit tier from its words (OTT's traced slots hidden), an extra partial
  merged in (twin: merge_partials over each tier's partial)
- calidrop: CaliDrop's decode step for one layer — ρ, the branch, the recompute for the heads that
  ask, the moved lse, the new state and the branch counts (twin: CalibrationTier.partial's ops path)

TorchOps dispatches to them on the CPU unless KVRT_KERNELS=off; without a working C compiler kvrt
warns once and takes the twins.
"""
