"""Benchmark files by their published names: from `--data DIR` when given, else from the benchmark's
Hugging Face dataset repository, downloaded once by huggingface_hub into its own cache (a file inside
a published zip, such as LongBench's data.zip, is extracted once under kvrt's cache). Offline, a
missing file is one line that says which file to put where.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kvrt.errors import KvrtError
from kvrt.models.store import hub_offline, hub_quiet, kvrt_home


@dataclass(frozen=True)
class HubFile:
    repo: str  # the dataset's id on the hub
    filename: str  # the file in that repository
    member: str | None = None  # the file inside it, when it is a zip

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}/resolve/main/{self.filename}"

    def described(self) -> str:
        inside = f" (its {self.member})" if self.member else ""
        return f"{self.url}{inside}"


def data_file(data_dir: str | None, name: str, hub: HubFile, what: str, log=print) -> Path:
    """The benchmark file `name`: DIR/name under --data, else the hub's copy (fetched once, then cached)."""
    if data_dir is not None:
        path = Path(data_dir) / name
        if not path.exists():  # a folder by that name is read_file's error, which names it so
            raise KvrtError(f"{what} reads --data DIR/{name}, which is missing under {data_dir} (from {hub.described()})")
        return path
    return _fetched(hub, name, what, log)


def _fetched(hub: HubFile, name: str, what: str, log) -> Path:
    where = (f"{what} needs {name} from the Hugging Face hub ({hub.described()}), which could not be fetched "
             f"(offline?); put it at DIR/{name} and pass --data DIR")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise KvrtError(f"huggingface_hub is not installed: {where}") from None
    try:
        # local_files_only when offline: a cached copy still serves; the env is read here, not at import
        with hub_quiet():
            path = Path(hf_hub_download(hub.repo, hub.filename, repo_type="dataset", local_files_only=hub_offline()))
    except Exception:  # no connection, offline mode, a removed repository: all mean "can't get it"
        raise KvrtError(where) from None
    return _extracted(path, hub, name, log) if hub.member else path


def _extracted(archive: Path, hub: HubFile, name: str, log) -> Path:
    """The zip's member, extracted once beside kvrt's other caches (written whole, then renamed)."""
    out = kvrt_home() / "datasets" / hub.repo.replace("/", "--") / name
    if out.is_file() and out.stat().st_mtime >= archive.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(hub.member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, out)
    except (KeyError, zipfile.BadZipFile) as e:
        raise KvrtError(f"{archive} from {hub.repo} does not hold {hub.member} ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)  # a failed extraction leaves nothing half-written
    log(f"kvrt: extracted {hub.member} from {hub.repo}'s {hub.filename}")
    return out
