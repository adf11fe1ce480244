"""Choosing a backend: --backend auto picks MLX on Apple Silicon only, torch elsewhere."""

import pytest

from kvrt.errors import KvrtError
from kvrt.models import loading


@pytest.mark.parametrize("platform, machine, have, picked", [
    ("darwin", "arm64", {"mlx_lm", "torch"}, "mlx"),
    ("darwin", "arm64", {"torch"}, "torch"),
    ("linux", "x86_64", {"mlx_lm", "torch"}, "torch"),
    ("linux", "aarch64", {"mlx_lm", "torch"}, "torch"),
    ("darwin", "x86_64", {"mlx_lm", "torch"}, "torch"),
    ("linux", "x86_64", {"mlx_lm"}, None),  # MLX's CPU backend only when asked for
    ("darwin", "arm64", set(), None),
])
def test_auto_picks_mlx_on_apple_silicon_only(monkeypatch, platform, machine, have, picked):
    monkeypatch.setattr(loading.sys, "platform", platform)
    monkeypatch.setattr(loading.platform, "machine", lambda: machine)
    monkeypatch.setattr(loading, "installed", lambda module: module in have)
    if picked is None:
        with pytest.raises(KvrtError) as refused:
            loading.pick_backend("auto")
        assert "\n" not in str(refused.value) and "pip install" in str(refused.value)
    else:
        assert loading.pick_backend("auto") == picked
    assert loading.pick_backend("mlx") == "mlx" and loading.pick_backend("torch") == "torch"
