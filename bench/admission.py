"""What admission reserves for a request against what its cache really comes to hold.

For each cache spec, one request of the default model for `--new` tokens: a `--prompt`-token
passage fed whole, then greedy decode steps, and the most bytes its cache held at any point
(`KVCache.nbytes`: every buffer as allocated; bench/serve.py's `peak_bytes`, its "fit") against
`kvrt.cache.admission.kv_bytes_needed`, which the server reserves before it admits a request. Goal:
never less than held, at most 10% more.

    python bench/admission.py --prompt 1024 --new 64
"""

from __future__ import annotations

import argparse

import torch

from serve import peak_bytes
from texts import natural_passages

import kvrt
from kvrt.cache.admission import kv_bytes_needed
from kvrt.cache.spec import CacheSpec

SPECS = ("full;ott:bits=2;kivi:bits=2;snapkv:budget=256;snapkv:budget=256+ott:bits=2;streaming:budget=256;"
         "snapkv:budget=256+calidrop;h2o:budget=256+calidrop;snapkv:budget=256+calidrop:offload=int2")
MIB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--specs", default=SPECS, help="';'-separated cache specs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = kvrt.load(args.model, backend="torch", dtype="float32")
    ids = natural_passages(model.tokenizer, args.prompt, 1)[0]
    print(f"model {args.model}, {args.prompt}-token prompt fed whole, {args.new} new tokens, fp32\n")
    print("| spec | held at most | reserved | reserved / held |\n|---|---|---|---|")
    for text in args.specs.split(";"):
        held = peak_bytes(model.runtime, text, ids, args.new)
        reserved = kv_bytes_needed(model.runtime, CacheSpec.parse(text), args.prompt, args.new)
        print(f"| `{text}` | {held / MIB:.2f} MiB | {reserved / MIB:.2f} MiB | {reserved / held:.2f} |", flush=True)


if __name__ == "__main__":
    main()
