"""Serving throughput: continuous batching over compressed caches at a fixed KV memory budget.

Part 1 (batched decode): R rows of an L-token prompt decode together (B = R) against one row
alone (B = 1), full cache; the ratio of decode tokens/s is what batching buys.

Part 2 (decode phase at a fixed KV memory): per spec, as many rows of an L-token prompt as fit
the budget decode together; the throughput the spec's smaller cache buys once prompts are in.

Part 3 (the OTT headline, arXiv 2505.10938: more requests fit the same KV memory, so more
tokens/s): N requests of L prompt tokens and G new tokens are submitted at once to the engine
behind `kvrt serve`, with `--kv-memory` sized to fit about `--fits` full caches; each spec
runs in the same process, one after the other. Reported per spec: requests admitted at
once (the most running), total and generated tokens/s, p50/p99 request latency and time to
first token, and the ratio of tokens/s to `full`.

Workloads (`--workload`, part 3 only; each sets --requests/--prompt/--new/--fits/--max-batch):
`short` 16 requests of 512 + 64 tokens, 8 at once, no KV limit; `long` 8 of 4096 + 128, 8 at once,
no KV limit; `decode` 32 of 1024 + 256 at ~4 full caches (decode-dominated, the OTT headline).
"Fit" is how many requests the KV memory holds at once by each one's measured peak (its cache alone,
prompt prefilled then every new token decoded): what admission should reach.

    taskset -c 0 python bench/serve.py                        # default model, torch, one thread
    python bench/serve.py --requests 8 --prompt 256 --new 16  # quicker
    taskset -c 0 python bench/serve.py --parts 3 --workload long
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from texts import haystack_ids

SPECS = ["full", "ott:bits=2", "snapkv:budget=256", "snapkv:budget=256+ott:bits=2"]
WORKLOADS = {  # requests, prompt, new, fits (None: no KV limit), max batch
    "short": (16, 512, 64, None, 8),
    "long": (8, 4096, 128, None, 8),
    "decode": (32, 1024, 256, 4.0, 32),
}


def peak_bytes(runtime, spec: str, ids: list[int], new: int) -> int:
    """The most KV bytes one request's cache holds: its prompt, then `new` decode steps."""
    cache = runtime.new_cache(spec)
    token, most = int(runtime.forward(ids, cache)[-1].argmax()), cache.nbytes()
    for _ in range(new - 1):
        token = int(runtime.forward([token], cache)[-1].argmax())
        most = max(most, cache.nbytes())
    return most


def decode_ratio(model, prompt: list[int], rows: int, steps: int) -> tuple[float, float]:
    """(decode tok/s at B = rows, at B = 1) over the same prompt, full cache, greedy."""
    from kvrt.generation.request import Request
    from kvrt.generation.scheduler import Batch
    from kvrt.generation.sampling import SamplingParams
    from kvrt.cache.spec import CacheSpec

    def rate(count: int) -> float:
        made = []
        for _ in range(count):
            row = Request(model, prompt, CacheSpec.parse("full"), SamplingParams(), steps + 2)
            while not row.prefill(512):
                pass
            row.start()
            made.append(row)
        batch = Batch(model, made)
        batch.step()  # warm up
        start = time.perf_counter()
        for _ in range(steps):
            batch.step()
        return count * steps / (time.perf_counter() - start)

    return rate(rows), rate(1)


def fixed_memory_decode(runtime, ids: list[int], specs: list[str], fits: float, steps: int, max_rows: int,
                        sync=lambda: None) -> list[dict]:
    """Decode-phase throughput at one KV memory budget (`fits` full caches of this prompt): per spec,
    as many rows as its prefilled cache fits (grown by `steps` tokens), decoded together `steps`
    steps. Runtime level, no tokenizer: random shapes on a GPU run it too (bench/gpu_kernels.py)."""
    from kvrt.cache.kvcache import stack_caches

    results, budget = [], None
    for spec in specs:
        cache = runtime.new_cache(spec)
        token = int(runtime.forward(ids, cache)[-1].argmax())
        for _ in range(steps):  # the size the rows reach by the end of the run
            token = int(runtime.forward([token], cache)[-1].argmax())
        per_row = cache.nbytes()
        budget = budget or int(per_row * fits)  # the first spec (full) sets the budget
        rows = max(1, min(max_rows, budget // per_row))
        batch = stack_caches([cache] * rows)
        tokens = [token] * rows
        runtime.decode(tokens, batch)  # warm up
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            tokens = [int(t) for t in runtime.decode(tokens, batch).argmax(-1)]
        sync()
        rate = rows * steps / (time.perf_counter() - start)
        results.append({"spec": spec, "rows": rows, "row_bytes": per_row, "budget_bytes": budget, "tok_s": rate})
    return results


def fixed_memory_table(results: list[dict]) -> str:
    base = results[0]["tok_s"]
    lines = ["| spec | KV bytes per row | rows in the budget | decode tok/s | vs full |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['spec']}` | {r['row_bytes'] / 2**20:.1f} MiB | {r['rows']} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base:.2f} |")
    return "\n".join(lines)


def serve_run(model, spec: str, prompts: list[list[int]], new: int, kv_memory: int, max_batch: int) -> dict:
    """Submit every prompt at once to a fresh engine; wait for all; the numbers of one spec."""
    from kvrt.serving.engine import Engine
    from kvrt.generation.sampling import SamplingParams

    engine = Engine(model, cache=spec, max_batch=max_batch, kv_memory=kv_memory, max_queue=len(prompts),
                    prefill_chunk=256).start()
    peak, done = 0, threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.metrics()["running"])
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.perf_counter()
    handles = [engine.submit(ids, max_tokens=new, params=SamplingParams(), stop=()) for ids in prompts]
    for handle in handles:
        handle.text()
    wall = time.perf_counter() - start
    latency = [h.finished_at - h.submitted for h in handles]
    first = [h.first_token_at - h.submitted for h in handles]
    generated = sum(h.completion_tokens for h in handles)
    done.set()
    watcher.join()
    engine.stop()
    prompt_tokens = sum(len(p) for p in prompts)
    return {"spec": spec, "admitted": peak, "tokens_per_s": (prompt_tokens + generated) / wall,
            "generated_per_s": generated / wall, "generated": generated, "wall_s": wall,
            "p50_s": statistics.median(latency), "p99_s": quantile(latency, 0.99),
            "ttft_p50_s": statistics.median(first), "ttft_p99_s": quantile(first, 0.99)}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    parser.add_argument("--new", type=int, default=64, help="new tokens per request")
    parser.add_argument("--fits", type=float, default=4.0, help="--kv-memory holds this many full caches")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--specs", default=",".join(SPECS), help="comma-separated; ';' if a spec has commas")
    parser.add_argument("--decode-rows", type=int, default=8)
    parser.add_argument("--decode-prompt", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--parts", default="1,2,3", help="which parts to run (see above)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), help="part 3's workload (overrides its sizes)")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    if args.workload:
        args.requests, args.prompt, args.new, args.fits, args.max_batch = WORKLOADS[args.workload]

    import torch

    import kvrt

    torch.set_num_threads(1)
    model = kvrt.load(args.model, backend=args.backend, dtype="float32")
    tokenizer = model.tokenizer

    specs = args.specs.split(";") if ";" in args.specs else args.specs.split(",")
    if 1 in parts:
        batched, alone = decode_ratio(model, haystack_ids(tokenizer, args.decode_prompt), args.decode_rows,
                                      args.decode_steps)
        print(f"## batched decode, full cache, {args.decode_prompt}-token prompts, {args.decode_steps} steps\n")
        print("| B | decode tok/s | vs B=1 |\n|---|---|---|")
        print(f"| 1 | {alone:.1f} | 1.00 |\n| {args.decode_rows} | {batched:.1f} | {batched / alone:.2f} |\n",
              flush=True)
    if 2 in parts:
        fixed = fixed_memory_decode(model.runtime, haystack_ids(tokenizer, args.prompt), specs, args.fits or 4.0,
                                    args.decode_steps, args.max_batch)
        print(f"## decode phase at a fixed KV memory (~{args.fits or 4.0:g} full caches of {args.prompt} + "
              f"{args.decode_steps} tokens = {fixed[0]['budget_bytes'] / 2**20:.1f} MiB), {args.decode_steps} steps\n")
        print(fixed_memory_table(fixed) + "\n", flush=True)
    if 3 in parts:
        serve_table(model, specs, args)


def serve_table(model, specs: list[str], args) -> None:
    """Part 3: every spec served the same requests, side by side."""
    from kvrt.cache.admission import kv_bytes_needed
    from kvrt.cache.spec import CacheSpec

    prompts = [haystack_ids(model.tokenizer, args.prompt, seed=i) for i in range(args.requests)]
    full_need = kv_bytes_needed(model.runtime, CacheSpec.parse("full"), args.prompt, args.new, 256)
    kv_memory = None if args.fits is None else int(full_need * args.fits)
    limit = "no KV limit" if kv_memory is None else f"--kv-memory {kv_memory / 2**20:.1f} MiB (~{args.fits:g} full caches)"
    print(f"## {args.requests} requests x {args.prompt} prompt + {args.new} new tokens, {limit}, "
          f"max batch {args.max_batch}\n")
    print("| spec | admitted at once | fit | tokens/s | generated tok/s | vs full | p50 latency s | p99 latency s "
          "| TTFT p50 s | TTFT p99 s |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    base = None
    for spec in specs:
        fit = args.max_batch
        if kv_memory is not None:
            fit = min(fit, kv_memory // peak_bytes(model.runtime, spec, prompts[0], args.new))
        r = serve_run(model, spec, prompts, args.new, kv_memory, args.max_batch)
        base = base or r["tokens_per_s"]
        print(f"| `{spec}` | {r['admitted']} | {fit} | {r['tokens_per_s']:.1f} | {r['generated_per_s']:.2f} | "
              f"{r['tokens_per_s'] / base:.2f} | {r['p50_s']:.1f} | {r['p99_s']:.1f} | {r['ttft_p50_s']:.1f} | "
              f"{r['ttft_p99_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
