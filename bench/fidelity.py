"""What compression costs in quality: continuation ΔNLL, step by step, and passkey accuracy.

(a) ΔNLL: compress the first `--context` tokens of each of `--passages` natural passages, then
    score the next `--continuation` tokens; report NLL minus the full cache's (nats per token,
    lower is better, 0 = no loss) per passage, their mean and standard deviation, and for a
    `BASE+calidrop` spec the share of BASE's ΔNLL that CaliDrop recovers.
(b) Passkey: a 5-digit key hidden at a random depth of a ~`--passkey-tokens` haystack,
    greedy answer, accuracy over `--passkey-samples` seeded samples (0 skips it).

`--protocol step` (the default) scores the continuation as it is used: one decode step at a
time, each step's query seeing only the tokens before it. Specs whose decode steps only append
(full, SnapKV, PyramidKV) give the same logits from one forward over the continuation, so they
take that shortcut; everything else (decode-time eviction, CaliDrop's per-step calibration,
quantization's group flushes) runs step by step. `--protocol chunk` scores every spec in one
forward over the continuation — not how a cache is used: CaliDrop then recomputes exactly for
all the continuation's queries at once and looks nearly lossless; the output says so.

Every spec is fed the same prompts. A prompt's own outputs do not depend on compression (each
layer compresses after its prompt attention), so each prompt is prefilled once with a full
cache and each spec's cache is built from that prefill (`LayerCache.prefilled`, tested equal
to prefilling under the spec); only the continuation runs per spec.

    python bench/fidelity.py                                   # all methods, budgets 64..512, ± calidrop
    python bench/fidelity.py --model gemma3-270m --specs "snapkv:budget=128;snapkv:budget=128+calidrop"
    python bench/fidelity.py --ratios 0.1,0.25,0.5 --methods snapkv --passkey-samples 0
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from texts import haystack_ids, natural_passages

from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.models.store import resolve_model
from kvrt.cache.spec import CacheSpec
from kvrt.models.tokenizer import Tokenizer


def record_prefill(runtime, ids):
    """Prefill `ids` with a full cache; returns (logits of the last position, per-layer (q, k, v, scale))."""
    cache = runtime.new_cache("full")
    captured = []
    for layer in cache.layers:
        layer.attend = lambda q, k, v, scale, f=layer.attend: captured.append((q, k, v, scale)) or f(q, k, v, scale)
    return runtime.forward(ids, cache), captured


def cache_for(runtime, spec, captured):
    cache = runtime.new_cache(spec)
    for layer, chunk in zip(cache.layers, captured):
        layer.prefilled(*chunk)
    return cache


def stepwise(spec: str) -> bool:
    """Whether scoring must go one decode step at a time: decode-time eviction (streaming, H2O),
    quantization's group flushes (KIVI, OTT) and CaliDrop's per-step proxy updates change later
    steps; otherwise (full, SnapKV, PyramidKV) a decode step only appends, so one multi-token
    forward gives the same logits."""
    parsed = CacheSpec.parse(spec)
    eviction, calibration, quantization = parsed.build()
    return parsed.method.name in ("streaming", "h2o") or calibration is not None or quantization is not None


def continuation_logp(runtime, cache, first_logits, continuation, spec: str, protocol: str = "step"):
    """float32 [N, V]: log p of the next token at each continuation position, given the compressed
    context and the continuation tokens before it."""
    if protocol == "step" and stepwise(spec):
        rows = [first_logits[-1]]
        for token in continuation[:-1]:
            rows.append(runtime.forward([token], cache)[-1])
        logits = torch.stack(rows)
    else:
        logits = torch.cat([first_logits[-1:], runtime.forward(continuation[:-1], cache, all_logits=True)])
    return torch.log_softmax(logits.float(), -1)


def nll_of(logp, continuation) -> float:
    """Mean −log p of the continuation's tokens."""
    return -logp[torch.arange(len(continuation)), torch.tensor(continuation)].mean().item()


def kl_from_full(full_logp, logp) -> float:
    """Mean KL(full ‖ compressed) per token: how far the compressed cache's next-token distribution
    moved from the full cache's. Unlike ΔNLL it is never negative and does not reward a cache for
    luckily favouring the passage's actual tokens, so it tells a lossless cache from a lucky one."""
    return (full_logp.exp() * (full_logp - logp)).sum(-1).mean().item()


def passkey_prompt(tokenizer, length: int, seed: int) -> tuple[list[int], str]:
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    intro = tokenizer.encode("There is an important piece of information hidden inside a lot of irrelevant "
                             "text. Find it and memorize it.\n")
    needle = tokenizer.encode(f" The pass key is {key}. Remember it. {key} is the pass key.",
                              add_special_tokens=False)
    question = tokenizer.encode("\nWhat is the pass key? The pass key is", add_special_tokens=False)
    filler = haystack_ids(tokenizer, length - len(intro) - len(needle) - len(question), seed=seed)
    depth = rng.randint(0, len(filler))
    return intro + filler[:depth] + needle + filler[depth:] + question, key


def greedy_answer(runtime, tokenizer, cache, first_logits, max_tokens=8) -> str:
    token, out = int(first_logits[-1].argmax()), []
    for _ in range(max_tokens):
        out.append(token)
        token = int(runtime.forward([token], cache)[-1].argmax())
    return tokenizer.decode(out)


def count_branches(counts: dict, cache) -> None:
    """Add the cache's CaliDrop branch counts (calibrate / recompute / skip, over layers and heads) to `counts`."""
    for branch, n in cache.stats().get("calidrop", {}).items():
        counts[branch] = counts.get(branch, 0) + n


def spec_list(args) -> list[str]:
    """full, then `--specs`, or each method at each budget (and ratio), without and with CaliDrop."""
    if args.specs:
        return ["full"] + [s for s in args.specs.split(";") if s and s != "full"]
    sizes = [f"budget={b}" for b in filter(None, args.budgets.split(","))]
    sizes += [f"ratio={r}" for r in filter(None, args.ratios.split(","))]
    return ["full"] + [f"{m}:{size}{c}" for m in args.methods.split(",") for size in sizes for c in ("", "+calidrop")]


def base_of(spec: str) -> str | None:
    """The spec CaliDrop calibrates in `spec` (the same spec without its calidrop part), or None."""
    parts = spec.split("+")
    rest = [p for p in parts if not p.startswith("calidrop")]
    return "+".join(rest) if len(rest) < len(parts) else None


def recovered(values: dict, spec: str) -> str:
    """The share of the base spec's mean loss that `spec` (BASE+calidrop…) recovers, or ''."""
    base = base_of(spec)
    if base not in values or statistics.mean(values[base]) <= 0:
        return ""
    return f"{100 * (1 - statistics.mean(values[spec]) / statistics.mean(values[base])):+.0f}%"


def report(args, specs, nll, kl, hits, kv_bytes, host, calidrop) -> dict:
    """Print the table; return the results as a dict (for --json and the sweep plots)."""
    full = nll["full"]
    label = ("step by step (each continuation token decoded after the ones before it)" if args.protocol == "step"
             else "ONE CHUNK (every continuation query at once: optimistic for CaliDrop, not how a cache decodes)")
    print(f"model {args.model}; ΔNLL scored {label}, {len(full)} passages ({args.context} context + "
          f"{args.continuation} scored tokens; full-cache NLL {statistics.mean(full):.3f}); KL(full ‖ cache) in "
          f"nats per token; passkey at {args.passkey_tokens} tokens, {args.passkey_samples} samples; KV bytes after "
          f"a {args.context}-token prompt (on the device; CaliDrop's evicted tier in host memory apart)")
    print("\n| cache | ΔNLL mean ± sd | per passage | recovered | KL mean | KL recovered | passkey | KV MiB "
          "| host MiB | CaliDrop calibrate / recompute / skip |\n|---|---|---|---|---|---|---|---|---|---|")
    delta = {s: [x - f for x, f in zip(nll[s], full)] for s in specs}
    results = {"model": args.model, "protocol": args.protocol, "context": args.context,
               "continuation": args.continuation, "full_nll": full, "specs": {}}
    for spec in specs:
        d = delta[spec]
        spread = statistics.stdev(d) if len(d) > 1 else 0.0
        branches = calidrop[spec]
        total = max(sum(branches.values()), 1)
        mix = " / ".join(f"{100 * branches[b] / total:.0f}%" for b in ("calibrate", "recompute", "skip")) \
            if branches else ""
        passkey = f"{100 * hits[spec] / args.passkey_samples:.0f}%" if args.passkey_samples else ""
        print(f"| {spec} | {statistics.mean(d):+.3f} ± {spread:.3f} | {' '.join(f'{x:+.3f}' for x in d)} | "
              f"{recovered(delta, spec)} | {statistics.mean(kl[spec]):.4f} | {recovered(kl, spec)} | {passkey} | "
              f"{(kv_bytes[spec] - host[spec]) / 2**20:.2f} | {host[spec] / 2**20:.2f} | {mix} |")
        results["specs"][spec] = {"delta_nll": d, "kl": kl[spec], "kv_bytes": kv_bytes[spec] - host[spec],
                                  "host_bytes": host[spec], "branches": branches,
                                  "passkey": hits[spec] / args.passkey_samples if args.passkey_samples else None}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--methods", default="streaming,h2o,snapkv,pyramidkv")
    parser.add_argument("--budgets", default="64,128,256,512")
    parser.add_argument("--ratios", default="", help="kept shares of the prompt, e.g. 0.1,0.25,0.5")
    parser.add_argument("--specs", default=None, help="';'-separated specs to run instead of methods x sizes")
    parser.add_argument("--protocol", choices=("step", "chunk"), default="step")
    parser.add_argument("--passages", type=int, default=5)
    parser.add_argument("--context", type=int, default=1800)
    parser.add_argument("--continuation", type=int, default=200)
    # SmolLM2-135M retrieves a passkey at ~1k tokens (4/5 with a full cache) and fails at 1.5k+
    parser.add_argument("--passkey-tokens", type=int, default=1000)
    parser.add_argument("--passkey-samples", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results here (bench/plot_fidelity.py reads them)")
    args = parser.parse_args()

    folder = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    runtime, tokenizer = TorchRuntime(folder, dtype="float32"), Tokenizer.from_folder(folder)
    specs = spec_list(args)
    nll = {s: [] for s in specs}
    kl = {s: [] for s in specs}
    hits = {s: 0 for s in specs}
    kv_bytes = {s: 0 for s in specs}
    host = {s: 0 for s in specs}
    calidrop = {s: {} for s in specs}
    started = time.time()

    for passage in natural_passages(tokenizer, args.context + args.continuation, args.passages):
        context, continuation = passage[: args.context], passage[args.context :]
        first, captured = record_prefill(runtime, context)
        full_logp = None
        for spec in specs:  # "full" comes first: the others' KL is measured against it
            cache = cache_for(runtime, spec, captured)
            kv_bytes[spec] = cache.nbytes()  # right after the prompt: what compression kept
            host[spec] = cache.host_nbytes()
            logp = continuation_logp(runtime, cache, first, continuation, spec, args.protocol)
            full_logp = logp if full_logp is None else full_logp
            nll[spec].append(nll_of(logp, continuation))
            kl[spec].append(kl_from_full(full_logp, logp))
            count_branches(calidrop[spec], cache)
            print(f"  {spec}: NLL {nll[spec][-1]:.3f} ({time.time() - started:.0f}s)", file=sys.stderr)
        print(f"passage done ({time.time() - started:.0f}s)", file=sys.stderr)

    for seed in range(args.passkey_samples):
        ids, key = passkey_prompt(tokenizer, args.passkey_tokens, seed)
        first, captured = record_prefill(runtime, ids)
        for spec in specs:
            cache = cache_for(runtime, spec, captured)
            hits[spec] += key in greedy_answer(runtime, tokenizer, cache, first)
            count_branches(calidrop[spec], cache)
        print(f"passkey sample {seed + 1}/{args.passkey_samples} ({time.time() - started:.0f}s)", file=sys.stderr)

    results = report(args, specs, nll, kl, hits, kv_bytes, host, calidrop)
    if args.json:
        tmp = Path(args.json + ".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
