"""Every user file kvrt eval reads (LongBench JSONL, haystack text, a run's settings.json and
predictions) fails as one KvrtError naming the file and line: never a UnicodeDecodeError,
IsADirectoryError or KeyError from deep inside."""

import json
from pathlib import Path

import pytest

from kvrt.errors import KvrtError
from kvrt.eval.files import read_file, utf8
from kvrt.eval.haystack import sentence_stream
from kvrt.eval.longbench import read_jsonl
from kvrt.eval.report import load_records
from kvrt.eval.runner import RECORD_FIELDS, Settings, prepare_out

GOOD_LONGBENCH = json.dumps({"input": "q", "context": "c", "answers": ["a"]}).encode() + b"\n"


def run_settings() -> Settings:
    return Settings(model="tiny", caches=["full"], tasks=["passkey"], lengths=[350], limit=2)


def a_record(sample_id: str, prediction: str = "12345") -> bytes:
    record = {k: 1 for k in RECORD_FIELDS} | {"id": sample_id, "cache": "full", "task": "passkey",
                                              "prediction": prediction, "meta": {}}
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def a_run(tmp_path: Path, settings: bytes | None = None) -> Path:
    """A run folder holding the given settings.json bytes (default: valid ones)."""
    run = tmp_path / "run"
    (run / "predictions" / "full").mkdir(parents=True)
    default = json.dumps(run_settings().as_dict()).encode()
    (run / "settings.json").write_bytes(default if settings is None else settings)
    return run


def test_invalid_utf8_names_the_line_and_column():
    with pytest.raises(KvrtError) as error:
        utf8(b"one\ntwo\nabc\xffdef\n", Path("x.txt"))
    assert str(error.value) == "x.txt:3: not valid UTF-8 (byte 0xff at column 4: invalid start byte)"
    with pytest.raises(KvrtError) as error:
        utf8(b"\xc3(", Path("x.txt"), line=7)  # line 7 of a file read line by line
    assert str(error.value) == "x.txt:7: not valid UTF-8 (byte 0xc3 at column 1: invalid continuation byte)"


def test_a_missing_file_a_folder_and_an_unreadable_file_are_named(tmp_path, monkeypatch):
    with pytest.raises(KvrtError, match="^haystack file not found: .*nope.txt$"):
        read_file(tmp_path / "nope.txt", "haystack file")
    with pytest.raises(KvrtError, match=f"^haystack file {tmp_path} is a folder, not a file$"):
        read_file(tmp_path, "haystack file")
    locked = tmp_path / "locked.txt"
    locked.write_text("secret")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # tests run as root, where chmod 000 still reads
    with pytest.raises(KvrtError, match="^cannot read haystack file .*locked.txt: Permission denied$"):
        read_file(locked, "haystack file")


def test_longbench_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "hotpotqa.jsonl"
    path.write_bytes(GOOD_LONGBENCH + b'{"input": "caf\xe9", "context": "c", "answers": ["a"]}\n')
    with pytest.raises(KvrtError, match=r"hotpotqa\.jsonl:2: not valid UTF-8 \(byte 0xe9 at column 15: invalid cont"):
        read_jsonl(path)


@pytest.mark.parametrize("content,needle", [
    (None, "LongBench file .*hotpotqa.jsonl is a folder, not a file"),
    (GOOD_LONGBENCH + b"[1, 2]\n", r"hotpotqa\.jsonl:2: not a JSON object"),
])
def test_longbench_folders_and_non_objects_are_named(tmp_path, content, needle):
    path = tmp_path / "hotpotqa.jsonl"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(KvrtError, match=needle):
        read_jsonl(path)


def test_haystack_invalid_utf8_is_an_error_not_replacement_characters(tmp_path):
    story = tmp_path / "story.txt"
    story.write_bytes(b"The cat sat.\nThe dog \x80barked.\n")
    with pytest.raises(KvrtError, match=r"story\.txt:2: not valid UTF-8 \(byte 0x80 at column 9: invalid start"):
        next(sentence_stream(0, [str(story)]))


def test_a_haystack_folder_is_named_as_one(tmp_path):
    with pytest.raises(KvrtError, match="is a folder, not a file"):
        next(sentence_stream(0, [str(tmp_path)]))


@pytest.mark.parametrize("saved,needle", [
    (b'{"model": "caf\xe9"}', r"settings\.json:1: not valid UTF-8 .*; pass --overwrite"),
    (b'{"model": ', r"settings\.json:1: not valid JSON .*; pass --overwrite"),
    (b"[]", "holds a run with other settings; pass --overwrite"),
])
def test_a_damaged_settings_file_is_refused_by_name_and_replaced_by_overwrite(tmp_path, saved, needle):
    run = a_run(tmp_path, saved)
    with pytest.raises(KvrtError, match=needle):
        prepare_out(run, run_settings(), overwrite=False)
    prepare_out(run, run_settings(), overwrite=True)
    assert json.loads((run / "settings.json").read_text()) == run_settings().as_dict()


def test_a_folder_in_place_of_settings_is_an_error_even_when_overwriting(tmp_path):
    (tmp_path / "run" / "settings.json").mkdir(parents=True)
    for overwrite in (False, True):
        with pytest.raises(KvrtError, match=r"settings file .*settings\.json is a folder, not a file"):
            prepare_out(tmp_path / "run", run_settings(), overwrite=overwrite)


@pytest.mark.parametrize("saved,needle", [
    (b'{"model": \n', r"settings\.json:2: not valid JSON"),
    (b'\xff{}', r"settings\.json:1: not valid UTF-8 \(byte 0xff at column 1: invalid start byte\)"),
    (b"[1]", r"settings\.json: not a JSON object"),
    (b'{"model": "m"}', r"settings\.json: not kvrt eval settings \(missing caches, tasks"),
])
def test_report_names_a_damaged_settings_file(tmp_path, saved, needle):
    with pytest.raises(KvrtError, match=needle):
        load_records(a_run(tmp_path, saved))


@pytest.mark.parametrize("lines,needle", [
    (b'\x80{"id": 1}\n', r"passkey-350\.jsonl:2: not valid UTF-8 \(byte 0x80 at column 1: invalid start byte\)"),
    (b'["a list"]\n', r"passkey-350\.jsonl:2: not a JSON object"),
    (b'{"id": "passkey-350-1"}\n', r"passkey-350\.jsonl:2: not a kvrt eval record \(missing cache, task"),
])
def test_report_names_a_damaged_predictions_line(tmp_path, lines, needle):
    run = a_run(tmp_path)
    (run / "predictions" / "full" / "passkey-350.jsonl").write_bytes(a_record("passkey-350-0") + lines)
    with pytest.raises(KvrtError, match=needle + ".*; rerun the kvrt eval command"):
        load_records(run)


def test_report_names_a_predictions_folder(tmp_path):
    run = a_run(tmp_path)
    (run / "predictions" / "full" / "passkey-350.jsonl").mkdir()
    with pytest.raises(KvrtError, match=r"predictions file .*passkey-350\.jsonl is a folder, not a file"):
        load_records(run)


def test_report_reads_predictions_holding_unicode_line_separators(tmp_path):
    # json.dumps leaves U+2028 and U+0085 raw; only "\n" ends a predictions line
    run = a_run(tmp_path)
    (run / "predictions" / "full" / "passkey-350.jsonl").write_bytes(
        a_record("passkey-350-0", "one\u2028two") + a_record("passkey-350-1", "x\x85y\x1cz"))
    _, records = load_records(run)
    assert [r["prediction"] for r in records] == ["one\u2028two", "x\x85y\x1cz"]
