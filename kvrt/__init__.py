"""kvrt: a KV-cache runtime for LLM inference (eviction, calibration, low-bit quantization)."""

import os as _os

__version__ = "0.1.0"

# Imported from a source checkout (the repo root on sys.path), the subpackages kvrt.backends and
# kvrt.kernels_* are the folders beside this one; the wheel and the editable install put them inside.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "backends")) and _os.path.isfile(
        _os.path.join(_root, "backends", "__init__.py")):
    __path__.append(_root)

# what `kvrt.X` names, loaded on first use so that `import kvrt` stays light
_EXPORTS = {
    "Model": "kvrt.api", "Generation": "kvrt.api", "TextStream": "kvrt.generation.stream", "ChatSession": "kvrt.generation.chat",
    "GenerationStats": "kvrt.generation.stats", "SamplingParams": "kvrt.generation.sampling", "CacheSpec": "kvrt.cache.spec",
    "KvrtError": "kvrt.errors", "InvalidValue": "kvrt.errors",
}
__all__ = ["load", *_EXPORTS]


def load(model: str = "default", backend: str = "auto", dtype: str | None = None, log=None):
    """Load a model (folder, .gguf, 'default' or hub id) on a backend; see kvrt.api.Model."""
    from kvrt.api import load as _load

    return _load(model, backend=backend, dtype=dtype, log=log)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvrt' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
