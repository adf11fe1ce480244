"""One layer's decode attention through kvrt's CPU kernel: the dense tier against KIVI's and OTT's
packed 2-bit tiers, at the default model's shapes (9 query heads, 3 KV heads, head dim 64), one
thread, random keys and values (the kernel's work does not depend on them).

    python bench/kernels_cpu.py
"""

from __future__ import annotations

import time

import torch

from kvrt.cache.attention import DenseSegment
from kvrt.backends.torch.ops import TorchOps
from kvrt.kernels_cpu.decode import decode_tiers
from kvrt.cache.methods.kivi import KIVI
from kvrt.cache.methods.ott import OTT

SHAPES = ((1, 4096), (8, 1024), (8, 4096))  # (rows, tokens per row)


def per_call_ms(q, segments, calls: int) -> float:
    for _ in range(3):
        decode_tiers(q, segments, 0.125)
    start = time.perf_counter()
    for _ in range(calls):
        decode_tiers(q, segments, 0.125)
    return (time.perf_counter() - start) / calls * 1000


def main() -> None:
    torch.set_num_threads(1)
    ops, heads, kv_heads, dim = TorchOps(), 9, 3, 64
    print("| rows × tokens | dense ms | kivi:bits=2 ms | ott:bits=2 ms |\n|---|---|---|---|")
    for rows, tokens in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(rows, heads, 1, dim)
        k, v = torch.randn(rows, kv_heads, tokens, dim), torch.randn(rows, kv_heads, tokens, dim)
        tiers = [KIVI(bits=2, residual=0).new_tier(ops, 5), OTT(bits=2, residual=0).new_tier(ops, 5)]
        for tier in tiers:
            tier.add(k, v)
        calls = max(3, 2000 * 1024 // (rows * tokens))
        times = [per_call_ms(q, segments, calls) for segments in ([DenseSegment(k, v)], *(t.segments() for t in tiers))]
        print(f"| {rows} × {tokens} | " + " | ".join(f"{t:.3f}" for t in times) + " |")


if __name__ == "__main__":
    main()
