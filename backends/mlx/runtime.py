"""The MLX backend: an mlx-lm model (HF folder, MLX community 4-bit included) over a kvrt cache."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Callable

import mlx.core as mx

from kvrt.backends.mlx.cache_adapter import MLXLayerCache, install_attention
from kvrt.backends.mlx.ops import MLXOps
from kvrt.cache.kvcache import KVCache
from kvrt.errors import KvrtError
from kvrt.models.runtime import check_token_ids, peak_rss_bytes
from kvrt.models.config import (GLOBAL, LOCAL, ModelArgs, decoder_config, layer_types, layer_windows,
                               local_rope_parameters, read_config, rope_parameters)

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
DEVICES = {"cpu": mx.cpu, "gpu": mx.gpu, "metal": mx.gpu}
# mlx-lm modules whose Model.__call__ is exactly `head(self.model(...))`, so prefill can skip
# the [T, V] logits and project only the last row
PLAIN_HEAD_MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3", "mlx_lm.models.phi3",
                      "mlx_lm.models.gemma3_text"}


def rope_overrides(cfg: dict) -> dict:
    """Top-level config keys mlx-lm 0.32 reads where transformers >= 5 nests them: rope settings (in
    `rope_parameters`, per layer type for Gemma 3), Phi-3's rope `type`, Gemma 3's local rope base
    and layer pattern (`layer_types`), read with kvrt's own config parsing."""
    cfg = decoder_config(cfg)
    out, rope = {}, rope_parameters(cfg)
    if cfg.get("rope_theta") is None and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default" and not cfg.get("rope_scaling"):
        out["rope_scaling"] = {**rope, "type": rope["rope_type"]}
    if cfg.get("model_type") == "gemma3_text":
        if cfg.get("rope_local_base_freq") is None:
            out["rope_local_base_freq"] = local_rope_parameters(cfg)["rope_theta"]
        types = layer_types(cfg)
        if "sliding_window_pattern" not in cfg and GLOBAL in types:
            pattern = types.index(GLOBAL) + 1  # mlx-lm: every pattern-th layer is global
            if types != [GLOBAL if (i + 1) % pattern == 0 else LOCAL for i in range(len(types))]:
                raise KvrtError("this Gemma 3 config's layer types repeat no fixed pattern, which mlx-lm needs")
            out["sliding_window_pattern"] = pattern
    return out


def default_dtype(cfg: dict, device) -> str:
    """float32 on the CPU; on Metal the checkpoint's 16-bit type (bfloat16 unless it says float16)."""
    if device == mx.cpu:
        return "float32"
    return "float16" if (cfg.get("dtype") or cfg.get("torch_dtype")) == "float16" else "bfloat16"


def load_mlx_model(folder: Path, cfg: dict, dtype=None, quantize_gguf: bool = True):
    """mlx-lm's own loader (quantized checkpoints included), its floating parameters cast to `dtype`,
    evaluated; a folder converted from a GGUF (gguf_types.json) gets its quantized GGUF weights as
    MLX-quantized layers unless `quantize_gguf` is False (see gguf_weights). Returns (model, the count of
    layers quantized per format); mlx-lm's errors become one KvrtError line."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from kvrt.backends.mlx.gguf_weights import quantize_gguf_weights, read_types

    try:
        model, _ = load_model(folder, lazy=True, model_config=rope_overrides(cfg))  # weights read when evaluated
        types = read_types(folder) if quantize_gguf else None
        formats = quantize_gguf_weights(model, types) if types else {}
        if dtype is not None:
            model.set_dtype(dtype)  # floating parameters only: packed weights stay packed
        for _, layer in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
            mx.eval(layer.parameters())  # one layer at a time: at most one float weight in memory beside the rest
        mx.eval(model.parameters())
    except FileNotFoundError as exc:
        raise KvrtError(f"cannot load {folder}: {str(exc).splitlines()[0]}") from None
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KvrtError(f"mlx-lm cannot load {folder} (model_type '{cfg.get('model_type')}'): {detail}") from None
    return model, dict(formats)


def cache_state(cache: KVCache) -> list[mx.array]:
    """Every array the cache holds: evaluated with each step's logits, so that state no logits need
    (CaliDrop's branch counts) does not pile up a lazy graph step after step."""
    return [a for layer in cache.layers for a in layer.arrays()]


class MLXRuntime:
    """A loaded model on MLX: `forward` runs token ids through mlx-lm's model and a kvrt cache."""

    backend = "mlx"

    def __init__(self, folder: Path, dtype: str | None = None, device: str | None = None,
                 quantize_gguf: bool = True):
        """`quantize_gguf=False` loads a GGUF's quantized weights as the converted floats (as torch runs them)
        instead of MLX-quantized layers (see gguf_weights); `weight_formats` counts the layers quantized."""
        self.folder = Path(folder)
        if device is not None and device not in DEVICES:
            raise KvrtError(f"unknown MLX device '{device}'; use one of {', '.join(DEVICES)}")
        self.device = mx.default_device() if device is None else mx.Device(DEVICES[device])
        cfg = read_config(self.folder)
        dtype = dtype or default_dtype(cfg, self.device)
        if dtype not in DTYPES:
            raise KvrtError(f"unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
        self.dtype = DTYPES[dtype]
        # evaluated now, on this thread: lazy casts left to a server's thread fail there
        with mx.stream(self.device):
            self.model, self.weight_formats = load_mlx_model(self.folder, cfg, self.dtype, quantize_gguf)
        self.vocab_size = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
        self.num_layers = len(self.model.layers)
        self.args = ModelArgs.from_folder(self.folder)  # head counts for admission, read once
        # local (sliding-window) layers: kvrt's cache keeps their window, in place of mlx-lm's rotating cache
        windows = layer_windows(cfg)
        self.windows = windows if len(windows) == self.num_layers else [None] * self.num_layers
        self.ops = MLXOps()
        self.lock = threading.Lock()  # one forward at a time: MLX graphs are built and run by one thread
        # the wrapper must sit in the modules of the model just loaded (imported by the loader)
        install_attention({type(m).__module__ for m in self.model.modules()})

    def new_cache(self, spec="full") -> KVCache:
        return KVCache(self.ops, self.num_layers, spec, windows=self.windows)

    def adapters(self, cache: KVCache) -> list[MLXLayerCache]:
        """mlx-lm's per-layer view of a kvrt cache, built once and kept on it as `cache.mlx_layers`."""
        if not isinstance(cache, KVCache) or len(cache) != self.num_layers:
            raise KvrtError(f"forward needs a KVCache with {self.num_layers} layers (use runtime.new_cache())")
        if getattr(cache, "mlx_layers", None) is None:
            cache.mlx_layers = [MLXLayerCache(layer) for layer in cache.layers]
        for adapter in cache.mlx_layers:
            adapter.pending = None  # drop a stash left by a forward that failed midway
        return cache.mlx_layers

    def forward(self, ids: list[int], cache: KVCache, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None) -> mx.array:
        """Feed token ids after what the cache holds; float32 logits [T, V] (all_logits) or [1, V], evaluated.
        `progress(layers done, layers)` follows a multi-token chunk through the model (each layer is
        then evaluated as it is built, so the count is work done, not graph built)."""
        check_token_ids(ids, self.vocab_size)
        tokens = mx.array([ids], dtype=mx.int32)
        with self.lock, mx.stream(self.device):
            layers = self.adapters(cache)
            for i, layer in enumerate(layers):
                layer.attended = None if progress is None else functools.partial(progress, i + 1, len(layers))
            logits = self._logits(tokens, layers, all_logits)
            if any(layer.pending is not None for layer in layers):
                raise KvrtError(f"{type(self.model).__module__}: attention bypassed kvrt's cache; model not supported")
            logits = logits.astype(mx.float32)
            mx.eval(logits, *cache_state(cache))
        return logits

    def decode(self, tokens: list[int], cache: KVCache) -> mx.array:
        """One decode step of a batch: token b goes after what row b of the cache holds, each row
        at its own position; float32 logits [B, V], evaluated."""
        check_token_ids(tokens, self.vocab_size)
        if len(tokens) != cache.rows:
            raise KvrtError(f"{len(tokens)} tokens for a cache of {cache.rows} rows")
        ids = mx.array(tokens, dtype=mx.int32)[:, None]
        with self.lock, mx.stream(self.device):
            layers = self.adapters(cache)
            for layer in layers:
                layer.attended = None
            logits = self.model(ids, cache=layers)[:, -1].astype(mx.float32)
            mx.eval(logits, *cache_state(cache))
        return logits

    def _logits(self, tokens: mx.array, layers: list[MLXLayerCache], all_logits: bool) -> mx.array:
        """[T, V] or [1, V] in the model dtype (lazy)."""
        model = self.model
        if all_logits or type(model).__module__ not in PLAIN_HEAD_MODULES:
            logits = model(tokens, cache=layers)[0]
            return logits if all_logits else logits[-1:]
        hidden = model.model(tokens, cache=layers)[:, -1:]  # only the last row goes through the head
        tied = getattr(model, "tie_word_embeddings", None)  # gemma3_text keeps it on the model, not its args
        tied = model.args.tie_word_embeddings if tied is None else tied
        head = model.model.embed_tokens.as_linear if tied else model.lm_head
        return head(hidden)[0]

    def kv_shape(self) -> tuple[int, int, int, int]:
        """(layers, KV heads, head dim, bytes per element) of what the cache stores."""
        return self.num_layers, self.args.num_kv_heads, self.args.head_dim, self.dtype.size

    @property
    def query_heads(self) -> int:
        return self.args.num_heads

    def synchronize(self) -> None:
        mx.synchronize()

    def peak_memory_bytes(self) -> int:
        """The larger of MLX's peak allocation and the process's peak resident memory."""
        return max(mx.get_peak_memory(), peak_rss_bytes())
