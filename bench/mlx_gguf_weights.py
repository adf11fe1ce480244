"""MLX: a GGUF's weights as MLX-quantized layers against the converted floats, in one process.

For the default model (SmolLM2-135M, a Q4_1 GGUF with a Q8_0 embedding) or `--model`/`--gguf`:
the weights' bytes, MLX's peak memory while loading and while generating, decode tok/s after a
`--prompt`-token prompt (median of `--repeats` greedy runs of `--new-tokens`), and the logits
of the quantized load against the full-precision one over a natural-text passage.

    KVRT_HOME=/tmp/kvhome taskset -c 0 python bench/mlx_gguf_weights.py
    python bench/mlx_gguf_weights.py --gguf path/to/model.Q4_K_M.gguf --prompt 512 --new-tokens 64

A cached folder converted before kvrt wrote gguf_types.json has no GGUF types to keep: the default
model is then fetched and converted again under a temporary KVRT_HOME (`--gguf` converts a local
file into a temporary folder instead).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from texts import haystack_ids, natural_passages

from kvrt.api import Model
from kvrt.backends.mlx.gguf_weights import SIDECAR, describe, read_types
from kvrt.backends.mlx.runtime import MLXRuntime
from kvrt.models.config import context_length, read_config
from kvrt.models.store import resolve_model
from kvrt.models.tokenizer import Tokenizer


def folder_with_types(args, scratch: Path) -> Path:
    """A converted folder that carries gguf_types.json."""
    if args.gguf:
        from kvrt.models.gguf_convert import convert_gguf

        return convert_gguf(Path(args.gguf), scratch / "converted", log=None)
    folder = resolve_model(args.model, log=lambda *a: None)
    if (folder / SIDECAR).is_file():
        return folder
    print(f"{folder} has no {SIDECAR} (converted before kvrt wrote it): converting {args.model!r} again "
          f"under {scratch}", file=sys.stderr)
    os.environ["KVRT_HOME"] = str(scratch)
    return resolve_model(args.model, log=lambda *a: print(*a, file=sys.stderr))


def weight_bytes(runtime: MLXRuntime) -> int:
    return sum(v.nbytes for _, v in tree_flatten(runtime.model.parameters()))


def measure(folder: Path, quantize: bool, args, passage: list[int], prompt: list[int]) -> dict:
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    runtime = MLXRuntime(folder, dtype=args.dtype, quantize_gguf=quantize)
    load_s = time.perf_counter() - start
    load_peak = mx.get_peak_memory() - base
    logits = np.array(runtime.forward(passage, runtime.new_cache(), all_logits=True))
    model = Model(runtime, Tokenizer.from_folder(folder), context_length(read_config(folder)))
    model.generate_ids(prompt[:32], max_tokens=4)  # warm up
    mx.reset_peak_memory()
    runs = [model.generate_ids(prompt, max_tokens=args.new_tokens, cache="full") for _ in range(args.repeats)]
    out = {"weights": weight_bytes(runtime), "load_peak": load_peak, "load_s": load_s,
           "run_peak": mx.get_peak_memory() - base, "tps": statistics.median(r.stats.generation_tps for r in runs),
           "text": runs[0].text, "logits": logits, "formats": runtime.weight_formats,
           "dtype": str(runtime.dtype).split(".")[-1]}
    del model, runtime, runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--gguf", default=None, help="convert this GGUF into a temporary folder and use it")
    parser.add_argument("--dtype", default=None, help="MLX dtype (float32 on the CPU by default)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens before decoding")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passage", type=int, default=512, help="tokens of natural text for the logit comparison")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kvrt-bench-") as scratch:
        folder = folder_with_types(args, Path(scratch))
        tokenizer = Tokenizer.from_folder(folder)
        passage = natural_passages(tokenizer, args.passage, 1)[0]
        prompt = haystack_ids(tokenizer, args.prompt)
        desc = describe(read_types(folder))
        print(f"{folder.name}: GGUF weights {desc['gguf']}; MLX quantized: {desc['mlx']}; device {mx.default_device()}")
        print(f"decode: {args.prompt}-token prompt, {args.new_tokens} greedy tokens, median of {args.repeats}; "
              f"logits over a {args.passage}-token passage\n")
        MLXRuntime(folder, dtype=args.dtype, quantize_gguf=False)  # untimed: imports and the file's pages
        full = measure(folder, False, args, passage, prompt)
        quant = measure(folder, True, args, passage, prompt)

    print("| weights | dtype | weight MiB | load peak MiB | generate peak MiB | load s | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("full precision", full), ("GGUF-quantized", quant)):
        print(f"| {name} | {r['dtype']} | {r['weights'] / 2**20:.1f} | {r['load_peak'] / 2**20:.1f} | "
              f"{r['run_peak'] / 2**20:.1f} | {r['load_s']:.2f} | {r['tps']:.2f} |")
    ratio = {k: quant[k] / full[k] for k in ("weights", "load_peak", "run_peak", "load_s", "tps")}
    print(f"| quantized / full | | {ratio['weights']:.3f}x | {ratio['load_peak']:.3f}x | {ratio['run_peak']:.3f}x "
          f"| {ratio['load_s']:.2f}x | {ratio['tps']:.2f}x |")
    diff = np.abs(quant["logits"] - full["logits"])
    agree = float((quant["logits"].argmax(-1) == full["logits"].argmax(-1)).mean())
    print(f"\nlayers quantized: {quant['formats']}")
    print(f"logits, quantized vs full precision: max |diff| {diff.max():.4f}, mean |diff| {diff.mean():.5f} "
          f"(full-precision logits: std {full['logits'].std():.2f}, max |.| {np.abs(full['logits']).max():.2f}); "
          f"top-1 agreement {agree:.4f}")
    print(f"greedy continuations identical: {quant['text'] == full['text']}")


if __name__ == "__main__":
    main()
