"""The kernels' GPU check: each Triton kernel against its reference twin, then timings on CUDA.

    python bench/gpu_kernels.py                 # an NVIDIA GPU: the whole table, a few minutes
    python bench/gpu_kernels.py --out DIR       # also write DIR/gpu_kernels.json
    python bench/gpu_kernels.py --smoke         # CPU, TRITON_INTERPRET=1, tiny shapes: the script itself runs

Correctness includes batches of rows with per-row lengths (the decode kernels' `lengths`).
Timings (median of CUDA-event-timed repeats, after warm-up), Llama-3-8B attention shapes
(32 query heads, 8 KV heads, head dim 128, bf16):
1. device-to-device copy bandwidth (bytes read + written / time): the ceiling;
2. fused 2-bit decode attention over the quantized tier (OTT's default G = 128) at 8k, 32k
   and 128k tokens, batch 1 and 8: achieved bandwidth (bytes it must read / time) against the
   copy, and its time against torch SDPA in bf16 over a full-precision cache of the same length
   (and against kvrt's own full-precision decode kernel);
3. SnapKV window scoring at prefill and quantizing a prompt: kernel against the ops path;
4. end to end: decode tok/s of a Llama-3-8B-shaped model with random weights after a 32k-token
   prompt: full vs ott:bits=2 vs snapkv:budget=2048+ott:bits=2 (and ott with KVRT_KERNELS=off).
Goals (issue 6): >= 70% of copy bandwidth; faster than SDPA bf16 at >= 16k tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: kernels run in the interpreter on CPU
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvrt.backends.torch.ops import TorchOps  # noqa: E402
from kvrt.backends.torch.runtime import TorchRuntime  # noqa: E402
from kvrt.kernels_cuda.decode import decode_attention  # noqa: E402
from kvrt.kernels_cuda.quantize_keys import quantize_keys_fused  # noqa: E402
from kvrt.kernels_cuda.quantize_values import quantize_values_fused  # noqa: E402
from kvrt.kernels_cuda.quantized_decode import quantized_decode_attention  # noqa: E402
from kvrt.kernels_cuda.window_scores import window_scores  # noqa: E402
from kvrt.models.config import ModelArgs  # noqa: E402
from kvrt.cache.ops import kernels_allowed  # noqa: E402
from kvrt.cache.quant import dequantize_keys, dequantize_values, mean_substituted, quantize_keys, quantize_values  # noqa: E402


@dataclass
class Shape:
    """What one run of the bench uses: the real table on a GPU, or a miniature of it on CPU."""

    device: str
    dtype: torch.dtype
    heads: int
    kv_heads: int
    head_dim: int
    lengths: tuple
    batches: tuple
    group: int
    copy_bytes: int
    repeats: int
    model: ModelArgs
    prompt: int
    budget: int
    steps: int


def shape_for(smoke: bool) -> Shape:
    if smoke:
        tiny = ModelArgs("llama", 512, 64, 128, 3, 4, 2, 16, 1e-5, 500000.0, None, 8192, False, False, False)
        return Shape("cpu", torch.float32, 4, 2, 64, (256,), (1, 2), 32, 1 << 20, 2, tiny, 600, 300, 3)
    llama3_8b = ModelArgs("llama", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 500000.0, None, 131072,
                          False, False, False)
    return Shape("cuda", torch.bfloat16, 32, 8, 128, (8192, 32768, 131072), (1, 8), 128, 4 << 30, 20,
                 llama3_8b, 32768, 2048, 32)


def reference_ops() -> TorchOps:
    """The ops path with every kernel off: the reference twin of each kernel."""
    ops = TorchOps()
    ops.kernels_on = lambda x: False
    return ops


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after 3 warm-ups (CUDA events on a GPU)."""
    for _ in range(3):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in row) + " |")


# ---- 1. correctness ----------------------------------------------------------------------------
def check(name: str, got, want, atol: float, failures: list) -> list:
    error = (got.float() - want.float()).abs().nan_to_num(0.0).max().item()
    same_inf = torch.equal(torch.isinf(got), torch.isinf(want))
    ok = error <= atol and same_inf
    if not ok:
        failures.append(name)
    return [name, error, atol, "ok" if ok else "FAIL"]


def correctness(shape: Shape, failures: list) -> None:
    """Each kernel against its twin run on float32 copies of the same inputs: the kernels form every
    product exactly and accumulate in float32, while a half-precision twin rounds its scores."""
    ref, dev, gen = reference_ops(), shape.device, torch.Generator(device=shape.device).manual_seed(0)
    rows = []
    # the interpreter truncates float32 -> bf16 where GPUs round to nearest even: no bf16 in --smoke
    for dtype in (torch.float32, torch.float16) if SMOKE else (torch.float16, torch.bfloat16):
        tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]  # out in the model dtype
        for g, s in ((4, 1000), (7, 333)):
            hkv, d = 2, shape.head_dim
            k, v = (torch.randn(2, hkv, s + 64, d, device=dev, generator=gen).to(dtype) for _ in range(2))
            k, v = k[:, :, :s], v[:, :, :s]  # a view of a longer buffer, as the cache hands them over
            q = torch.randn(2, hkv * g, 1, d, device=dev, generator=gen).to(dtype)
            bias = torch.where(torch.rand(2, hkv, s, device=dev, generator=gen) < 0.05, float("-inf"), 0.0)
            tag = f"{str(dtype)[6:]} G={g} S={s}"
            out, lse = decode_attention(q, k, v, 0.1, None, bias)
            r_out, r_lse = ref.partial_attention(q.float(), k.float(), v.float(), 0.1, None, True, bias)
            rows.append(check(f"decode out {tag}", out, r_out, tol, failures))
            rows.append(check(f"decode lse {tag}", lse, r_lse, 1e-3, failures))
            whole = s // shape.group * shape.group
            traced = torch.rand(2, hkv, whole, device=dev, generator=gen) < 0.02
            keys = quantize_keys_fused(k[:, :, :whole], 2, shape.group, traced)
            values = quantize_values_fused(v[:, :, :whole], 2, d)
            r_keys = quantize_keys(ref, mean_substituted(ref, k[:, :, :whole], traced, shape.group), 2, shape.group)
            r_values = quantize_values(ref, v[:, :, :whole], 2, d)
            # bit-exact in all that attention reads: a traced slot's code (hidden by the key bias) rests
            # on a float32 mean whose summation order differs between kernel and twin
            shown = ~traced[..., None]
            exact = torch.equal(dequantize_keys(ref, keys) * shown, dequantize_keys(ref, r_keys) * shown) and all(
                torch.equal(a, b) for a, b in ((keys.scale, r_keys.scale), (keys.zero, r_keys.zero),
                                               (values.codes, r_values.codes), (values.scale, r_values.scale),
                                               (values.zero, r_values.zero)))
            rows.append([f"quantize keys+values {tag}", 0.0 if exact else float("nan"), 0.0,
                         "ok" if exact else "FAIL"])
            if not exact:
                failures.append(f"quantize {tag}")
            out, lse = quantized_decode_attention(q, keys, values, 0.1, key_bias=bias[..., :whole])
            r_out, r_lse = ref.partial_attention(q.float(), dequantize_keys(ref, keys).float(),
                                                 dequantize_values(ref, values).float(), 0.1, None, True,
                                                 bias[..., :whole])
            rows.append(check(f"quantized decode out {tag}", out, r_out, tol, failures))
            rows.append(check(f"quantized decode lse {tag}", lse, r_lse, 1e-3, failures))
            window = torch.randn(2, hkv * g, 32, d, device=dev, generator=gen).to(dtype)
            rows.append(check(f"window scores {tag}", window_scores(window, k, 0.1),
                              ref.window_scores(window.float(), k.float(), 0.1), 1e-3, failures))
            rows += ragged_checks(shape, ref, gen, dtype, g, s, tol, tag, failures)
    table("Correctness against the reference twins", ["check", "max abs error", "tolerance", ""], rows)


def ragged_checks(shape: Shape, ref, gen, dtype, g: int, s: int, tol: float, tag: str, failures: list) -> list:
    """The decode kernels over a batch of rows stored rectangularly with per-row lengths (full, empty, a
    third; whole groups for the quantized tier) against the twin given the equivalent -inf key bias."""
    dev, hkv, d, group, rows = shape.device, 2, shape.head_dim, shape.group, []
    k, v = (torch.randn(3, hkv, s + 64, d, device=dev, generator=gen).to(dtype)[:, :, :s] for _ in range(2))
    q = torch.randn(3, hkv * g, 1, d, device=dev, generator=gen).to(dtype)
    bias = torch.where(torch.rand(3, hkv, s, device=dev, generator=gen) < 0.05, float("-inf"), 0.0)
    whole = s // group * group
    for name, lengths in (("decode", [s, 0, s // 3]),
                          ("quantized decode", [whole, 0, max(group, whole // 3 // group * group)])):
        n = s if name == "decode" else whole
        lengths = torch.tensor(lengths, dtype=torch.int32, device=dev)
        hidden = torch.arange(n, device=dev) >= lengths[:, None, None]
        r_bias = bias[..., :n].masked_fill(hidden, float("-inf"))
        if name == "decode":
            out, lse = decode_attention(q, k, v, 0.1, None, bias, lengths=lengths)
            r_out, r_lse = ref.partial_attention(q.float(), k.float(), v.float(), 0.1, None, True, r_bias)
        else:
            keys, values = quantize_keys_fused(k[:, :, :n], 2, group), quantize_values_fused(v[:, :, :n], 2, d)
            out, lse = quantized_decode_attention(q, keys, values, 0.1, key_bias=bias[..., :n], lengths=lengths)
            r_out, r_lse = ref.partial_attention(q.float(), dequantize_keys(ref, keys).float(),
                                                 dequantize_values(ref, values).float(), 0.1, None, True, r_bias)
        rows.append(check(f"{name} out, lengths {lengths.tolist()} {tag}", out, r_out, tol, failures))
        rows.append(check(f"{name} lse, lengths {lengths.tolist()} {tag}", lse, r_lse, 1e-3, failures))
    return rows


# ---- 2. decode attention -----------------------------------------------------------------------
def copy_bandwidth(shape: Shape) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(shape.copy_bytes // 2, dtype=torch.float16, device=shape.device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), shape.device, shape.repeats)
    return 2 * shape.copy_bytes / (ms * 1e-3)


def decode_timings(shape: Shape, copy_bw: float) -> list[dict]:
    dev, d, rows, records = shape.device, shape.head_dim, [], []
    for s in shape.lengths:
        for b in shape.batches:
            gen = torch.Generator(device=dev).manual_seed(s + b)
            k = torch.randn(b, shape.kv_heads, s, d, device=dev, dtype=shape.dtype, generator=gen)
            v = torch.randn(b, shape.kv_heads, s, d, device=dev, dtype=shape.dtype, generator=gen)
            q = torch.randn(b, shape.heads, 1, d, device=dev, dtype=shape.dtype, generator=gen)
            keys, values = quantize_keys_fused(k, 2, shape.group), quantize_values_fused(v, 2, min(shape.group, d))
            packed = nbytes(keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero)
            quant_ms = median_ms(lambda: quantized_decode_attention(q, keys, values, d**-0.5), dev, shape.repeats)
            full_ms = median_ms(lambda: decode_attention(q, k, v, d**-0.5), dev, shape.repeats)
            sdpa_ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, scale=d**-0.5, enable_gqa=True),
                                dev, shape.repeats)
            quant_bw, full_bw = packed / (quant_ms * 1e-3), nbytes(k, v) / (full_ms * 1e-3)
            record = dict(tokens=s, batch=b, quantized_ms=quant_ms, quantized_bytes=packed,
                          quantized_of_copy=quant_bw / copy_bw, full_kernel_ms=full_ms, full_of_copy=full_bw / copy_bw,
                          sdpa_bf16_ms=sdpa_ms, sdpa_over_quantized=sdpa_ms / quant_ms)
            records.append(record)
            rows.append([s, b, quant_ms, f"{quant_bw / 1e9:.0f} GB/s ({100 * quant_bw / copy_bw:.0f}%)",
                         full_ms, f"{full_bw / 1e9:.0f} GB/s ({100 * full_bw / copy_bw:.0f}%)", sdpa_ms,
                         f"{sdpa_ms / quant_ms:.2f}x"])
    table(f"Decode attention, {shape.heads} q / {shape.kv_heads} KV heads, head dim {d} (copy: "
          f"{copy_bw / 1e9:.0f} GB/s)",
          ["tokens", "batch", "2-bit fused ms", "2-bit bandwidth (of copy)", "full-precision kernel ms",
           "full bandwidth (of copy)", "SDPA bf16 ms", "SDPA / 2-bit"], rows)
    return records


# ---- 3. prefill-side kernels -------------------------------------------------------------------
def prefill_timings(shape: Shape) -> list[dict]:
    ref, dev, d, rows, records = reference_ops(), shape.device, shape.head_dim, [], []
    for s in shape.lengths[:2]:
        gen = torch.Generator(device=dev).manual_seed(s)
        k = torch.randn(1, shape.kv_heads, s, d, device=dev, dtype=shape.dtype, generator=gen)
        v = torch.randn_like(k)
        q = torch.randn(1, shape.heads, 32, d, device=dev, dtype=shape.dtype, generator=gen)
        kernel_ms = median_ms(lambda: window_scores(q, k, d**-0.5), dev, shape.repeats)
        ref_ms = median_ms(lambda: ref.window_scores(q, k, d**-0.5), dev, shape.repeats)
        rows.append([f"SnapKV window scores (W = 32) at {s}", kernel_ms, ref_ms, f"{ref_ms / kernel_ms:.2f}x"])
        quant_ms = median_ms(lambda: (quantize_keys_fused(k, 2, shape.group), quantize_values_fused(v, 2, d)),
                             dev, shape.repeats)
        qref_ms = median_ms(lambda: (quantize_keys(ref, k, 2, shape.group), quantize_values(ref, v, 2, d)),
                            dev, shape.repeats)
        rows.append([f"quantize a {s}-token prompt (2-bit)", quant_ms, qref_ms, f"{qref_ms / quant_ms:.2f}x"])
        records += [dict(what="window scores", tokens=s, kernel_ms=kernel_ms, reference_ms=ref_ms),
                    dict(what="quantize", tokens=s, kernel_ms=quant_ms, reference_ms=qref_ms)]
    table("Prefill-side kernels (one layer, batch 1)", ["work", "kernel ms", "ops path ms", "speedup"], rows)
    return records


# ---- 4. end to end -----------------------------------------------------------------------------
def end_to_end(shape: Shape) -> list[dict]:
    dtype = "float32" if SMOKE else "bfloat16"
    runtime = TorchRuntime.with_random_weights(shape.model, dtype=dtype, device=shape.device)
    ids = torch.randint(0, shape.model.vocab_size, (shape.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    specs = [("full", True), ("ott:bits=2", True), ("ott:bits=2", False),
             (f"snapkv:budget={shape.budget}+ott:bits=2", True)]
    rows, records = [], []
    for spec, kernels in specs:
        os.environ["KVRT_KERNELS"] = "auto" if kernels else "off"
        cache = runtime.new_cache(spec)
        sync(shape.device)
        t0 = time.perf_counter()
        logits = runtime.forward(ids, cache)
        sync(shape.device)
        prefill = time.perf_counter() - t0
        token = int(logits[-1].argmax())
        token = int(runtime.forward([token], cache)[-1].argmax())  # one warm-up step
        sync(shape.device)
        t0 = time.perf_counter()
        for _ in range(shape.steps):
            token = int(runtime.forward([token], cache)[-1].argmax())
        sync(shape.device)
        tps = shape.steps / (time.perf_counter() - t0)
        paths = ", ".join(f"{k}: {v}" for k, v in sorted(cache.stats().get("kernels", {}).items()))
        label = spec + ("" if kernels else " (KVRT_KERNELS=off)")
        records.append(dict(spec=label, prefill_s=prefill, decode_tok_s=tps, kv_bytes=cache.nbytes(), paths=paths))
        rows.append([label, prefill, tps, f"{cache.nbytes() / 2**20:.1f} MiB", paths])
        del cache
    os.environ.pop("KVRT_KERNELS", None)
    base = records[0]["decode_tok_s"]
    for row, record in zip(rows, records):
        row.insert(3, f"{record['decode_tok_s'] / base:.2f}x")
    table(f"End to end: {shape.model.num_layers}-layer Llama-shaped model, random weights, {shape.prompt}-token "
          f"prompt, {shape.steps} decode steps",
          ["spec", "prefill s", "decode tok/s", "vs full", "KV", "paths"], rows)
    return records


# ---- 5. serving: batched decode at a fixed KV memory (issue: the OTT throughput headline) ---------
def serving(shape: Shape) -> list[dict]:
    """Decode tok/s at B = 1 and B = 8 (full cache), then, at one KV memory (~4 full caches), as many
    rows of each spec as fit decoding together (bench/serve.py's fixed_memory_decode)."""
    from serve import fixed_memory_decode, fixed_memory_table

    from kvrt.cache.kvcache import stack_caches

    dtype = "float32" if SMOKE else "bfloat16"
    runtime = TorchRuntime.with_random_weights(shape.model, dtype=dtype, device=shape.device)
    prompt = shape.prompt // 4
    ids = torch.randint(0, shape.model.vocab_size, (prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    cache = runtime.new_cache("full")
    runtime.forward(ids, cache)
    rates = {}
    for rows in (1, 8):
        batch = stack_caches([cache] * rows)
        runtime.decode([1] * rows, batch)
        sync(shape.device)
        t0 = time.perf_counter()
        for _ in range(shape.steps):
            runtime.decode([1] * rows, batch)
        sync(shape.device)
        rates[rows] = rows * shape.steps / (time.perf_counter() - t0)
        del batch
    del cache
    table(f"Batched decode, full cache, {prompt}-token prompts", ["B", "decode tok/s", "vs B=1"],
          [[b, r, f"{r / rates[1]:.2f}x"] for b, r in rates.items()])
    specs = ["full", "ott:bits=2", f"snapkv:budget={shape.budget}", f"snapkv:budget={shape.budget}+ott:bits=2"]
    results = fixed_memory_decode(runtime, ids, specs, 4.0, shape.steps, 64, sync=lambda: sync(shape.device))
    print(f"\n### Decode at a fixed KV memory (~4 full caches of {prompt} tokens)\n")
    print(fixed_memory_table(results))
    return [dict(batched=rates)] + results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--out", help="folder for gpu_kernels.json")
    args = parser.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        print("error: no CUDA device; run on an NVIDIA GPU, or pass --smoke to check the script on CPU",
              file=sys.stderr)
        return 2
    if SMOKE:  # on CPU the ops would otherwise never pick a Triton kernel, and would take the C ones
        TorchOps.kernels_on = lambda self, x: kernels_allowed()
        TorchOps.cpu_kernels_on = lambda self, q, kv_heads: False
    shape = shape_for(SMOKE)
    name = "CPU (TRITON_INTERPRET=1, miniature shapes)" if SMOKE else torch.cuda.get_device_name()
    print(f"# kvrt kernels on {name}; torch {torch.__version__}")
    failures: list = []
    correctness(shape, failures)
    copy_bw = copy_bandwidth(shape)
    result = dict(device=name, copy_bytes_per_s=copy_bw, decode=decode_timings(shape, copy_bw),
                  prefill=prefill_timings(shape), end_to_end=end_to_end(shape), serving=serving(shape),
                  failures=failures)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
            json.dump(result, f, indent=1)
    if failures:
        print(f"\nerror: {len(failures)} checks disagree with their reference: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
