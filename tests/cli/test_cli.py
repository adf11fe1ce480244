"""The CLI through click's runner: each command, and every bad input as one line + non-zero exit."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kvrt.cli import cli


def run(*args, input=None, env=None):
    result = CliRunner().invoke(cli, list(args), input=input, env=env)
    return result


def assert_one_line_error(result, needle, code=None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if not line.startswith("kvrt: ")]  # progress lines may precede it
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert needle in errors[0], errors[0]
    assert "Traceback" not in result.output


def test_generate_streams_text_and_json_has_the_stats(tiny_model_dir):
    folder = str(tiny_model_dir("llama"))
    plain = run("generate", "--model", folder, "--prompt", "hello there", "--max-tokens", "8", "--verbose")
    assert plain.exit_code == 0, plain.output
    assert "tok/s" in plain.stderr and "kv cache" in plain.stderr
    result = run("generate", "--model", folder, "--prompt", "hello there", "--max-tokens", "8", "--json",
                 "--ignore-chat-template", "--seed", "3", "--temp", "0.8", "--top-p", "0.9")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("text", "prompt_tokens", "prompt_tps", "generation_tokens", "generation_tps",
                "peak_memory_bytes", "kv_bytes"):
        assert key in data
    assert data["prompt_tokens"] > 0 and data["kv_bytes"] > 0 and data["peak_memory_bytes"] > 0


@pytest.mark.parametrize("backend", ["torch", "mlx"])
@pytest.mark.parametrize("flags,spec", [
    (["--kv-bits", "2", "--kv-group-size", "16", "--kv-residual", "8"], "ott:bits=2,group=16,residual=8"),
    (["--cache", "snapkv:budget=40+calidrop:offload=int2+ott:bits=2,group=16,residual=8"],
     "snapkv:budget=40+calidrop:offload=int2+ott:bits=2,group=16,residual=8"),
])
def test_generate_with_a_quantized_cache(tiny_model_dir, backend, flags, spec):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "one two three four " * 10,
                 "--ignore-chat-template", "--max-tokens", "20", "--json", "--backend", backend, *flags)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cache"] == spec and data["generation_tokens"] == 20 and data["backend"] == backend


def test_verbose_shows_calidrops_host_tier_apart(tiny_model_dir):
    args = ["generate", "--model", str(tiny_model_dir("llama")), "--prompt", "one two three four " * 10,
            "--ignore-chat-template", "--max-tokens", "4", "--cache", "snapkv:budget=40+calidrop"]
    verbose = run(*args, "--verbose")
    assert verbose.exit_code == 0, verbose.output
    assert "MiB in host memory)" in verbose.stderr
    data = json.loads(run(*args, "--json").stdout)
    assert 0 < data["kv_host_bytes"] < data["kv_bytes"]


def test_generate_reads_the_prompt_from_stdin(tiny_model_dir):
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "-", "--max-tokens", "3",
                 "--json", input="from stdin")
    assert result.exit_code == 0 and json.loads(result.stdout)["prompt_tokens"] > 0


def test_chat_over_a_pipe_keeps_the_cache_and_resets(tiny_model_dir):
    script = "hi\nhow are you\n/reset\nhello again\n/quit\nnever read\n"
    result = run("chat", "--model", str(tiny_model_dir("qwen2")), "--max-tokens", "5", "--verbose", input=script)
    assert result.exit_code == 0, result.output
    assert "conversation reset" in result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt:")]
    assert len(stats) == 3
    assert int(stats[1].split()[1]) < int(stats[0].split()[1]) + 20  # turn 2 feeds only its own tokens


def test_ctrl_c_during_generation_keeps_the_text_and_exits_cleanly(tiny_model_dir, monkeypatch):
    from kvrt.backends.torch.runtime import TorchRuntime

    original = TorchRuntime.forward
    calls = {"n": 0}

    def interrupt_on_fifth(self, ids, cache, all_logits=False, progress=None):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, ids, cache, all_logits, progress)

    monkeypatch.setattr(TorchRuntime, "forward", interrupt_on_fifth)
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "x", "--max-tokens", "50",
                 "--json", "--ignore-chat-template")
    assert result.exit_code == 130
    data = json.loads(result.stdout)
    assert data["finish_reason"] == "interrupted" and data["generation_tokens"] == 4
    assert "Traceback" not in result.output


def test_pull_and_models_list_the_cache(tiny_model_dir, tmp_path):
    from gguf_fixtures import hf_folder_to_gguf

    gguf = hf_folder_to_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")
    env = {"KVRT_HOME": str(tmp_path / "home")}
    assert "no models cached" in run("models", env=env).stdout
    pulled = run("pull", str(gguf), env=env)
    assert pulled.exit_code == 0, pulled.output
    listing = run("models", env=env)
    assert "tiny" in listing.stdout and "MiB" in listing.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "--model", "/no/such/folder", "--prompt", "x"], "no such file or folder"),
        (["generate", "--model", "EMPTY", "--prompt", "x"], "config.json"),
        (["generate", "--model", "TINY", "--prompt", "x", "--temp", "-1"], "--temp"),
        (["generate", "--model", "TINY", "--prompt", "x", "--top-p", "2"], "--top-p"),
        (["generate", "--model", "TINY", "--prompt", "x", "--max-tokens", "0"], "--max-tokens"),
        (["generate", "--model", "TINY", "--prompt", "x", "--backend", "tpu"], "--backend"),
        (["generate", "--model", "TINY", "--prompt", "x", "--cache", "bogus"], "unknown cache method 'bogus'"),
        (["generate", "--model", "TINY", "--prompt", "x", "--cache", "full:budget=3"], "bad option"),
        (["generate", "--model", "TINY", "--prompt", "word " * 400], "context is 256"),
        (["generate", "--model", "TINY"], "--prompt"),
        (["generate", "--model", "TINY", "--prompt", "x", "--kv-bits", "3"], "--kv-bits"),
        (["generate", "--model", "TINY", "--prompt", "x", "--kv-bits", "2", "--kv-group-size", "24"], "multiple of 16"),
        (["generate", "--model", "TINY", "--prompt", "x", "--kv-residual", "8"], "need --kv-bits"),
        (["generate", "--model", "TINY", "--prompt", "x", "--kv-bits", "2", "--cache", "full"], "not both"),
        (["generate", "--model", "TINY", "--prompt", "x", "--cache", "full+ott"], "follows an eviction method"),
        (["pull", "/no/such.gguf"], "no such file or folder"),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args, needle, tiny_model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    subst = {"TINY": str(tiny_model_dir("llama")), "EMPTY": str(tmp_path / "empty")}
    assert_one_line_error(run(*[subst.get(a, a) for a in args]), needle)


def test_truncate_fits_a_long_prompt_into_the_context(tiny_model_dir):
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "word " * 400, "--truncate",
                 "--max-tokens", "6", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] == 256 - 6


def test_corrupt_weights_unsupported_arch_and_corrupt_gguf(tiny_model_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("llama"), broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    assert_one_line_error(run("generate", "--model", str(broken), "--prompt", "x"), "corrupt")

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir("llama"), other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert_one_line_error(run("generate", "--model", str(other), "--prompt", "x"), "unsupported architecture 'gpt2'")

    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    env = {"KVRT_HOME": str(tmp_path / "home")}
    assert_one_line_error(run("generate", "--model", str(bad_gguf), "--prompt", "x", env=env), "gguf")
    assert not any((tmp_path / "home" / "models").glob("bad*")), "no half-converted folder may remain"


def test_hub_id_while_offline_is_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "KVRT_HOME": str(tmp_path / "home")}
    assert_one_line_error(run("generate", "--model", "someorg/somemodel", "--prompt", "x", env=env), "hub")


@pytest.mark.model
def test_real_generate_subprocess_on_the_default_model(default_model_dir):
    env = {**os.environ, "KVRT_HOME": str(default_model_dir.parent.parent)}
    cmd = [sys.executable, "-m", "kvrt.cli", "generate", "--prompt", "The capital of France is", "--max-tokens",
           "20", "--ignore-chat-template", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert "Paris" in data["text"] and data["generation_tokens"] == 20
