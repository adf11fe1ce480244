"""MLX off Metal: decode attention over the quantized tier through mx.quantized_matmul against the
tier's reference twin (dequantize 16 groups at a time, attend, merge by lse) and against attention
over the same keys and values in full precision, side by side in one process. One decode query per KV head group, Llama-3-8B attention shapes (32 query heads, 8 KV
heads, head dim 128), OTT's default groups (128 tokens, 128 channels); median of `--repeats`.
Then end to end: the default model on MLX decoding after a `--prompt` -token prompt, `full`
against `ott:bits=2` with the fast path and with KVRT_KERNELS=off.

    taskset -c 0 python bench/mlx_quantized_decode.py
    taskset -c 0 python bench/mlx_quantized_decode.py --lengths 1024,8192 --repeats 20 --prompt 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mlx.core as mx

from texts import haystack_ids

import kvrt
from kvrt.backends.mlx.ops import MLXOps
from kvrt.cache.methods.kivi import KIVI


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def timed_paths(tier, q, repeats: int) -> tuple[float, float, str]:
    """(reference ms, fast path ms, the fast path's name) of one decode step over the tier."""
    def step():
        mx.eval(*tier.partial(q, q.shape[-1] ** -0.5, None, True))

    os.environ["KVRT_KERNELS"] = "off"
    reference = median_ms(step, repeats)
    os.environ["KVRT_KERNELS"] = "auto"
    fast = median_ms(step, repeats)
    return reference, fast, tier.ops.paths["quantized decode"]


def end_to_end(prompt: int, new_tokens: int) -> None:
    model = kvrt.load("default", backend="mlx")
    ids = haystack_ids(model.tokenizer, prompt)
    print(f"\ndefault model on MLX (CPU), {prompt}-token prompt, {new_tokens} greedy tokens\n")
    print("| cache | decode tok/s | vs full | KV MiB | quantized decode path |")
    print("|---|---|---|---|---|")
    base = None
    for spec, switch in (("full", "auto"), ("ott:bits=2", "off"), ("ott:bits=2", "auto")):
        os.environ["KVRT_KERNELS"] = switch
        stats = model.generate_ids(ids, max_tokens=new_tokens, cache=spec).stats
        base = base or stats.generation_tps
        path = (stats.cache or {}).get("kernels", {}).get("quantized decode", "-")
        print(f"| {spec} (KVRT_KERNELS={switch}) | {stats.generation_tps:.2f} | {stats.generation_tps / base:.2f}x | "
              f"{stats.kv_bytes / 2**20:.2f} | {path} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,8192")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--prompt", type=int, default=2048, help="end-to-end prompt tokens (0: skip)")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    print("| tokens | dtype | bits | full precision ms | reference twin ms | fast path ms | twin / fast | "
          "full / fast | path |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in (int(x) for x in args.lengths.split(",")):
        for dtype in (mx.float32, mx.float16):
            for bits in (2, 4):
                mx.random.seed(s + bits)
                k, v = (mx.random.normal((1, 8, s, 128)).astype(dtype) for _ in range(2))
                q = mx.random.normal((1, 32, 1, 128)).astype(dtype)
                tier = KIVI(bits=bits, group=128, residual=0).new_tier(MLXOps())
                tier.add(k, v)
                mx.eval(*tier.arrays())
                reference, fast, path = timed_paths(tier, q, args.repeats)
                full = median_ms(lambda: mx.eval(*tier.ops.partial_attention(q, k, v, 128**-0.5)), args.repeats)
                print(f"| {s} | {str(dtype).split('.')[-1]} | {bits} | {full:.2f} | {reference:.2f} | {fast:.2f} | "
                      f"{reference / fast:.2f}x | {full / fast:.2f}x | {path} |")
    if args.prompt:
        end_to_end(args.prompt, args.new_tokens)


if __name__ == "__main__":
    main()
