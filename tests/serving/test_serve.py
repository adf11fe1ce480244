"""`kvrt serve`: the OpenAI-compatible server, through the official openai client and raw HTTP.

The model tests start one server (a `kvrt serve` subprocess on the default model) for the module,
and a second, small one (one running request, two waiting) for the burst test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[2]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Canada", "Peru", "Norway", "Kenya", "Chile",
             "India", "Greece", "Poland", "Cuba", "Ireland"]
COUNTING = "Count: 1, 2, 3, 4, 5,"  # greedy decoding keeps counting: a request that runs until stopped


# --- servers -----------------------------------------------------------------------------------
class ServerProcess:
    """A `kvrt serve` subprocess on a free port, up once /health answers."""

    def __init__(self, home: Path, log: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "kvrt.cli", "serve", "--model", "default", "--backend", "torch",
               "--port", str(self.port), *args]
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "KVRT_HOME": str(home)},
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"kvrt serve exited with {self.proc.returncode}: {self.stderr()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        pytest.fail("kvrt serve did not answer /health within 300 s")

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 30 s; returns the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=30)


def start(default_model_dir, tmp_path_factory, name: str, *args: str) -> ServerProcess:
    return ServerProcess(default_model_dir.parent.parent, tmp_path_factory.mktemp(name) / "stderr.log", *args)


@pytest.fixture(scope="module")
def server(default_model_dir, tmp_path_factory):
    srv = start(default_model_dir, tmp_path_factory, "serve")
    yield srv
    code = srv.stop()
    assert code == 0, srv.stderr()[-2000:]  # SIGTERM stops it cleanly
    assert "Traceback" not in srv.stderr() and "kvrt: stopped" in srv.stderr()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from kvrt.models.tokenizer import Tokenizer

    return Tokenizer.from_folder(default_model_dir)


def complete(client, prompt: str, **kwargs):
    return client.completions.create(model="default", prompt=prompt, temperature=0, **{"max_tokens": 12, **kwargs})


def solo_texts(client, prompts: list[str], max_tokens: int) -> list[str]:
    return [complete(client, p, max_tokens=max_tokens).choices[0].text for p in prompts]


def wait_until_idle(server: ServerProcess, seconds: float = 15) -> dict:
    """Poll /metrics until nothing runs and no KV is held; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        m = server.metrics()
        if m["kvrt_requests_running"] == 0 and m["kvrt_kv_bytes"] == 0 and m["kvrt_requests_waiting"] == 0:
            return m
        assert time.monotonic() < deadline, f"the server still holds requests: {m}"
        time.sleep(0.1)


# --- the OpenAI API ----------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.slow
def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["default"]


@pytest.mark.model
@pytest.mark.slow
def test_completion_and_chat_answer_with_the_tokenizers_usage(client, tokenizer):
    prompt = "The capital of France is"
    out = complete(client, prompt)
    assert "Paris" in out.choices[0].text and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="default", messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content.strip()
    assert chat.usage.prompt_tokens == len(tokenizer.encode_chat(messages))
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    parts = [{**messages[0]}, {"role": "user", "content": [{"type": "text", "text": "Name a "},
                                                             {"type": "text", "text": "colour."}]}]
    same = client.chat.completions.create(model="default", messages=parts, max_completion_tokens=10, temperature=0)
    assert same.choices[0].message.content == chat.choices[0].message.content  # text parts are the same text


@pytest.mark.model
@pytest.mark.slow
def test_streams_carry_the_same_text_and_end_with_usage(client):
    whole = complete(client, "Once upon a time", max_tokens=16)
    chunks = list(complete(client, "Once upon a time", max_tokens=16, stream=True,
                           stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole.choices[0].text and len(texts) > 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    reply = client.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no usage chunk unless asked


@pytest.mark.model
@pytest.mark.slow
def test_stop_strings_cut_the_text_and_max_tokens_says_length(client):
    full = complete(client, "The capital of France is", max_tokens=16).choices[0].text
    words = full.split()
    assert len(words) >= 3, full
    stops = [words[2], "zzzz"]
    cut = complete(client, "The capital of France is", max_tokens=16, stop=stops)
    assert cut.choices[0].text == full[: full.index(words[2])] and cut.choices[0].finish_reason == "stop"
    one = complete(client, "The capital of France is", max_tokens=16, stop=words[1])
    assert one.choices[0].text == full[: full.index(words[1])]
    short = complete(client, "The capital of France is", max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


@pytest.mark.model
@pytest.mark.slow
def test_a_request_picks_its_own_cache_spec(client):
    prompt = "Numbers: " + ", ".join(str(i) for i in range(1, 60)) + ", "
    out = complete(client, prompt, max_tokens=8, extra_body={"kvrt": {"cache": "snapkv:budget=64"}})
    assert out.usage.prompt_tokens > 64 and out.usage.completion_tokens == 8 and out.choices[0].text
    quantized = complete(client, prompt, max_tokens=8, extra_body={"kvrt": {"cache": "snapkv:budget=64+ott:bits=2"}})
    assert quantized.usage.completion_tokens == 8
    with pytest.raises(openai.BadRequestError) as bad:
        complete(client, prompt, extra_body={"kvrt": {"cache": "snapkv:budget=lots"}})
    assert bad.value.body["param"] == "kvrt.cache" and "budget" in bad.value.body["message"]


@pytest.mark.model
@pytest.mark.slow
def test_a_chat_turn_reuses_the_conversation_so_far_unless_told_not_to(server, client):
    """The prompt cache: usage says how many prompt tokens were cached, /metrics counts them."""
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Name a color."}]
    first = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Another one."}]
    before = server.metrics()
    again = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
    fresh = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"kvrt": {"prompt_cache": False}})
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens < cached < again.usage.prompt_tokens
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == again.choices[0].message.content  # full: the cache changes nothing
    after = server.metrics()
    assert after["kvrt_prompt_cache_tokens_reused_total"] - before["kvrt_prompt_cache_tokens_reused_total"] == cached
    assert after["kvrt_prompt_cache_hits_total"] > before["kvrt_prompt_cache_hits_total"]
    assert 0 < after["kvrt_prompt_cache_bytes"] <= after["kvrt_prompt_cache_budget_bytes"] == 2**30


@pytest.fixture(scope="module")
def in_process(default_model_dir):
    """The same model loaded in the test process, to compute logprobs independently of the server."""
    import kvrt

    return kvrt.load(str(default_model_dir), backend="torch")


def log_softmax_rows(model, ids: list[int]):
    from kvrt.generation.logprobs import log_softmax

    logits = model.runtime.forward(ids, model.runtime.new_cache("full"), all_logits=True)
    return [log_softmax(row) for row in model.runtime.ops.to_numpy(logits)]


@pytest.mark.model
@pytest.mark.slow
def test_echo_scores_the_prompt_with_the_models_own_log_softmax(client, in_process):
    """lm-eval-harness's loglikelihood request: echo, logprobs and max_tokens 0."""
    prompt = "The capital of France is Paris, and the capital of Italy is Rome."
    out = client.completions.create(model="default", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    ids = in_process.encode_prompt(prompt, chat_template=False)
    expected = log_softmax_rows(in_process, ids)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == prompt and out.usage.completion_tokens == 0
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == prompt and lp.text_offset[1] == len(lp.tokens[0])
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1][ids[i]], abs=1e-3)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        assert len(top) == 3 and top[0] == pytest.approx(expected[i - 1].max(), abs=1e-3)


@pytest.mark.model
@pytest.mark.slow
def test_generated_tokens_carry_logprobs_in_completions_and_chat(client, in_process):
    prompt = "One, two, three, four,"
    out = client.completions.create(model="default", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert "".join(lp.tokens) == out.choices[0].text and len(lp.tokens) == out.usage.completion_tokens == 5
    from kvrt.cache.spec import CacheSpec
    from kvrt.generation.request import Request
    from kvrt.generation.sampling import SamplingParams
    from kvrt.generation.stream import stream_alone

    ids = in_process.encode_prompt(prompt, chat_template=False)
    alone = Request(in_process, ids, CacheSpec.parse("full"), SamplingParams(temp=0), 5)
    list(stream_alone(in_process, alone))
    generated = alone.tokens
    assert lp.tokens == [in_process.tokenizer.decode([t]) for t in generated]
    expected = log_softmax_rows(in_process, ids + generated)
    for j, token in enumerate(generated):
        assert lp.token_logprobs[j] == pytest.approx(expected[len(ids) - 1 + j][token], abs=1e-3)
        assert max(lp.top_logprobs[j].values()) == pytest.approx(lp.token_logprobs[j], abs=1e-6)  # greedy
    chat = client.chat.completions.create(model="default", max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2, messages=[{"role": "user", "content": "Say hi."}])
    content = chat.choices[0].logprobs.content
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    assert all(bytes(c.bytes) == c.token.encode() for c in content)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("fields", [{"logprobs": 21}, {"logprobs": 1, "stream": True}, {"echo": True, "stream": True},
                                    {"max_tokens": -1}])
def test_bad_logprobs_requests_get_400(server, fields):
    reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", **fields}, timeout=30)
    assert reply.status_code == 400 and reply.json()["error"]["message"]


@pytest.mark.model
@pytest.mark.slow
def test_the_tokenizer_routes_agree_with_the_tokenizer(server, tokenizer):
    """vLLM's /tokenize, /detokenize and /tokenizer_info, which lm-eval-harness tokenizes through."""
    text = "The capital of France is Paris."
    ids = httpx.post(f"{server.url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()
    assert ids["tokens"] == tokenizer.encode(text, add_special_tokens=False) and ids["count"] == len(ids["tokens"])
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": ids["tokens"]}, timeout=30).json()
    assert back["prompt"] == text
    info = httpx.get(f"{server.url}/tokenizer_info", timeout=30).json()
    eos = httpx.post(f"{server.url}/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False},
                     timeout=30).json()["tokens"]
    assert len(eos) == 1 and eos[0] in tokenizer.eos_token_ids and info["model_max_length"] > 0
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.model
@pytest.mark.slow
def test_top_logprobs_without_logprobs_is_a_400(server):
    reply = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})
    assert reply.status_code == 400 and "logprobs" in reply.json()["error"]["message"]


@pytest.mark.model
@pytest.mark.slow
def test_sixteen_concurrent_streams_each_equal_their_solo_text(server, client):
    prompts = [f"The capital of {country} is" for country in COUNTRIES]
    alone = solo_texts(client, prompts, max_tokens=8)
    start = threading.Barrier(len(prompts))

    def streamed(prompt: str) -> str:
        start.wait(timeout=30)
        return "".join(c.choices[0].text for c in complete(client, prompt, max_tokens=8, stream=True))

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, prompts, timeout=300))
    assert together == alone
    wait_until_idle(server)


@pytest.mark.model
@pytest.mark.slow
def test_a_client_that_goes_away_frees_its_kv(server, client):
    stream = complete(client, COUNTING, max_tokens=4000, stream=True)
    for _, _ in zip(range(3), stream):
        pass
    assert server.metrics()["kvrt_kv_bytes"] > 0  # it is still generating
    stream.close()
    wait_until_idle(server)

    with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up waiting
        httpx.post(f"{server.url}/v1/completions", json={"prompt": COUNTING, "max_tokens": 4000},
                   timeout=httpx.Timeout(10, read=1.5))
    wait_until_idle(server)


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "hi", ', 400, None, None),
    ("/v1/completions", b'["hi"]', 400, None, None),
    ("/v1/completions", b"", 400, None, None),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt", None),
    ("/v1/completions", {"prompt": ["one", "two"]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "temperature": "warm"}, 400, "temperature", None),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", None),
    ("/v1/completions", {"prompt": "hi", "kvrt": {"cache": "nosuch:budget=4"}}, 400, "kvrt.cache", None),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("/v1/completions", {"prompt": [1] * 8190, "max_tokens": 16}, 400, None, None),  # longer than the context
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt", None),
    ("/v1/chat/completions", {"model": "default"}, 400, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed", None),
]


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("path,body,status,param,code", BAD_REQUESTS)
def test_a_bad_request_gets_an_openai_error_and_the_next_one_is_served(server, path, body, status, param, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    reply = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert error["message"] and "\n" not in error["message"] and "Traceback" not in reply.text
    good = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


@pytest.mark.model
@pytest.mark.slow
def test_the_openai_client_raises_its_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}], top_p=0)


@pytest.mark.model
@pytest.mark.slow
def test_health_and_prometheus_metrics(server):
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    reply = httpx.get(f"{server.url}/metrics", timeout=10)
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("kvrt_requests_running", "kvrt_requests_waiting", "kvrt_kv_bytes", "kvrt_kv_budget_bytes",
                 "kvrt_kv_reserved_bytes", "kvrt_prompt_tokens_total", "kvrt_generation_tokens_total",
                 "kvrt_requests_finished_total", "kvrt_requests_rejected_total", "kvrt_prompt_tokens_per_second",
                 "kvrt_generation_tokens_per_second"):
        assert f"# HELP {name} " in reply.text and f"# TYPE {name} " in reply.text
    assert server.metrics()["kvrt_prompt_tokens_total"] > 0


@pytest.mark.model
@pytest.mark.slow
def test_a_burst_beyond_the_queue_gets_429s_and_loses_no_request(default_model_dir, tmp_path_factory):
    small = start(default_model_dir, tmp_path_factory, "serve-small", "--max-batch", "1", "--max-queue", "2")
    try:
        client = small.client()
        blocker = client.completions.create(model="default", prompt=COUNTING, max_tokens=4000, stream=True)
        next(iter(blocker))  # it holds the one running slot
        prompts = [f"The capital of {country} is" for country in COUNTRIES[:7]]
        start_together = threading.Barrier(len(prompts))

        def send(prompt: str):
            start_together.wait(timeout=30)
            return httpx.post(f"{small.url}/v1/completions", timeout=120,
                              json={"prompt": prompt, "max_tokens": 8, "temperature": 0})

        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(send, p) for p in prompts]
            deadline = time.monotonic() + 60
            while (m := small.metrics())["kvrt_requests_waiting"] + m["kvrt_requests_rejected_total"] < len(prompts):
                assert time.monotonic() < deadline, m
                time.sleep(0.05)
            blocker.close()  # the two queued requests run now
            replies = [f.result(timeout=120) for f in futures]
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 2 and statuses.count(429) == 5, statuses  # two wait, the rest are refused
        alone = solo_texts(client, prompts, max_tokens=8)
        for reply, text in zip(replies, alone):
            if reply.status_code == 200:
                assert reply.json()["choices"][0]["text"] == text  # its own answer, not another's
            else:
                assert reply.json()["error"]["type"] == "rate_limit_error"
        m = wait_until_idle(small)
        assert m["kvrt_requests_rejected_total"] == 5
        assert m["kvrt_requests_finished_total"] >= 2 + len(prompts)  # the burst's and the solo ones
    finally:
        assert small.stop() == 0


# --- in-process, on a tiny random model ------------------------------------------------------------
def test_an_unexpected_exception_is_a_500_json_error_and_the_server_goes_on(tiny_model_dir):
    from starlette.testclient import TestClient

    import kvrt
    from kvrt.serving.engine import Engine
    from kvrt.serving.http import build_app

    model = kvrt.load(str(tiny_model_dir("llama")), backend="torch")
    engine = Engine(model, max_batch=2).start()
    try:
        app = build_app(model, engine, name="tiny")
        submit = engine.submit
        engine.submit = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
        with TestClient(app, raise_server_exceptions=False) as http:
            broken = http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4})
            assert broken.status_code == 500 and "boom" in broken.json()["error"]["message"]
            engine.submit = submit
            fine = http.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
            assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] <= 4
            assert http.get("/health").json() == {"status": "ok"}
    finally:
        engine.stop()


@pytest.mark.parametrize("text,size", [("1048576", 2**20), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
                                       ("1.5GB", 1_500_000_000), ("300M", 300_000_000), ("64 kib", 65536)])
def test_kv_memory_sizes(text, size):
    from kvrt.cli.commands import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["12XB", "0", "-1GiB", "GiB", "1.5.2G"])
def test_a_bad_kv_memory_is_one_line_and_exit_2(text):
    from click.testing import CliRunner

    from kvrt.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--kv-memory", text])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith("error: --kv-memory") and text in line
