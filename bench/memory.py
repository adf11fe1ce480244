"""KV bytes per token, measured: every array each layer's cache holds (codes, scales, zeros,
outlier pools, residual, kept tiers, allocation included) after a prompt of N tokens, for the
default model's shapes and Llama-3-8B's, in fp16, next to the format's bound b + 32/G bits.

The keys and values are random (bytes do not depend on the values, except how many tokens
OTT's overflow pool holds: at most `overflow` per KV head). Each layer is built, measured and
dropped in turn, so 32k tokens of Llama-3-8B fit in memory.

    python bench/memory.py
    python bench/memory.py --lengths 2048,8192 --shapes default
"""

from __future__ import annotations

import argparse

import torch

from kvrt.backends.torch.ops import TorchOps
from kvrt.cache.kvcache import LayerCache
from kvrt.cache.quant import bits_per_element
from kvrt.cache.spec import CacheSpec

SHAPES = {  # layers, KV heads, query heads, head dim
    "default": (30, 3, 9, 64),  # SmolLM2-135M
    "llama3-8b": (32, 8, 32, 128),
}
SPECS = {
    "fp16": "full",
    "KIVI-2 G32/R128": "kivi:bits=2,group=32,residual=128",
    "OTT-2 G128/R32": "ott:bits=2",
    "KIVI-4 G32/R128": "kivi:bits=4,group=32,residual=128",
    "OTT-4 G128/R32": "ott:bits=4",
    "snapkv 10% + OTT-2": "snapkv:ratio=0.1+ott:bits=2",
}
GOALS = {("OTT-2 G128/R32", 8192): 6.4, ("snapkv 10% + OTT-2", 8192): 40.0}


def cache_bytes(spec: str, shape: tuple, length: int, seed: int = 0) -> int:
    """Bytes all layers' caches hold after a prompt of `length` tokens under `spec`."""
    layers, hkv, hq, d = shape
    ops = TorchOps()
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, hkv, length, d, generator=g).half()
    v = torch.randn(1, hkv, length, d, generator=g).half()
    q = torch.randn(1, hq, 64, d, generator=g).half()  # the last queries: all SnapKV's window reads
    eviction, calibration, quantization = CacheSpec.parse(spec).build()
    total = 0
    for i in range(layers):
        layer = LayerCache(ops, i, layers, eviction, calibration, quantization)
        layer.prefilled(q, k, v, d ** -0.5)
        total += layer.nbytes()
    return total


def bound_bits(spec: str) -> float | None:
    """The format's bits per prompt element (codes + fp16 scale and zero per group, times the share
    of the prompt an eviction ratio keeps), None if unquantized."""
    eviction, _, quantization = CacheSpec.parse(spec).build()
    if quantization is None:
        return None
    kept = eviction.ratio if eviction is not None and eviction.ratio else 1.0
    return kept * bits_per_element(quantization.bits, quantization.group, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--shapes", default="default,llama3-8b")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    print("| shape | tokens | cache | KV bytes/token | bits/element | vs fp16 | bound (b+32/G)·kept | bound vs fp16 |")
    print("|---|---|---|---|---|---|---|---|")
    missed = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        elements_per_token = shape[0] * shape[1] * shape[3] * 2  # K and V over layers and KV heads
        for length in lengths:
            fp16 = None
            for name, spec in SPECS.items():
                per_token = cache_bytes(spec, shape, length) / length
                fp16 = fp16 or per_token
                bits = per_token * 8 / elements_per_token
                bound = bound_bits(spec)
                bound_text = "" if bound is None else f"{bound:.2f} | {16 / bound:.1f}x"
                print(f"| {shape_name} | {length} | {name} | {per_token:,.0f} | {bits:.2f} | {fp16 / per_token:.1f}x "
                      f"| {bound_text or ' | '} |", flush=True)
                goal = GOALS.get((name, length))
                if goal and fp16 / per_token < goal:
                    missed.append(f"{shape_name} {length} {name}: {fp16 / per_token:.2f}x < {goal}x")
    print("\ngoals (OTT-2 >= 6.4x, snapkv 10% + OTT-2 >= 40x at 8k):", "; ".join(missed) if missed else "all met")


if __name__ == "__main__":
    main()
