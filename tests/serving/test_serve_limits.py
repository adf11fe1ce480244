"""`kvrt serve` limits that protect the other clients: a body over --max-request-bytes gets 413 before
it is read whole, deep JSON gets 400, a text too long for the context is refused before it is
tokenized, and /health fails while the engine is stuck in one step."""

from __future__ import annotations

import threading
import time
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
            assert http.get("/health").status_code == 200
    finally:
        release.set()
        engine.stop()
