"""Inputs that once ended in "internal error": each is now one clear line with the right exit code,
through the CLI and through the library, on both backends."""

import json
import math
import os
import shutil

import pytest
from click.testing import CliRunner

import kvrt
from kvrt.cli import cli
from kvrt.errors import InvalidValue, KvrtError
from kvrt.cache.spec import CacheSpec


def run(*args, input=None, env=None):
    return CliRunner().invoke(cli, list(args), input=input, env=env)


def assert_one_line_error(result, needle, code):
    assert result.exit_code == code, (result.exit_code, result.output)
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("kvrt: ")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "internal error" not in errors[0], result.stderr
    assert needle in errors[0], errors[0]


@pytest.fixture
def no_bos_model(tiny_model_dir, tmp_path):
    """The tiny llama without any BOS token (as some base models ship)."""
    folder = tmp_path / "no-bos"
    shutil.copytree(tiny_model_dir("llama"), folder)
    for name, key in (("tokenizer_config.json", "bos_token"), ("config.json", "bos_token_id")):
        data = json.loads((folder / name).read_text())
        data.pop(key, None)
        (folder / name).write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_an_empty_prompt_starts_from_bos_on_both_backends(tiny_model_dir, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(tiny_model_dir("llama")), backend=backend)
    bos = model.tokenizer.bos_token_id
    assert bos is not None
    empty = model.generate("", chat_template=False, max_tokens=5)
    from_bos = model.generate_ids([bos], max_tokens=5)
    assert empty.text == from_bos.text and empty.stats.prompt_tokens == 1
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "", "--ignore-chat-template",
                 "--max-tokens", "4", "--backend", backend, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt_tokens"] == 1


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_an_empty_prompt_without_bos_is_one_line_exit_2(no_bos_model, backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    model = kvrt.load(str(no_bos_model), backend=backend)
    with pytest.raises(InvalidValue, match="empty"):
        model.generate("", chat_template=False, max_tokens=5)
    with pytest.raises(InvalidValue, match="no prompt token"):
        model.generate_ids([], max_tokens=5)
    result = run("generate", "--model", str(no_bos_model), "--prompt", "", "--ignore-chat-template",
                 "--backend", backend)
    assert_one_line_error(result, "the prompt is empty", 2)


def test_undecodable_bytes_on_stdin_are_one_line_exit_2(tiny_model_dir):
    noise = bytes(range(256)) * 8  # 2048 bytes, invalid UTF-8 from 0x80 on
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "-", input=noise)
    assert_one_line_error(result, "not UTF-8 text (byte 0x80 at offset 128)", 2)


def test_undecodable_text_in_the_library_is_one_error(tiny_model_dir):
    """Python reads undecodable argv/stdin bytes as lone surrogates; the tokenizer must not see them."""
    model = kvrt.load(str(tiny_model_dir("llama")), backend="torch")
    with pytest.raises(InvalidValue, match="not valid UTF-8"):
        model.generate("abc \udcff def", max_tokens=3)
    with pytest.raises(InvalidValue, match="must be a str"):
        model.generate(b"bytes", max_tokens=3)


def test_undecodable_chat_line_is_one_line(tiny_model_dir):
    result = run("chat", "--model", str(tiny_model_dir("llama")), "--max-tokens", "3", input=b"hi \xff\xfe there\n")
    assert_one_line_error(result, "not UTF-8 text", 2)


@pytest.mark.parametrize("flag,value", [("--temp", "inf"), ("--temp", "nan"), ("--top-p", "nan"),
                                        ("--min-p", "nan"), ("--repetition-penalty", "inf"), ("--seed", "-1")])
def test_non_finite_or_out_of_domain_sampling_values_exit_2(tiny_model_dir, flag, value):
    result = run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "x", flag, value)
    assert_one_line_error(result, value, 2)


def test_sampling_params_reject_non_finite_values():
    for kwargs in ({"temp": math.inf}, {"temp": math.nan}, {"repetition_penalty": math.inf}, {"top_p": math.nan}):
        with pytest.raises(InvalidValue):
            kvrt.SamplingParams(**kwargs)


@pytest.mark.parametrize("spec,needle", [
    ("snapkv:budget=64+calidrop:theta1=2", "theta1 is a cosine threshold"),
    ("snapkv:budget=64+calidrop:theta1=0.9,theta2=0.5", "theta1 must be <= theta2"),
    ("snapkv:budget=64+calidrop:theta1=nan", "finite"),
    ("ott:bits=2,group=0", "ott: group must be"),
    ("ott:bits=2,residual=-1", "ott: residual must be"),
    ("ott:bits=3", "ott: bits must be 2, 4 or 8"),
    ("h2o:budget=64,recent=5", "h2o: recent"),
    ("snapkv:ratio=inf", "finite"),
])
def test_bad_cache_values_name_the_method_written(spec, needle, tiny_model_dir):
    with pytest.raises(InvalidValue, match=needle.replace("(", r"\(")):
        CacheSpec.parse(spec)
    assert_one_line_error(run("generate", "--model", str(tiny_model_dir("llama")), "--prompt", "x", "--cache", spec),
                          needle, 2)


def test_kvrt_errors_keep_exit_1_and_bad_values_exit_2():
    assert KvrtError("x").exit_code == 1 and InvalidValue("x").exit_code == 2


@pytest.mark.parametrize("home", ["/proc/kvrt-home", "A_FILE", "READ_ONLY"])
def test_an_unwritable_kvrt_home_is_one_line_naming_it(tiny_model_dir, tmp_path, home):
    from gguf_fixtures import hf_folder_to_gguf

    if home == "A_FILE":
        home = tmp_path / "a-file"
        home.write_text("not a folder")
    elif home == "READ_ONLY":
        if os.geteuid() == 0:
            pytest.skip("root may write into a read-only folder")
        home = tmp_path / "read-only"
        home.mkdir(mode=0o500)
    gguf = hf_folder_to_gguf(tiny_model_dir("llama"), tmp_path / "tiny.gguf")
    result = run("generate", "--model", str(gguf), "--prompt", "x", env={"KVRT_HOME": str(home)})
    assert_one_line_error(result, f"kvrt cannot write its model cache {home}/models", 1)
    assert "set KVRT_HOME to a writable folder" in result.stderr


def test_more_bad_input_is_one_line(tiny_model_dir, tmp_path):
    tiny = str(tiny_model_dir("llama"))
    assert_one_line_error(run("generate", "--model", tiny, "--prompt", "x", "--max-tokens", "300", "--truncate"),
                          "context is 256 and 300 to generate leave 0 of it for the prompt", 1)
    assert_one_line_error(run("eval", "--model", tiny, "--out", "/proc/kvrt-run", "--tasks", "passkey",
                              "--lengths", "200", "--limit", "1"), "cannot create the run folder /proc/kvrt-run", 1)
    assert_one_line_error(run("pull", " "), "the model name is empty", 2)
