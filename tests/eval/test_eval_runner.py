"""kvrt eval's runner: resume after a kill equals an uninterrupted run, torn lines are repaired,
settings mismatches are refused, unreachable lengths are skipped and counted."""

import functools
import io
import json
import re
import shutil

import pytest
from click.testing import CliRunner

import kvrt
from kvrt.cli import cli
from kvrt.errors import KvrtError
from kvrt.eval import runner
from kvrt.eval.runner import Settings, finished, run_eval
from kvrt.models.progress import Progress

VOLATILE = ("time", "prompt_tps", "generation_tps")


@pytest.fixture(scope="module")
def long_tiny(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 1024-token context (its tokenizer spends a token on nearly every character)."""
    folder = tmp_path_factory.mktemp("tiny-long")
    shutil.copytree(tiny_model_dir("llama"), folder, dirs_exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    return folder


@pytest.fixture(scope="module")
def model(long_tiny):
    return kvrt.load(str(long_tiny), backend="torch")


def settings(**changes):
    base = dict(model="tiny", caches=["full", "streaming:budget=300"], tasks=["passkey", "vt"], lengths=[350, 400],
                limit=3)
    return Settings(**{**base, **changes})


def records(out):
    """Every written record without its timing fields, keyed by (cache, task file, id)."""
    got = {}
    for path in sorted((out / "predictions").rglob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            got[(path.parent.name, path.name, r["id"])] = {k: v for k, v in r.items() if k not in VOLATILE}
    return got


def test_a_killed_run_resumes_to_exactly_the_uninterrupted_one(model, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert run_eval(model, settings(), whole, progress=False)["written"] == 2 * 2 * 2 * 3
    expected = records(whole)

    resumed, calls = tmp_path / "resumed", [0]
    real = runner.run_sample

    def dies_on_the_seventh(*args):
        calls[0] += 1
        if calls[0] == 7:
            raise KeyboardInterrupt  # killed mid-sample: nothing of it is written
        return real(*args)

    monkeypatch.setattr(runner, "run_sample", dies_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, settings(), resumed, progress=False)
    assert len(records(resumed)) == 6
    monkeypatch.setattr(runner, "run_sample", real)
    assert run_eval(model, settings(), resumed, progress=False)["written"] == 24 - 6
    assert records(resumed) == expected
    assert run_eval(model, settings(), resumed, progress=False)["written"] == 0  # a finished run stays finished


def test_a_torn_last_line_is_cut_and_its_sample_redone(model, tmp_path):
    out = tmp_path / "run"
    run_eval(model, settings(caches=["full"], tasks=["passkey"], lengths=[350]), out, progress=False)
    (path,) = (out / "predictions").rglob("*.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2]) + lines[2][:25])  # killed while writing the third line
    assert len(finished(path)) == 2 and path.read_bytes() == b"".join(lines[:2])
    assert run_eval(model, settings(caches=["full"], tasks=["passkey"], lengths=[350]), out,
                    progress=False)["written"] == 1
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == [json.loads(x)["id"] for x in lines]


def one_cell(limit=3, **changes):
    return settings(caches=["full"], tasks=["passkey"], lengths=[350], limit=limit, **changes)


def test_a_damaged_first_line_drops_only_itself_and_is_reported(model, tmp_path):
    out = tmp_path / "run"
    run_eval(model, one_cell(), out, progress=False)
    expected = records(out)
    (path,) = (out / "predictions").rglob("*.jsonl")
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"\x00\xff" + lines[0][2:] + b"".join(lines[1:]))  # bytes damaged on disk
    said = []
    assert set(finished(path, report=said.append)) == {json.loads(x)["id"] for x in lines[1:]}
    assert path.read_bytes() == b"".join(lines[1:])
    assert said == [f"{path}: dropped 1 damaged line (line 1: not UTF-8, JSON or a kvrt eval record); "
                    "their samples run again"]
    assert run_eval(model, one_cell(), out, progress=False)["written"] == 1
    assert records(out) == expected  # the redone sample equals the damaged one


def test_every_valid_line_survives_damage_around_it(tmp_path):
    good = [json.dumps({k: 0 for k in runner.RECORD_FIELDS} | {"id": f"s{i}"}).encode() + b"\n" for i in range(4)]
    damaged = [b"{not json\n", b"[1, 2]\n", b'{"score": 1}\n', b"\xc3(\n", b"\n",
               json.dumps({k: 0 for k in runner.RECORD_FIELDS} | {"id": ["a", "list"]}).encode() + b"\n"]
    path = tmp_path / "cell.jsonl"
    path.write_bytes(damaged[0] + good[0] + b"".join(damaged[1:4]) + good[1] + good[2] + b"".join(damaged[4:])
                     + good[3] + b'{"id": "s9", "sco')  # and a torn last line
    said = []
    assert list(finished(path, report=said.append)) == ["s0", "s1", "s2", "s3"]
    assert path.read_bytes() == b"".join(good)
    assert len(said) == 1 and "dropped 6 damaged lines (lines 1, 3-5, 8-9:" in said[0] and str(path) in said[0]
    assert finished(path, report=said.append).keys() == {"s0", "s1", "s2", "s3"} and len(said) == 1


def test_a_torn_last_line_alone_is_cut_quietly(tmp_path):
    path = tmp_path / "cell.jsonl"
    whole = json.dumps({k: 0 for k in runner.RECORD_FIELDS} | {"id": "s0"}).encode() + b"\n"
    path.write_bytes(whole + whole[:30])
    said = []
    assert list(finished(path, report=said.append)) == ["s0"] and path.read_bytes() == whole and said == []


def test_repairs_replace_the_file_whole_after_fsync(tmp_path, monkeypatch):
    path = tmp_path / "cell.jsonl"
    whole = json.dumps({k: 0 for k in runner.RECORD_FIELDS} | {"id": "s0"}).encode() + b"\n"
    path.write_bytes(b"damaged\n" + whole + whole[:30])
    calls = []
    real_fsync = runner.os.fsync
    monkeypatch.setattr(runner.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])

    def crash(src, dst):
        calls.append("replace")
        raise OSError("disk gone")  # the machine dies before the rename

    monkeypatch.setattr(runner.os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        finished(path, report=lambda _: None)
    assert calls == ["fsync", "replace"] and path.read_bytes() == b"damaged\n" + whole + whole[:30]
    monkeypatch.undo()
    assert list(finished(path, report=lambda _: None)) == ["s0"] and path.read_bytes() == whole
    assert [p.name for p in tmp_path.iterdir()] == ["cell.jsonl"]


def test_records_of_other_samples_are_kept_and_crash_nothing(model, tmp_path):
    out = tmp_path / "run"
    run_eval(model, one_cell(limit=1), out, progress=False)
    (path,) = (out / "predictions").rglob("*.jsonl")
    stranger = json.loads(path.read_text()) | {"id": "passkey-350-99"}
    path.write_text(json.dumps(stranger) + "\n")
    said = []
    assert run_eval(model, one_cell(limit=1), out, progress=False, report=said.append)["written"] == 1
    assert said == ["1 cell, 1 sample: 0 already done (resumed), 1 to run"]
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["passkey-350-99", "passkey-350-0"]


def logged_progress(stream):
    """Progress as run_eval makes it, drawn at once into `stream` (not a terminal: one line per step)."""
    return functools.partial(Progress, delay=0, stream=stream)


def test_progress_in_a_log_is_one_line_per_sample_with_counts_cell_and_score(model, tmp_path):
    log, said = io.StringIO(), []
    chosen = settings(caches=["full", "h2o:budget=64"], tasks=["passkey"], lengths=[350], limit=2)
    run_eval(model, chosen, tmp_path / "run", progress=logged_progress(log), report=said.append)
    lines = log.getvalue().splitlines()
    preparing = [x for x in lines if x.startswith("kvrt: preparing samples: ")]
    running = [x for x in lines if x.startswith("kvrt: eval: ")]
    assert len(preparing) == 2 and preparing[-1].startswith("kvrt: preparing samples: 2/2 cells (100%)")
    assert [x.split(",")[0] for x in running] == [f"kvrt: eval: {n}/4 samples ({25 * n}%)" for n in (1, 2, 3, 4)]
    assert all(re.search(r"ETA \d", x) for x in running[:3])
    assert [re.sub(r".* \| ", "", x) for x in running] == [
        f"{spec} passkey-350: score {json.loads(r)['score']:.2f}" for spec, folder in
        [("full", "full"), ("h2o:budget=64", "h2o_budget_64")]
        for r in (tmp_path / "run" / "predictions" / folder / "passkey-350.jsonl").read_text().splitlines()]
    assert len(lines) == len(preparing) + len(running)
    assert said == ["2 cells, 4 samples: 0 already done (resumed), 4 to run"]


def test_a_resumed_run_counts_what_was_done_and_shows_only_what_runs(model, tmp_path, monkeypatch):
    out, real, calls = tmp_path / "run", runner.run_sample, [0]

    def dies_on_the_third(*args):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(runner, "run_sample", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_eval(model, one_cell(limit=4), out, progress=False)
    monkeypatch.setattr(runner, "run_sample", real)
    log, said = io.StringIO(), []
    run_eval(model, one_cell(limit=4), out, progress=logged_progress(log), report=said.append)
    assert said == ["1 cell, 4 samples: 2 already done (resumed), 2 to run"]
    assert [x.split(",")[0] for x in log.getvalue().splitlines() if x.startswith("kvrt: eval:")] == [
        "kvrt: eval: 1/2 samples (50%)", "kvrt: eval: 2/2 samples (100%)"]


def test_progress_false_writes_nothing(model, tmp_path, capsys):
    run_eval(model, one_cell(limit=1), tmp_path / "run", progress=False, report=lambda _: None)
    assert capsys.readouterr() == ("", "")


def test_other_settings_are_refused_unless_overwriting(model, tmp_path):
    out = tmp_path / "run"
    run_eval(model, settings(caches=["full"], tasks=["passkey"], lengths=[350], limit=1), out, progress=False)
    with pytest.raises(KvrtError, match="other settings"):
        run_eval(model, settings(caches=["full"], tasks=["passkey"], lengths=[350], limit=2), out, progress=False)
    done = run_eval(model, settings(caches=["full"], tasks=["passkey"], lengths=[350], limit=2), out,
                    overwrite=True, progress=False)
    assert done["written"] == 2
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(KvrtError, match="not a kvrt eval folder"):
        run_eval(model, settings(), tmp_path / "stranger", progress=False)


def test_lengths_beyond_the_context_are_skipped_and_counted(model, tmp_path):
    said = []
    done = run_eval(model, settings(caches=["full"], tasks=["passkey"], lengths=[350, 1010], limit=1), tmp_path / "r",
                    progress=False, report=said.append)
    assert done == {"cells": 1, "written": 1}
    assert said and "skipped 1" in said[0] and "context of 1024" in said[0]


def test_records_hold_scores_answers_and_cache_stats(model, tmp_path):
    run_eval(model, settings(caches=["snapkv:budget=64+ott:bits=2,group=16,residual=8"], tasks=["vt"],
                             lengths=[400], limit=1), tmp_path / "r", progress=False)
    (record,) = records(tmp_path / "r").values()
    assert 0.0 <= record["score"] <= 1.0 and len(record["answers"]) == 5
    assert record["prompt_tokens"] == 400 and record["kv_bytes"] > 0 and record["length"] == 400


def test_the_cli_runs_and_resumes(long_tiny, tmp_path):
    args = ["eval", "--model", str(long_tiny), "--backend", "torch", "--tasks", "passkey",
            "--lengths", "350", "--limit", "2", "--cache", "full", "--cache", "h2o:budget=64", "--out",
            str(tmp_path / "run")]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "4 samples written" in first.stderr
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "0 samples written" in again.stderr
    bad = CliRunner().invoke(cli, args[:-1] + [str(tmp_path / "run"), "--tasks", "nope"])
    assert bad.exit_code != 0 and "unknown task 'nope'" in bad.stderr and "Traceback" not in bad.output


def test_report_files_are_written_and_parse(model, tmp_path):
    from kvrt.eval.report import write_report

    out = tmp_path / "r"
    run_eval(model, settings(caches=["full", "snapkv:budget=200", "snapkv:budget=300"], tasks=["passkey", "vt"],
                             lengths=[350, 400], limit=2), out, progress=False)
    summary = write_report(out)
    saved = json.loads((out / "results.json").read_text())
    assert saved["overall"].keys() == {"full", "snapkv:budget=200", "snapkv:budget=300"}
    assert all(0 <= v <= 100 for v in saved["overall"].values())
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0] == "cache,task,length,n,score" and len(rows) == 1 + 3 * 2 * 2
    report = (out / "report.md").read_text()
    assert "| passkey |" in report and "KV bytes / token" in report and "| vt | 400 |" in report
    assert set(summary["plots"]) == {"niah_full.png", "niah_snapkv_budget_200.png", "niah_snapkv_budget_300.png",
                                     "score_vs_budget.png", "score_vs_kv_bytes.png"}
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in summary["plots"])
    full, snap = saved["cost"]["full"]["kv_bytes_per_token"], saved["cost"]["snapkv:budget=200"]["kv_bytes_per_token"]
    assert snap < full


def test_calidrops_host_tier_is_recorded_and_reported_apart_from_the_device_kv(model, tmp_path):
    from kvrt.eval.report import write_report

    out, host, int2 = tmp_path / "r", "snapkv:budget=64+calidrop", "snapkv:budget=64+calidrop:offload=int2"
    run_eval(model, settings(caches=["full", host, int2], tasks=["vt"], lengths=[400], limit=1), out, progress=False)
    by = {r["cache"]: r for r in records(out).values()}
    assert by["full"]["kv_host_bytes"] == 0 and by[int2]["kv_host_bytes"] == 0  # int2 keeps its tier on the device
    assert 0 < by[host]["kv_host_bytes"] < by[host]["kv_bytes"]
    cost = write_report(out)["cost"]
    tokens = by[host]["prompt_tokens"] + by[host]["generation_tokens"]
    assert cost[host]["kv_bytes_per_token"] == pytest.approx((by[host]["kv_bytes"] - by[host]["kv_host_bytes"]) / tokens)
    assert cost[host]["kv_bytes_per_token"] < cost["full"]["kv_bytes_per_token"] / 2 < by[host]["kv_bytes"] / tokens
    assert "| + host bytes / token |" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_ray_run_equals_the_local_run(model, long_tiny, tmp_path):
    pytest.importorskip("ray")
    import ray

    chosen = settings(model=str(long_tiny), backend="torch", limit=2)
    run_eval(model, chosen, tmp_path / "local", progress=False)
    try:
        done = run_eval(model, chosen, tmp_path / "ray", progress=False, ray_address="local", workers=2)
    finally:
        ray.shutdown()
    assert done["written"] == 2 * 2 * 2 * 2
    assert records(tmp_path / "ray") == records(tmp_path / "local")


@pytest.mark.parametrize("extra,needle", [
    (["--suite", "bogus"], "unknown suite 'bogus'"),
    (["--tasks", "passkey", "--lengths", "12kb"], "--lengths takes comma-separated token counts like 512,1k,2k"),
    (["--benchmark", "ruler,bogus"], "unknown benchmark 'bogus'"),
    (["--benchmark", "niah", "--tasks", "passkey"], "--benchmark and --tasks both choose the tasks"),
    (["--tasks", "hotpotqa", "--data", "DATA"], "hotpotqa.jsonl:2: not valid JSON"),
    (["--tasks", "hotpotqa"], "put it at DIR/hotpotqa.jsonl and pass --data DIR"),  # the hub is offline here
    (["--tasks", "passkey", "--cache", "snapkv"], "snapkv needs exactly one of budget"),
    (["--tasks", "qasper", "--data", "DATA"],
     "qasper.jsonl:2: not valid UTF-8 (byte 0xff at column 12: invalid start byte)"),
    (["--tasks", "musique", "--data", "DATA"], "musique.jsonl is a folder, not a file"),
    (["--tasks", "passkey", "--lengths", "350", "--haystack", "DATA/story.txt"], "story.txt:1: not valid UTF-8"),
])
def test_bad_eval_input_is_one_line(long_tiny, tmp_path, offline_hub, extra, needle):
    data = tmp_path / "data"
    data.mkdir()
    good = '{"input": "q", "context": "c", "answers": ["a"]}\n'
    (data / "hotpotqa.jsonl").write_text(good + '{oops\n')
    (data / "qasper.jsonl").write_bytes(good.encode() + b'{"input": "\xff", "context": "c", "answers": []}\n')
    (data / "musique.jsonl").mkdir()
    (data / "story.txt").write_bytes(b"A story in Latin-1: caf\xe9.\n")
    args = ["eval", "--model", str(long_tiny), "--backend", "torch", "--out", str(tmp_path / "run"), "--limit", "1"]
    result = CliRunner().invoke(cli, args + [a.replace("DATA", str(data)) for a in extra])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], result.stderr


def test_batched_samples_give_the_predictions_of_one_at_a_time(model, tmp_path):
    """--batch 3 decodes a cell's samples together; every prediction and score equals --batch 1's."""
    chosen = settings(caches=["full", "streaming:budget=300+calidrop"], tasks=["passkey"], lengths=[350, 400])
    one, three = tmp_path / "one", tmp_path / "three"
    assert run_eval(model, chosen, one, progress=False)["written"] == 12
    assert run_eval(model, chosen, three, progress=False, batch=3)["written"] == 12
    fields = ("prediction", "score", "prompt_tokens", "generation_tokens")
    assert {k: [r[f] for f in fields] for k, r in records(three).items()} == \
           {k: [r[f] for f in fields] for k, r in records(one).items()}


def test_jobs_are_batched_within_a_cell_only():
    a, b = object(), object()
    jobs = [(0, a, "s0"), (1, a, "s1"), (2, a, "s2"), (3, b, "s3"), (4, b, "s4")]
    assert [[j[0] for j in g] for g in runner.batched_jobs(jobs, 2)] == [[0, 1], [2], [3, 4]]
    assert [[j[0] for j in g] for g in runner.batched_jobs(jobs, 1)] == [[0], [1], [2], [3], [4]]
