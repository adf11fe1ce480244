"""Metal kernels for Apple Silicon, run through mx.fast.metal_kernel; each has a reference twin in the MLX ops.

One .metal file per kernel body (common.metal is the shared header); sources.py builds them, and one
small Python wrapper per job lays out the inputs and the launch grid:

- quantized_decode: (out, lse) of decode queries over a whole quantized tier (twin: QuantizedTier.partial's
  dequantize-a-block path)
- decode: (out, lse) over full-precision keys and values (twin: MLXOps.partial_attention)
- quantize_keys / quantize_values: the packed low-bit format with OTT's mean substitution (twin:
  kvrt.cache.quant.quantize_keys / quantize_values / mean_substituted)
- window_scores: SnapKV's observation-window scores (twin: MLXOps.window_scores)

MLXOps dispatches to them when Metal is available and KVRT_KERNELS is not "off".
"""
