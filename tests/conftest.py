"""Shared fixtures: tiny random model folders and the real default model (marked `model`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # so tests can `import gguf_fixtures`
sys.path.insert(0, str(REPO))  # so `import kvrt` works without installing


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "model: needs the real default model (downloads ~100 MB once; deselect with -m 'not model')")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(arch)`` -> a cached tiny random HF folder (llama|mistral|qwen2|qwen3)."""
    from gguf_fixtures import write_tiny_hf_model

    made: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in made:
            made[arch] = write_tiny_hf_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model converted into a reusable test cache (skips when unreachable)."""
    from kvrt.errors import KvrtError
    from kvrt import model_store

    home = Path(os.environ.get("KVRT_TEST_HOME", REPO / ".cache-test"))
    old = os.environ.get("KVRT_HOME")
    os.environ["KVRT_HOME"] = str(home)
    try:
        return model_store.resolve_model("default", log=lambda *a: None)
    except KvrtError as e:
        pytest.skip(f"default model unavailable: {e}")
    finally:
        if old is None:
            os.environ.pop("KVRT_HOME", None)
        else:
            os.environ["KVRT_HOME"] = old
