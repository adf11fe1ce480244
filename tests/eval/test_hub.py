"""Benchmark files from --data or the Hugging Face hub's cache (huggingface_hub's own layout, written
here as a download leaves it), and the one line a missing file gives offline."""

import json
import zipfile
from pathlib import Path

import pytest

from kvrt.errors import KvrtError
from kvrt.eval.hub import HubFile, data_file

V2 = HubFile("THUDM/LongBench-v2", "data.json")
V1 = HubFile("THUDM/LongBench", "data.zip", "data/hotpotqa.jsonl")


@pytest.fixture
def hub_cache(offline_hub, tmp_path, monkeypatch):
    """The offline hub's empty cache and a kvrt home of the test's own; returns a function that caches a file."""
    monkeypatch.setenv("KVRT_HOME", str(tmp_path / "kvrt"))
    cache = offline_hub

    def cached(repo: str, filename: str) -> Path:
        folder = cache / f"datasets--{repo.replace('/', '--')}"
        commit = "0" * 40
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        path = folder / "snapshots" / commit / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    return cached


def test_data_dir_wins_and_a_missing_file_says_where(tmp_path):
    (tmp_path / "data.json").write_text("[]")
    assert data_file(str(tmp_path), "data.json", V2, "longbench_v2") == tmp_path / "data.json"
    with pytest.raises(KvrtError, match=r"longbench_v2 reads --data DIR/data.json, which is missing under .*"
                                        r"huggingface.co/datasets/THUDM/LongBench-v2/resolve/main/data.json"):
        data_file(str(tmp_path / "empty"), "data.json", V2, "longbench_v2")


def test_offline_without_a_cached_copy_is_one_line(hub_cache):
    with pytest.raises(KvrtError) as info:
        data_file(None, "data.json", V2, "longbench_v2")
    message = str(info.value)
    assert "\n" not in message and "could not be fetched" in message
    assert "put it at DIR/data.json and pass --data DIR" in message


def test_a_cached_hub_file_serves_offline(hub_cache):
    path = hub_cache("THUDM/LongBench-v2", "data.json")
    path.write_text(json.dumps([{"_id": "x"}]))
    assert data_file(None, "data.json", V2, "longbench_v2").read_text() == path.read_text()


def test_a_file_inside_a_cached_zip_is_extracted_once(hub_cache, tmp_path):
    archive = hub_cache("THUDM/LongBench", "data.zip")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/hotpotqa.jsonl", '{"input": "q", "context": "c", "answers": ["a"]}\n')
    logs = []
    first = data_file(None, "hotpotqa.jsonl", V1, "hotpotqa", log=logs.append)
    assert first == tmp_path / "kvrt" / "datasets" / "THUDM--LongBench" / "hotpotqa.jsonl"
    assert json.loads(first.read_text())["answers"] == ["a"] and len(logs) == 1
    assert data_file(None, "hotpotqa.jsonl", V1, "hotpotqa", log=logs.append) == first and len(logs) == 1


def test_a_zip_without_the_file_is_one_line_and_leaves_nothing(hub_cache, tmp_path):
    archive = hub_cache("THUDM/LongBench", "data.zip")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/other.jsonl", "{}\n")
    with pytest.raises(KvrtError, match="does not hold data/hotpotqa.jsonl"):
        data_file(None, "hotpotqa.jsonl", V1, "hotpotqa")
    assert not any((tmp_path / "kvrt" / "datasets").rglob("*hotpotqa*"))


def test_an_unreachable_hub_is_one_line_without_its_retry_warnings(monkeypatch):
    import logging

    import huggingface_hub

    warned = []

    def unreachable(*args, **kwargs):  # what hf_hub_download does without a network: warn per retry, then raise
        warned.append(logging.getLogger("huggingface_hub.utils._http").isEnabledFor(logging.WARNING))
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    before = logging.getLogger("huggingface_hub").level
    with pytest.raises(KvrtError, match="could not be fetched"):
        data_file(None, "data.json", V2, "longbench_v2")
    assert warned == [False]  # its retry warnings would print a dozen lines above kvrt's one
    assert logging.getLogger("huggingface_hub").level == before  # restored
