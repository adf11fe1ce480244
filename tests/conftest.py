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


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """The Hugging Face hub offline, with an empty cache of the test's own (returned): what a run without
    --data finds there is only what the test puts in it."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.fixture(scope="module", params=["torch", "mlx"])
def tiny_qwen2(request, tiny_model_dir):
    """The tiny random qwen2 model loaded on each backend (MLX where it imports)."""
    if request.param == "mlx":
        pytest.importorskip("mlx.core")
    import kvrt

    return kvrt.load(str(tiny_model_dir("qwen2")), backend=request.param)


def _test_home() -> Path:
    return Path(os.environ.get("KVRT_TEST_HOME", REPO / ".cache-test"))


def unavailable(reason: str) -> None:
    """A model or file the test needs could not be fetched or converted: a skip on a machine without
    the network, a failure in CI (`CI` set), where it must be fetched."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(reason)
    pytest.skip(reason)


def _resolved_in_test_home(name: str) -> Path:
    """Model `name` fetched and converted once into the reusable test cache (see `unavailable`)."""
    from kvrt.errors import KvrtError
    from kvrt.models import store as model_store

    old = os.environ.get("KVRT_HOME")
    os.environ["KVRT_HOME"] = str(_test_home())
    try:
        return model_store.resolve_model(name, log=lambda *a: None)
    except KvrtError as e:
        unavailable(f"model {name} unavailable: {e}")
    finally:
        if old is None:
            os.environ.pop("KVRT_HOME", None)
        else:
            os.environ["KVRT_HOME"] = old


@pytest.fixture(scope="session")
def default_model_dir():
    """The real default model converted into a reusable test cache (see `unavailable`)."""
    return _resolved_in_test_home("default")


@pytest.fixture(scope="session")
def gemma3_270m_dir():
    """Gemma-3-270M (the `gemma3-270m` alias: four PyPI wheels) converted into the reusable test
    cache, like the default model (see `unavailable`)."""
    return _resolved_in_test_home("gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_270m_gguf():
    """Gemma-3-270M's GGUF itself (joined from its wheels, hash checked), kept in the test cache's
    gguf/ folder for tests that load it with other tools (see `unavailable`)."""
    import shutil
    import tempfile

    from kvrt.errors import KvrtError
    from kvrt.models import store as model_store

    spec = model_store.MODEL_ALIASES["gemma3-270m"]
    folder = _test_home() / "gguf"
    path = folder / spec.gguf_name
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder))
        try:
            os.replace(model_store.fetch_wheel_gguf(spec, tmp), path)  # atomic: never a half-written GGUF
        except KvrtError as e:
            unavailable(f"gemma3-270m GGUF unavailable: {e}")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path
