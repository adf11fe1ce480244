"""The README's library example runs as written, on the default model."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.model
def test_readme_library_example_runs(default_model_dir):
    readme = (REPO / "README.md").read_text()
    (example,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "kvrt.load" in block]
    env = {**os.environ, "KVRT_HOME": str(default_model_dir.parent.parent)}
    done = subprocess.run([sys.executable, "-c", example], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "calidrop" in done.stdout
    assert re.search(r"\bParis\b", done.stdout)  # the first answer
    assert re.search(r"^\[\d+ tokens\]$", done.stdout, re.M)  # the stream ends its line before the next print
    assert done.stdout.count("\n") >= 8  # every step prints what it computed
