"""How many framework ops and host reads one decode step issues per layer, per cache spec.

Each spec's cache is built from one full-cache prefill of the same passage (bench/fidelity.py's
`record_prefill`), a few decode steps warm it up, then torch's profiler records `--steps` more.
An op is a leaf of the profiler's tree (an aten call that calls no other); each is sorted into
views (no data touched), casts and allocations, or compute; kvrt's own CPU kernels (ctypes calls,
invisible to the profiler) are counted as compute by the ops layer itself. Host reads are the
ops-protocol calls that bring a device value to the host (`any`, `count`, `to_numpy`,
`argmax_last`) plus aten's `_local_scalar_dense` (`.item()`, `bool()`, `int()` of a tensor).
Counts are per layer and decode step, averaged over the steps (a flush or a recompute lands on
some steps only); a spec whose count grows with the context shows it across `--lengths`.

    python bench/decode_ops.py --lengths 1024,8192
    KVRT_KERNELS=off python bench/decode_ops.py --lengths 1024
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from fidelity import cache_for, record_prefill
from texts import natural_passages

from kvrt.backends.torch.runtime import TorchRuntime
from kvrt.models.store import resolve_model
from kvrt.cache.ops import kernels_allowed
from kvrt.models.tokenizer import Tokenizer

SPECS = ("full;streaming:budget=256;h2o:budget=256;snapkv:budget=256;pyramidkv:budget=256;"
         "streaming:budget=256+calidrop;h2o:budget=256+calidrop;snapkv:budget=256+calidrop;"
         "pyramidkv:budget=256+calidrop;kivi:bits=2;ott:bits=2;ott:bits=4;snapkv:budget=256+ott:bits=2;"
         "snapkv:budget=256+ott:bits=2+calidrop")
VIEWS = {"view", "reshape", "_reshape_alias", "slice", "select", "unsqueeze", "squeeze", "expand", "as_strided",
         "transpose", "t", "permute", "alias", "unflatten", "flatten", "narrow", "split", "chunk", "unbind",
         "detach", "lift_fresh", "_unsafe_view", "view_as", "expand_as", "contiguous", "numpy_T", "real",
         "resolve_conj", "resolve_neg", "result_type", "is_same_size"}  # metadata: no element touched
ALLOCS = {"empty", "empty_strided", "empty_like", "resize_", "new_empty", "new_empty_strided", "scalar_tensor",
          "lift_fresh_copy", "_local_scalar_dense", "item", "is_nonzero"}
CASTS = {"to", "_to_copy", "type_as", "_copy_from", "cpu"}
HOST_READS = ("any", "count", "to_numpy", "argmax_last")
MLX_VIEWS = {"Reshape", "Slice", "Broadcast", "Transpose", "ExpandDims", "Squeeze", "AsStrided", "Flatten",
             "Unflatten", "View"}
MLX_ALLOCS = {"Full", "Arange"}


def kind(name: str) -> str:
    op = name.split("::")[-1]
    if op in VIEWS:
        return "views"
    if op in CASTS:
        return "casts"
    return "allocs" if op in ALLOCS else "compute"


def leaf_ops(prof) -> Counter:
    """Leaf aten calls by name (an op that calls no other), over the whole profile."""
    counts = Counter()
    for event in prof.events():
        if event.name.startswith("aten::") and not any(c.name.startswith("aten::") for c in event.cpu_children):
            counts[event.name] += 1
    return counts


class HostReads:
    """Counts the ops-protocol calls that read a device value on the host (on torch, those that do not
    already show as aten's scalar read: `to_numpy`), until `stop`."""

    def __init__(self, ops, names):
        self.ops, self.names, self.reads = ops, names, 0
        for name in names:
            setattr(ops, name, self._counted(getattr(ops, name)))

    def _counted(self, original):
        def call(*args, **kwargs):
            self.reads += 1
            return original(*args, **kwargs)
        return call

    def stop(self) -> None:
        for name in self.names:  # the instance attribute shadowed the method
            delattr(self.ops, name)


def measure(runtime, spec: str, captured, first_token: int, steps: int, warmup: int) -> dict:
    runtime.ops.paths.clear()  # the paths this spec takes, not an earlier one's
    cache = cache_for(runtime, spec, captured)
    token = first_token
    for _ in range(warmup):
        token = int(runtime.forward([token], cache)[-1].argmax())
    reads = HostReads(runtime.ops, ["to_numpy"])
    kernel_calls = getattr(runtime.ops, "kernel_calls", 0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            token = runtime.ops.argmax_last(runtime.forward([token], cache)[-1])
    counts = leaf_ops(prof)
    reads.stop()
    per = steps * runtime.args.num_layers
    by_kind = Counter()
    for name, n in counts.items():
        by_kind[kind(name)] += n
    kernels = getattr(runtime.ops, "kernel_calls", 0) - kernel_calls
    by_kind["compute"] += kernels
    scalar_reads = counts.get("aten::_local_scalar_dense", 0)
    top = Counter({n: c for n, c in counts.items() if kind(n) == "compute"}).most_common(6)
    return {"compute": by_kind["compute"] / per, "views": by_kind["views"] / per, "casts": by_kind["casts"] / per,
            "allocs": by_kind["allocs"] / per, "kernels": kernels / per,
            "reads": (reads.reads + scalar_reads) / steps, "top": top, "paths": cache.stats().get("kernels", {})}


def measure_mlx(runtime, spec: str, ids: list[int], steps: int, warmup: int) -> dict:
    """MLX builds each step's graph lazily: its primitives (exported with mx.export_to_dot just before
    the step's one evaluation: the logits and every array the cache holds after the step) are the ops."""
    import io
    import re

    import mlx.core as mx

    runtime.ops.paths.clear()
    cache = runtime.new_cache(spec)
    token = int(runtime.ops.argmax_last(runtime.forward(ids, cache)[-1]))
    for _ in range(warmup):
        token = int(runtime.ops.argmax_last(runtime.forward([token], cache)[-1]))
    evaluate, counts = mx.eval, Counter()

    def export_then_eval(*arrays):  # the runtime evaluates the logits with every array the cache holds
        dot = io.StringIO()
        mx.export_to_dot(dot, *arrays)
        counts.update(re.findall(r'label ="([A-Za-z]+)[^"]*", shape=rectangle', dot.getvalue()))
        evaluate(*arrays)

    reads = HostReads(runtime.ops, list(HOST_READS))
    mx.eval = export_then_eval
    try:
        for _ in range(steps):
            token = int(runtime.forward([token], cache)[-1].argmax())
    finally:
        mx.eval = evaluate
        reads.stop()
    per = steps * runtime.num_layers
    by_kind = Counter()
    for name, n in counts.items():
        by_kind["views" if name in MLX_VIEWS else "casts" if name == "AsType" else
                "allocs" if name in MLX_ALLOCS else "compute"] += n
    top = Counter({n: c for n, c in counts.items() if n not in MLX_VIEWS | MLX_ALLOCS | {"AsType"}}).most_common(6)
    return {"compute": by_kind["compute"] / per, "views": by_kind["views"] / per, "casts": by_kind["casts"] / per,
            "allocs": by_kind["allocs"] / per, "kernels": 0.0, "reads": reads.reads / steps + 1, "top": top,
            "paths": cache.stats().get("kernels", {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--specs", default=SPECS, help="';'-separated cache specs")
    parser.add_argument("--lengths", default="1024,8192")
    parser.add_argument("--steps", type=int, default=32, help="32: a flush of every quantized layer among them")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", action="store_true", help="also print each spec's most frequent compute ops")
    parser.add_argument("--backend", choices=["torch", "mlx"], default="torch")
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr))
    tokenizer = Tokenizer.from_folder(folder)
    if args.backend == "mlx":
        from kvrt.backends.mlx.runtime import MLXRuntime

        runtime = MLXRuntime(folder)
    else:
        runtime = TorchRuntime(folder, dtype="float32")
    specs = [s for s in args.specs.split(";") if s]
    lengths = [int(n) for n in args.lengths.split(",")]
    rows = {}
    for length in lengths:
        passage = natural_passages(tokenizer, length + 1, 1)[0]
        if args.backend == "mlx":  # each spec prefills itself (MLX's cache adapters take no captured chunk)
            for spec in specs:
                rows[spec, length] = measure_mlx(runtime, spec, passage[:length], args.steps, args.warmup)
                print(f"{spec} at {length}: done", file=sys.stderr)
            continue
        logits, captured = record_prefill(runtime, passage[:length])
        first = int(logits[-1].argmax())
        for spec in specs:
            rows[spec, length] = measure(runtime, spec, captured, first, args.steps, args.warmup)
            print(f"{spec} at {length}: done", file=sys.stderr)
        del captured

    print(f"model {args.model}, {args.backend} CPU, one thread, {args.steps} decode steps after {args.warmup}; "
          f"per layer and step (host reads: per step); kernels {'off' if not kernels_allowed() else 'auto'}\n")
    header = " | ".join(f"compute @{n}" for n in lengths)
    print(f"| cache | {header} | vs full | views + casts + allocs @{lengths[-1]} | kvrt kernel calls | host reads / step | path |")
    print("|" + "---|" * (len(lengths) + 6))
    full = {n: rows["full", n]["compute"] for n in lengths if ("full", n) in rows}
    for spec in specs:
        cells = " | ".join(f"{rows[spec, n]['compute']:.1f}" for n in lengths)
        last = rows[spec, lengths[-1]]
        ratio = " / ".join(f"{rows[spec, n]['compute'] / full[n]:.2f}×" for n in lengths if n in full)
        paths = ", ".join(f"{k}: {v}" for k, v in sorted(last["paths"].items()))
        print(f"| `{spec}` | {cells} | {ratio} | {last['views'] + last['casts'] + last['allocs']:.1f} | "
              f"{last['kernels']:.1f} | {last['reads']:.2f} | {paths} |")
    if args.top:
        for spec in specs:
            print(f"\n{spec} @{lengths[-1]}: " + ", ".join(f"{n} {c / (args.steps * runtime.args.num_layers):.1f}"
                                                          for n, c in rows[spec, lengths[-1]]["top"]))


if __name__ == "__main__":
    main()
