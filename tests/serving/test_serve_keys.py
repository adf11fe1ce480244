"""`kvrt serve --api-key`: every /v1 route, the tokenizer's routes and /metrics need a bearer key;
/health stays open."""

from __future__ import annotations

import pytest

from kvrt.serving.keys import ApiKeys, exposure_warning

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from test_serve import start  # noqa: E402  (the same server harness)


def test_a_key_is_a_bearer_token_that_matches_one_of_the_keys():
    keys = ApiKeys(["alpha", "beta-key"])
    assert keys.allows("Bearer alpha") and keys.allows("bearer beta-key") and keys.allows("  Bearer   alpha ")
    assert not keys.allows("Bearer alph") and not keys.allows("Bearer alphaa") and not keys.allows("Bearer ")
    assert not keys.allows("Basic alpha") and not keys.allows("alpha") and not keys.allows(None)
    assert not ApiKeys([]).allows("Bearer anything")


def test_keys_guard_the_api_and_metrics_but_never_health():
    keys = ApiKeys(["k"])
    assert keys.guards("/v1/completions") and keys.guards("/v1/models") and keys.guards("/metrics")
    assert keys.guards("/tokenize") and keys.guards("/detokenize") and keys.guards("/tokenizer_info")
    assert not keys.guards("/health") and not keys.guards("/v1beta") and not keys.guards("/tokenizers")
    assert not ApiKeys(["k"], metrics_public=True).guards("/metrics")
    assert not ApiKeys([]).guards("/v1/completions")  # no key: open, as before


@pytest.mark.parametrize("host, warns", [("127.0.0.1", False), ("::1", False), ("[::1]", False),
                                         ("localhost", False), ("0.0.0.0", True), ("::", True),
                                         ("192.168.1.7", True), ("myhost.example", True)])
def test_listening_beyond_loopback_without_a_key_warns_once(host, warns):
    line = exposure_warning(host, ApiKeys([]))
    assert (line is not None) == warns
    if warns:
        assert "\n" not in line and host in line
    assert exposure_warning(host, ApiKeys(["k"])) is None


@pytest.fixture(scope="module")
def keyed(default_model_dir, tmp_path_factory):
    srv = start(default_model_dir, tmp_path_factory, "keys", "--api-key", "first-key", "--api-key", "second-key",
                "--max-tokens", "4")
    yield srv
    assert srv.stop() == 0, srv.stderr()[-2000:]
    assert "first-key" not in srv.stderr()  # a key is never logged


def client(server, key: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.model
@pytest.mark.slow
def test_the_openai_client_needs_one_of_the_keys(keyed):
    for key in ("first-key", "second-key"):
        out = client(keyed, key).completions.create(model="default", prompt="The capital of France is",
                                                    max_tokens=3, temperature=0)
        assert out.choices[0].text
    no_header = {"Authorization": openai.omit}  # the client then sends no key at all
    for key, headers in (("wrong-key", None), ("first-key-but-longer", None), ("first-key", no_header)):
        with pytest.raises(openai.AuthenticationError) as bad:
            client(keyed, key).chat.completions.create(model="default", max_tokens=3, extra_headers=headers,
                                                       messages=[{"role": "user", "content": "Hi"}])
        assert bad.value.status_code == 401 and bad.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(keyed, "wrong-key").models.list()


@pytest.mark.model
@pytest.mark.slow
def test_without_a_key_the_api_and_metrics_answer_401_and_health_stays_open(keyed):
    for path in ("/v1/models", "/metrics", "/tokenizer_info"):
        reply = httpx.get(f"{keyed.url}{path}", timeout=30)
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["type"] == "invalid_request_error"
    reply = httpx.post(f"{keyed.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert reply.status_code == 401
    assert httpx.get(f"{keyed.url}/health", timeout=30).status_code == 200
    metrics = httpx.get(f"{keyed.url}/metrics", headers={"Authorization": "Bearer second-key"}, timeout=30)
    assert metrics.status_code == 200 and "kvrt_requests_running" in metrics.text
