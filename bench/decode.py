"""kvrt vs HF transformers on the same checkpoint: prefill tok/s, decode tok/s, peak RSS.

Both engines run the same prompt (exactly N tokens), greedy, fp32, one thread, each in a
fresh subprocess (so peak RSS is each engine's own) one after the other, never at once.
The table gives kvrt / transformers ratios per prompt length.

    python bench/decode.py                       # default model, 512 / 2048 / 4096 tokens
    python bench/decode.py --lengths 4096 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from texts import haystack_ids

def kvrt_engine(folder: str):
    """A function (ids, new_tokens) -> (prefill s, decode s, tokens) over one loaded kvrt model."""
    from kvrt.backends.torch.runtime import TorchRuntime

    runtime = TorchRuntime(folder, dtype="float32")

    def run(ids: list[int], new_tokens: int):
        cache = runtime.new_cache()
        t0 = time.perf_counter()
        token = int(runtime.forward(ids, cache)[-1].argmax())
        t1 = time.perf_counter()
        out = [token]
        for _ in range(new_tokens - 1):
            token = int(runtime.forward([token], cache)[-1].argmax())
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    return run


def transformers_engine(folder: str):
    """The same contract over HF transformers (sdpa attention, its default dynamic cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()

    @torch.inference_mode()
    def run(ids: list[int], new_tokens: int):
        t0 = time.perf_counter()
        result = model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
        token = int(result.logits[0, -1].argmax())
        t1 = time.perf_counter()
        out, past = [token], result.past_key_values
        for _ in range(new_tokens - 1):
            result = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
        return t1 - t0, time.perf_counter() - t1, out

    return run


def worker(engine: str, folder: str, length: int, new_tokens: int, repeats: int) -> dict:
    import torch

    from kvrt.models.runtime import peak_rss_bytes
    from kvrt.models.tokenizer import Tokenizer

    torch.set_num_threads(1)
    ids = haystack_ids(Tokenizer.from_folder(folder), length)
    run = (kvrt_engine if engine == "kvrt" else transformers_engine)(folder)
    run(ids[:64], 4)  # warm up kernels and allocator outside the timed run
    runs = [run(ids, new_tokens) for _ in range(repeats)]
    prefill_s = statistics.median(r[0] for r in runs)  # the median damps this noisy machine
    decode_s = statistics.median(r[1] for r in runs)
    tokens = runs[0][2]
    return {
        "prefill_tps": length / prefill_s,
        "decode_tps": (new_tokens - 1) / decode_s,
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "tokens": tokens,
    }


def spawn(engine: str, folder: str, length: int, new_tokens: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--folder", folder,
           "--lengths", str(length), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="512,2048,4096")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is shown")
    parser.add_argument("--worker", choices=["kvrt", "transformers"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, lengths[0], args.new_tokens, args.repeats)))
        return

    from kvrt.models.store import resolve_model

    folder = str(resolve_model(args.model, log=lambda m: print(m, file=sys.stderr)))
    print(f"model {args.model}, fp32, 1 thread, greedy, {args.new_tokens} new tokens, median of {args.repeats} runs")
    header = ("prompt", "engine", "prefill tok/s", "decode tok/s", "peak RSS MiB")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    ratios = []
    for length in lengths:
        kv = spawn("kvrt", folder, length, args.new_tokens, args.repeats)
        hf = spawn("transformers", folder, length, args.new_tokens, args.repeats)
        for name, r in (("kvrt", kv), ("transformers", hf)):
            print(f"| {length} | {name} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | {r['peak_rss_mib']:.0f} |")
        same = kv["tokens"] == hf["tokens"]
        ratios.append((length, kv["prefill_tps"] / hf["prefill_tps"], kv["decode_tps"] / hf["decode_tps"],
                       kv["peak_rss_mib"] / hf["peak_rss_mib"], same))
    print("\n| prompt | prefill kvrt/hf | decode kvrt/hf | peak RSS kvrt/hf | same greedy tokens |\n|---|---|---|---|---|")
    for length, p, d, m, same in ratios:
        print(f"| {length} | {p:.2f}x | {d:.2f}x | {m:.2f}x | {same} |")


if __name__ == "__main__":
    main()
