"""`kvrt serve` limits that protect the other clients: a body over --max-request-bytes gets 413 before
it is read whole, deep JSON gets 400, a text too long for the context is refused before it is
tokenized, and /health fails while the engine is stuck in one step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from test_serve import start  # noqa: E402  (the same server harness)

LIMIT = 2**20  # the server below takes bodies of at most 1 MiB


@pytest.fixture(scope="module")
def limited(default_model_dir, tmp_path_factory):
    srv = start(default_model_dir, tmp_path_factory, "limits", "--max-request-bytes", "1MiB", "--max-tokens", "4")
    yield srv
    assert srv.stop() == 0, srv.stderr()[-2000:]


def short_latency(url: str) -> float:
    start = time.perf_counter()
    reply = httpx.post(f"{url}/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 3,
                                                      "temperature": 0}, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"]
    return time.perf_counter() - start


@pytest.mark.model
@pytest.mark.slow
def test_a_body_over_the_limit_gets_413_and_a_short_request_beside_it_is_not_held_up(limited):
    alone = min(short_latency(limited.url) for _ in range(3))
    huge = b'{"prompt": "' + b"x" * (50 * 2**20) + b'"}'  # 50 MB, as the load run sent

    def send_huge(declared: bool):
        content = huge if declared else iter(huge[i : i + 2**16] for i in range(0, len(huge), 2**16))
        return httpx.post(f"{limited.url}/v1/completions", content=content, timeout=120,
                          headers={"Content-Type": "application/json"})

    with ThreadPoolExecutor(3) as pool:
        refused = [pool.submit(send_huge, declared) for declared in (True, False)]
        time.sleep(0.05)
        beside = short_latency(limited.url)
        replies = [f.result() for f in refused]
    for reply in replies:
        assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    assert beside < alone + 1.0


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("body", [b"[" * 5000, b'{"prompt": "hi", "stop": ' + b"[" * 40 + b"]" * 40 + b"}",
                                  b'{"prompt": "hi", "x": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}"])
def test_deep_json_is_a_400_not_a_500(limited, body):
    reply = httpx.post(f"{limited.url}/v1/completions", content=body, timeout=60,
                       headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and "nests deeper" in reply.json()["error"]["message"]
    assert short_latency(limited.url) < 60


@pytest.mark.model
@pytest.mark.slow
def test_a_text_that_cannot_fit_the_context_is_refused_before_tokenizing(limited, default_model_dir):
    from kvrt.models.config import context_length, read_config
    from kvrt.models.tokenizer import Tokenizer

    longest = Tokenizer.from_folder(default_model_dir).longest_token_chars
    chars = context_length(read_config(default_model_dir)) * longest + 1
    assert chars < LIMIT
    for path, body in (("/v1/completions", {"prompt": "a" * chars}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * chars}]})):
        start = time.perf_counter()
        reply = httpx.post(f"{limited.url}{path}", json=body, timeout=60)
        assert reply.status_code == 400 and "characters" in reply.json()["error"]["message"]
        assert time.perf_counter() - start < 5


def test_health_fails_while_the_engine_is_stuck_in_a_step(tiny_model_dir, monkeypatch):
    from starlette.testclient import TestClient

    import kvrt
    from kvrt.serving import http as http_module
    from kvrt.serving.engine import Engine

    model = kvrt.load(str(tiny_model_dir("llama")), backend="torch")
    release, entered = threading.Event(), threading.Event()
    forward = model.runtime.forward

    def stuck(*args, **kwargs):  # the engine's first forward hangs until released
        entered.set()
        release.wait(30)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model.runtime, "forward", stuck)
    monkeypatch.setattr(http_module, "STALLED_SECONDS", 0.5)
    engine = Engine(model, max_batch=2).start()
    try:
        app = http_module.build_app(model, engine, name="tiny")
        with TestClient(app) as http:
            assert http.get("/health").status_code == 200  # idle is healthy
            handle = engine.submit(model.tokenizer.encode("hello"), max_tokens=2)
            assert entered.wait(30)
            time.sleep(0.8)
            sick = http.get("/health")
            assert sick.status_code == 503 and "not finished a step" in sick.json()["error"]["message"]
            release.set()
            handle.text()
            deadline = time.monotonic() + 10  # healthy again once that turn ends (just after the request)
            while http.get("/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        release.set()
        engine.stop()


def longest_allowed_text(default_model_dir) -> str:
    """The longest text the server tokenizes (context x the longest token's characters), of digits:
    a tokenizer gives it the most tokens and takes longest over it."""
    from kvrt.models.config import context_length, read_config
    from kvrt.models.tokenizer import Tokenizer

    chars = context_length(read_config(default_model_dir)) * Tokenizer.from_folder(default_model_dir).longest_token_chars
    assert chars < LIMIT
    return ("1234567890" * (chars // 10 + 1))[:chars]


@pytest.mark.model
@pytest.mark.slow
def test_tokenizing_the_longest_allowed_text_never_stalls_a_short_request(limited, default_model_dir):
    """Such a text is tokenized (about a second each here) and then refused as longer than the context;
    tokenizing lets go of the interpreter, so a short request beside two of them is not held up."""
    alone = min(short_latency(limited.url) for _ in range(3))
    text = longest_allowed_text(default_model_dir)
    with ThreadPoolExecutor(2) as pool:
        refused = [pool.submit(httpx.post, f"{limited.url}/v1/completions", json={"prompt": text}, timeout=120)
                   for _ in range(2)]
        time.sleep(0.2)
        beside = short_latency(limited.url)
        replies = [f.result() for f in refused]
    for reply in replies:
        assert reply.status_code == 400 and "context" in reply.json()["error"]["message"]
    assert beside < alone + 1.0


@pytest.mark.model
@pytest.mark.slow
def test_a_burst_of_bad_inputs_leaves_every_good_request_answered_correctly_and_on_time(limited, default_model_dir):
    """Sixty-two bad requests of thirteen kinds (tests/serving/bad_requests.py), eight at a time from
    another process, beside four good greedy requests: every bad one gets its 4xx, every good one
    its solo answer, no later than a second after the same four take without the burst, and the
    server's peak memory grows by less than the bound README states. The burst's process runs at
    the lowest priority, so that on this 2-core machine its own work (making 50 MB bodies) does not
    take the server's CPU, as a remote client's would not."""
    prompts = [f"Here is a list of {n}: one, two, three," for n in ("numbers", "words", "things", "names")]

    def good(prompt: str) -> tuple[str, float]:
        start = time.perf_counter()
        reply = httpx.post(f"{limited.url}/v1/completions", timeout=120,
                           json={"prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert reply.status_code == 200
        return reply.json()["choices"][0]["text"], time.perf_counter() - start

    def together() -> list[tuple[str, float]]:
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(good, prompts))

    solo = [good(p)[0] for p in prompts]
    calm = together()
    longest = len(longest_allowed_text(default_model_dir))
    with open(f"/proc/{limited.proc.pid}/clear_refs", "w") as refs:
        refs.write("5")  # resets the server's peak RSS (VmHWM)
    before = peak_rss(limited.proc.pid)
    burst = subprocess.Popen([sys.executable, str(Path(__file__).with_name("bad_requests.py")), limited.url,
                              str(longest), "5"], stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(19))
    time.sleep(0.3)  # the burst is under way
    stormy = together()
    out, _ = burst.communicate(timeout=300)
    grown = peak_rss(limited.proc.pid) - before
    print(f"burst: peak RSS grew by {grown / 2**20:.0f} MiB; good requests' slowest {max(s for _, s in calm):.2f} s "
          f"calm, {max(s for _, s in stormy):.2f} s in the burst")
    statuses = json.loads(out)
    assert len(statuses) == 62 and [got for got, _ in statuses] == [want for _, want in statuses]
    assert [t for t, _ in stormy] == solo and [t for t, _ in calm] == solo
    assert max(s for _, s in stormy) < max(s for _, s in calm) + 1.0
    # README's bound: 3 x --max-request-bytes per request being read, plus 500 bytes a character for
    # the one long text tokenized at a time (the burst sends two of the longest at once)
    assert grown < 8 * 3 * LIMIT + 500 * longest, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def peak_rss(pid: int) -> int:
    """A process's peak resident memory (VmHWM) in bytes."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")
