"""`kvrt serve --replicas 2`: two model replicas behind Ray Serve on a local Ray instance."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")
from test_serve import ServerProcess, start  # noqa: E402  (the same server harness)

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def replicas(default_model_dir, tmp_path_factory):
    srv = start(default_model_dir, tmp_path_factory, "replicas", "--replicas", "2", "--api-key", "x")  # the harness's key
    yield srv
    try:
        code = srv.stop()
    finally:  # a server killed mid-shutdown leaves its local Ray processes behind
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True,
                       timeout=120)
    assert code == 0, srv.stderr()[-2000:]


def test_two_replicas_share_the_requests_and_each_answers_as_one_server(replicas: ServerProcess, default_model_dir):
    import kvrt

    client = replicas.client()
    prompts = [f"The capital of {c} is" for c in ("France", "Italy", "Spain", "Japan", "Egypt", "Peru", "Chile",
                                                   "Kenya")]

    def ask(prompt):
        raw = client.completions.with_raw_response.create(model="default", prompt=prompt, max_tokens=8,
                                                           temperature=0)
        return raw.headers["x-kvrt-replica"], raw.parse().choices[0].text

    model = kvrt.load(str(default_model_dir), backend="torch")
    alone = [model.generate(p, max_tokens=8, chat_template=False).text for p in prompts]
    seen = set()
    for _ in range(6):  # Ray Serve routes each request to the less busy of two replicas it samples
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(ask, prompts))
        assert [text for _, text in answers] == alone
        seen |= {replica for replica, _ in answers}
        if len(seen) == 2:
            break
    assert len(seen) == 2  # both replicas served
    assert replicas.client().models.list().data[0].id == "default"


def test_every_replica_needs_the_key_and_health_stays_open(replicas: ServerProcess):
    import httpx
    import openai

    wrong = openai.OpenAI(base_url=f"{replicas.url}/v1", api_key="not-the-key", max_retries=0, timeout=60)
    for _ in range(4):  # requests spread over both replicas
        with pytest.raises(openai.AuthenticationError) as bad:
            wrong.completions.create(model="default", prompt="Hi", max_tokens=2)
        assert bad.value.status_code == 401 and bad.value.response.headers["x-kvrt-replica"]
    assert httpx.get(f"{replicas.url}/health", timeout=30).status_code == 200
