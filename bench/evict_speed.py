"""Speed and memory of cache specs (eviction, quantization) at long context: decode tok/s, KV
bytes, prefill compression cost, peak KV memory during prefill. All specs run in one process,
one after the other, on the same prompt (fp32, one thread); timings are the median of
`--repeats` runs.

    python bench/evict_speed.py
    python bench/evict_speed.py --specs full,snapkv:budget=256,snapkv:budget=256+calidrop --length 4096
    python bench/evict_speed.py --specs full,ott:bits=2,kivi:bits=2 --length 8000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from texts import haystack_ids

from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.models.store import resolve_model
from kvrt.models.tokenizer import Tokenizer


def instrumented_prefill(runtime, spec, ids):
    """Prefill under `spec`; returns (cache, logits, seconds, seconds spent compressing, peak KV bytes).

    Compressing is eviction (scoring, selection, gathers) plus quantization (tracing, packing).
    The peak is read just before each layer compresses: every earlier layer already
    compressed, this one still holding its whole prompt KV.
    """
    cache = runtime.new_cache(spec)
    spent, peak = [0.0], [0]
    for layer in cache.layers:
        def compress(q, scale, layer=layer, original=layer._compress):
            peak[0] = max(peak[0], cache.nbytes())
            start = time.perf_counter()
            original(q, scale)
            spent[0] += time.perf_counter() - start
        layer._compress = compress
    start = time.perf_counter()
    logits = runtime.forward(ids, cache)
    seconds = time.perf_counter() - start
    return cache, logits, seconds, spent[0], max(peak[0], cache.nbytes())


def decode_tps(runtime, cache, logits, steps: int) -> float:
    token = int(logits[-1].argmax())
    start = time.perf_counter()
    for _ in range(steps):
        token = int(runtime.forward([token], cache)[-1].argmax())
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--specs", default="full,snapkv:budget=256,snapkv:budget=256+calidrop")
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    runtime, tokenizer = TorchRuntime(folder, dtype="float32"), Tokenizer.from_folder(folder)
    ids = haystack_ids(tokenizer, args.length)
    runtime.forward(ids[:64], runtime.new_cache())  # warm-up
    per_layer_full = 2 * runtime.args.num_kv_heads * runtime.args.head_dim * 4 * args.length

    rows = {}
    for spec in args.specs.split(","):
        runs = []
        for _ in range(args.repeats):
            cache, logits, prefill_s, evict_s, peak = instrumented_prefill(runtime, spec, ids)
            kv = cache.nbytes()
            runs.append((prefill_s, evict_s, decode_tps(runtime, cache, logits, args.steps), peak, kv, cache.stats()))
        rows[spec] = {
            "prefill_s": statistics.median(r[0] for r in runs),
            "scoring_s": statistics.median(r[1] for r in runs),
            "decode_tps": statistics.median(r[2] for r in runs),
            "peak_kv": runs[0][3], "kv_after_prompt": runs[0][4], "stats": runs[0][5],
        }
        print(f"{spec} done", file=sys.stderr)

    base = rows[args.specs.split(",")[0]]
    print(f"model {args.model}, {args.length}-token prompt, fp32, 1 thread, {args.steps} decode steps, "
          f"median of {args.repeats}; one layer's full prompt KV = {per_layer_full / 2**20:.2f} MiB")
    print("\n| cache | decode tok/s | vs first | prefill s | compress s (share of prefill) | "
          "KV MiB after prompt | peak KV MiB in prefill | bound: compressed + one layer |\n|---|---|---|---|---|---|---|---|")
    for spec, r in rows.items():
        bound = r["kv_after_prompt"] + per_layer_full
        print(f"| {spec} | {r['decode_tps']:.2f} | {r['decode_tps'] / base['decode_tps']:.2f}x | {r['prefill_s']:.2f} | "
              f"{r['scoring_s']:.2f} ({100 * r['scoring_s'] / r['prefill_s']:.1f}%) | {r['kv_after_prompt'] / 2**20:.2f} | "
              f"{r['peak_kv'] / 2**20:.2f} | {bound / 2**20:.2f} |")
    for spec, r in rows.items():
        if r["stats"]:
            print(f"{spec}: {r['stats']}")


if __name__ == "__main__":
    main()
