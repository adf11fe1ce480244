"""What a cache spec adds to each decode step, against its base spec, side by side in one process.

Every spec's cache is built from one full-cache prefill of the same prompt (as bench/fidelity.py
does), then each is fed the same `--steps` next tokens of the passage (teacher-forced, so every
spec does the same work whatever it would predict). Specs take turns, `--rounds` times after one
untimed warm-up round, and each spec's
median ms per step is reported with its ratio to its base (the spec without its `+calidrop…`
part, or `full`). One thread: run it alone on the machine.

    taskset -c 0 python bench/decode_overhead.py --specs "snapkv:ratio=0.25;snapkv:ratio=0.25+calidrop"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fidelity import base_of, cache_for, record_prefill
from texts import natural_passages

from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.models.store import resolve_model
from kvrt.models.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--specs", required=True, help="';'-separated specs; `full` is always added")
    parser.add_argument("--context", type=int, default=1800)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    runtime, tokenizer = TorchRuntime(folder, dtype="float32"), Tokenizer.from_folder(folder)
    passage = next(iter(natural_passages(tokenizer, args.context + args.steps, 1)))
    context, tokens = passage[: args.context], passage[args.context :]
    _, captured = record_prefill(runtime, context)
    specs = ["full"] + [s for s in args.specs.split(";") if s and s != "full"]
    times = {s: [] for s in specs}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and builds the CPU kernels once): not timed
        for spec in specs:
            cache = cache_for(runtime, spec, captured)
            started = time.perf_counter()
            for token in tokens:
                runtime.forward([token], cache)
            if round_:
                times[spec].append(1000 * (time.perf_counter() - started) / len(tokens))
        print(f"round {round_}/{args.rounds}", file=sys.stderr)

    print(f"model {args.model}; {args.context}-token prompt, {args.steps} decode steps, median of {args.rounds} "
          "rounds, one thread, fp32 torch CPU\n\n| cache | ms / step | vs base | base |\n|---|---|---|---|")
    median = {s: statistics.median(t) for s, t in times.items()}
    for spec in specs:
        base = base_of(spec) or "full"
        ratio = f"{median[spec] / median[base]:.2f}×" if base in median and spec != base else ""
        print(f"| {spec} | {median[spec]:.1f} | {ratio} | {base if ratio else ''} |")


if __name__ == "__main__":
    main()
