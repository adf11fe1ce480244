"""Reading the files a user hands kvrt eval (LongBench JSONL, haystack text, a run folder's
settings and predictions): every way one can be wrong (missing, a folder, unreadable, not
UTF-8, not JSON, not an object) ends as one KvrtError naming the file, and the line where
there is one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from kvrt.errors import KvrtError


def read_file(path: Path, what: str) -> bytes:
    """The bytes of `path`; `what` names the file in the error ("haystack file")."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KvrtError(f"{what} not found: {path}") from None
    except OSError as exc:
        if path.is_dir():  # Windows says "permission denied" for a folder, so ask the path itself
            raise KvrtError(f"{what} {path} is a folder, not a file") from None
        raise KvrtError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def utf8(data: bytes, path: Path, line: int = 1) -> str:
    """`data` (which starts at `line` of `path`) decoded; invalid UTF-8 names the line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line += data.count(b"\n", 0, exc.start)
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        raise KvrtError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at column {column}: "
                        f"{exc.reason})") from None


def json_line(line: bytes, path: Path, number: int) -> dict:
    """The JSON object on line `number` of a JSONL file."""
    try:
        value = json.loads(utf8(line, path, number))
    except json.JSONDecodeError as exc:
        raise KvrtError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise KvrtError(f"{path}:{number}: not a JSON object")
    return value


def jsonl_objects(path: Path, what: str) -> Iterator[tuple[int, dict]]:
    """(line number, JSON object) of each non-blank line of a JSONL file, one at a time: a benchmark's
    file may run to hundreds of MB where a run reads its first few records."""
    data = read_file(path, what)
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end == -1 else end
        if data[start:end].strip():
            yield number, json_line(data[start:end], path, number)
        start, number = end + 1, number + 1


def json_value(data: bytes, path: Path) -> object:
    """The JSON value a whole file's bytes hold."""
    try:
        return json.loads(utf8(data, path))
    except json.JSONDecodeError as exc:
        raise KvrtError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None


def json_file(path: Path, what: str) -> dict:
    """The JSON object a whole file holds (settings.json)."""
    value = json_value(read_file(path, what), path)
    if not isinstance(value, dict):
        raise KvrtError(f"{path}: not a JSON object")
    return value
