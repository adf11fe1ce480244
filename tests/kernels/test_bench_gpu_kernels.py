"""bench/gpu_kernels.py, the GPU check, runs end to end in miniature on CPU (kernels interpreted),
so a session lent a GPU can run it in one call."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kernels
REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "bench" / "gpu_kernels.py")


@pytest.mark.slow
def test_the_gpu_bench_runs_in_miniature_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert result["failures"] == []
    assert {(r["tokens"], r["batch"]) for r in result["decode"]} == {(256, 1), (256, 2)}
    paths = {r["spec"]: r["paths"] for r in result["end_to_end"]}
    assert "quantized decode: triton" in paths["ott:bits=2"] and "quantize: triton" in paths["ott:bits=2"]
    assert "quantized decode: reference" in paths["ott:bits=2 (KVRT_KERNELS=off)"]
    assert "window scores: triton" in paths["snapkv:budget=300+ott:bits=2"]
    assert "| SDPA / 2-bit |" in done.stdout  # the decode table is printed


def test_without_a_gpu_it_says_so_in_one_line():
    done = subprocess.run([sys.executable, SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: no CUDA device") and len(done.stderr.strip().splitlines()) == 1
