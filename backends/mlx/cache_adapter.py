"""kvrt's layer cache behind mlx-lm's cache protocol, and kvrt attention installed into mlx-lm.

Every mlx-lm attention block does

    keys, values = cache.update_and_fetch(keys, values)      # k/v [B, Hkv, T, D], after RoPE
    out = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=..., mask=...)

with the name `scaled_dot_product_attention` imported into its own module from
`mlx_lm.models.base`. The adapter stashes the new k/v in `update_and_fetch`; the wrapper
installed under that name in each model module hands q and the stash to
`LayerCache.attend`, which stores them in kvrt's tiers and returns the (out, lse)-merged
attention. Any cache that is not an adapter goes to mlx-lm's original function unchanged.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, Iterable

import mlx.core as mx

from kvrt.cache.kvcache import LayerCache
from kvrt.errors import KvrtError


class MLXLayerCache:
    """One kvrt LayerCache seen through mlx-lm's per-layer cache protocol."""

    def __init__(self, layer: LayerCache):
        self.layer = layer
        self.pending: tuple[mx.array, mx.array] | None = None  # this step's k/v, until attention takes them
        self.attended: Callable[[], None] | None = None  # progress report after this layer's attention

    @property
    def offset(self) -> "int | mx.array":
        """Absolute position of the next token (RoPE reads it before update_and_fetch); in a batch
        whose rows differ, one per row (mx.fast.rope takes per-row offsets)."""
        offset = self.layer.offset
        return offset if isinstance(offset, int) else mx.array(offset.astype("int32"))

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Stash k/v [B, Hkv, T, D]; they are stored by `attend`, which also needs the queries."""
        self.pending = (keys, values)
        return keys, values  # only the wrapper reads these, and only to check they are the stash

    def attend(self, queries: mx.array, keys: mx.array, scale: float) -> mx.array:
        """Attention out [B, Hq, T, D] of queries [B, Hq, T, D] over the cache plus the stashed k/v."""
        if self.pending is None or keys is not self.pending[0]:
            raise KvrtError("this model's attention does not pass the keys it cached to attention; kvrt cannot run it")
        k, v = self.pending
        self.pending = None
        out = self.layer.attend(queries, k, v, scale)
        if self.attended is not None:
            mx.eval(out)  # run the layer now, so that progress counts work done
            self.attended()
        return out

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """No mask: LayerCache.attend is causal by construction, and a local layer keeps its own window."""
        if window_size is not None and self.layer.window is None:
            raise KvrtError(f"mlx-lm asks for a sliding window of {window_size} where the model's config "
                            "names none; kvrt cannot run this model")
        return None

    @property
    def state(self) -> list[mx.array]:
        """Every array the layer's tiers store (mlx-lm's generate evaluates these between chunks)."""
        return self.layer.arrays()

    @state.setter
    def state(self, value) -> None:
        raise KvrtError("a kvrt cache cannot be restored from an mlx-lm prompt-cache file")

    @property
    def meta_state(self) -> str:
        return ""

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return self.layer.trim(n)

    def size(self) -> int:
        return int(max(self.layer.offset)) if not isinstance(self.layer.offset, int) else self.layer.offset

    def empty(self) -> bool:
        return self.layer.offset == 0

    @property
    def nbytes(self) -> int:
        return self.layer.nbytes()


def _kvrt_sdpa(original):
    """mlx-lm's scaled_dot_product_attention, except that kvrt caches attend through kvrt."""

    @functools.wraps(original)
    def scaled_dot_product_attention(queries, keys, values, cache=None, scale=None, mask=None, **kwargs):
        if not isinstance(cache, MLXLayerCache):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kwargs)
        if kwargs.get("sinks") is not None:
            raise KvrtError("attention sinks are not supported by kvrt's cache")
        return cache.attend(queries, keys, scale)

    scaled_dot_product_attention.kvrt_original = original
    return scaled_dot_product_attention


def install_attention(model_modules: Iterable[str] = ()) -> int:
    """Put the kvrt wrapper wherever an mlx-lm module holds base's function; idempotent.

    Covers every imported `mlx_lm.models.*` module plus `model_modules` (the modules of the
    loaded model's classes). Returns how many modules now hold the wrapper.
    """
    import mlx_lm.models.base as base

    current = base.scaled_dot_product_attention
    original = getattr(current, "kvrt_original", current)
    wrapper = current if original is not current else _kvrt_sdpa(original)
    names = {name for name in sys.modules if name.startswith("mlx_lm.models.")} | set(model_modules)
    patched = 0
    for name in sorted(names):
        module = sys.modules.get(name)
        held = getattr(module, "scaled_dot_product_attention", None)
        if held is original:  # imported from base and not yet wrapped
            module.scaled_dot_product_attention = wrapper
        patched += getattr(module, "scaled_dot_product_attention", None) is wrapper
    return patched
