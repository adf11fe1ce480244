"""The installed kvrt (editable in CI, as the README installs it) is found from anywhere."""

import subprocess
import sys


def test_a_script_beside_a_clone_folder_named_kvrt_imports_the_real_package(tmp_path):
    """A clone at ./kvrt has no __init__.py at its root, so Python's path scan meets it first as a
    namespace package; the real package must still win."""
    clone = tmp_path / "kvrt"
    (clone / "tests").mkdir(parents=True)
    (clone / "pyproject.toml").write_text("[project]\nname = 'kvrt'\n")
    (tmp_path / "use_kvrt.py").write_text(
        "import kvrt, kvrt.backends, kvrt.kernels_metal\n"
        "print(callable(kvrt.load), kvrt.SamplingParams().temp)\n")
    done = subprocess.run([sys.executable, "use_kvrt.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["True", "0.0"]
