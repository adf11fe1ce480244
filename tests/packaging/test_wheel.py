"""The built wheel installs backends and kernels inside the kvrt namespace, nothing generic at top level."""

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_imports_all_three(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist")],
        check=True, capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("kvrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"kvrt", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    # every package of the source tree ships (kvrt/methods once did not)
    sources = {p.parent.relative_to(REPO / "kvrt").as_posix() for p in (REPO / "kvrt").rglob("__init__.py")}
    shipped = {Path(n).parent.relative_to("kvrt").as_posix() for n in names if n.startswith("kvrt/") and n.endswith("__init__.py")}
    assert sources <= shipped, sources - shipped

    env_dir = tmp_path / "fresh"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    # numpy, the one dependency the cache's row bookkeeping needs at import (no torch, no mlx)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "numpy"], check=True, capture_output=True)
    probe = (
        "import kvrt, kvrt.backends, kvrt.backends.torch, kvrt.backends.mlx, kvrt.kernels_cuda, kvrt.kernels_metal;"
        "from kvrt.kernels_cpu.build import library; assert library() is not None;"  # built from the shipped C
        "from kvrt.cache.spec import CacheSpec; CacheSpec.parse('snapkv:budget=64+calidrop:offload=int2+ott:bits=2');"
        "import importlib.util as u; print(kvrt.backends.__file__);"
        "print(u.find_spec('backends') is None and u.find_spec('kernels_cuda') is None)"
    )
    done = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                          env={**os.environ, "KVRT_HOME": str(tmp_path / "home")})
    location, no_generic_names = done.stdout.split()
    assert str(env_dir) in location and location.endswith("kvrt/backends/__init__.py")
    assert no_generic_names == "True"
