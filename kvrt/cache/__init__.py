"""The KV cache: the ops protocol, tiers and their attention merge, buffers, batched rows, sliding
windows, the packed quantization format, cache specs, methods and what a cache can come to hold."""
