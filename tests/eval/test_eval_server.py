"""`kvrt eval --server`: the same samples against a kvrt server started here, each spec sent per
request; greedy predictions must equal a local run's, and a server that cannot be used is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from serving.test_serve import REPO, start  # noqa: E402  (the same server harness)

SPECS = ["full", "snapkv:budget=128"]


def eval_run(default_model_dir, out, *extra: str) -> subprocess.CompletedProcess:
    args = ["--model", "default", "--tasks", "passkey,vt", "--lengths", "400", "--limit", "2", "--out", str(out)]
    for spec in SPECS:
        args += ["--cache", spec]
    return subprocess.run([sys.executable, "-m", "kvrt.cli", "eval", *args, *extra], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "KVRT_HOME": str(default_model_dir.parent.parent)})


def predictions(out) -> dict[tuple, str]:
    found = {}
    for path in (out / "predictions").rglob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            found[record["cache"], record["task"], record["id"]] = record["prediction"]
    return found


@pytest.mark.model
@pytest.mark.slow
def test_a_server_run_predicts_what_a_local_run_does_for_every_spec(default_model_dir, tmp_path_factory, tmp_path):
    local = eval_run(default_model_dir, tmp_path / "local")
    assert local.returncode == 0, local.stderr[-2000:]
    server = start(default_model_dir, tmp_path_factory, "eval-server", "--api-key", "secret")
    try:
        served = eval_run(default_model_dir, tmp_path / "served", "--server", server.url, "--api-key", "secret",
                          "--workers", "3")
        assert served.returncode == 0, served.stderr[-2000:]
        refused = eval_run(default_model_dir, tmp_path / "refused", "--server", server.url, "--api-key", "wrong")
    finally:
        assert server.stop() == 0
    wanted = predictions(tmp_path / "local")
    assert len(wanted) == len(SPECS) * 2 * 2 and predictions(tmp_path / "served") == wanted
    settings = json.loads((tmp_path / "served" / "settings.json").read_text())
    assert settings["server"] == server.url
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "401" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.model
def test_a_server_that_is_not_there_is_one_line(default_model_dir, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    run = eval_run(default_model_dir, tmp_path / "run", "--server", f"http://127.0.0.1:{port}")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "cannot reach the server" in run.stderr and len(run.stderr.strip().splitlines()) == 1
