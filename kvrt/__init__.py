"""kvrt: a KV-cache runtime for LLM inference (eviction, calibration, low-bit quantization)."""

__version__ = "0.1.0"


def load(model: str = "default", backend: str = "auto", dtype: str | None = None, log=None):
    """Load a model (folder, .gguf, 'default' or hub id) on a backend; see kvrt.api.Model."""
    from kvrt.api import load as _load

    return _load(model, backend=backend, dtype=dtype, log=log)


def __getattr__(name):
    # keep `import kvrt` light: the API classes load on first use
    if name in ("Model", "Generation"):
        from kvrt import api

        return getattr(api, name)
    if name == "CacheSpec":
        from kvrt.spec import CacheSpec

        return CacheSpec
    raise AttributeError(name)
