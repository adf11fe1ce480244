"""`kvrt serve --replicas N`: N model replicas behind Ray Serve, each the same app as one server.

Each replica is a Ray Serve deployment replica that loads the model, starts its own engine
(continuous batching, admission by its own `--kv-memory`) and builds kvrt's OpenAI-compatible
app (kvrt/serving/http.py) at init; Ray Serve's HTTP proxy listens on the host and port and spreads
requests over the replicas. /health and /metrics answer from whichever replica serves them
(each reply names it in the `x-kvrt-replica` header). Ray is already kvrt's distributed
engine for `kvrt eval --ray`.
"""

from __future__ import annotations

import signal
import threading

from kvrt.errors import KvrtError


class Replica:
    """One model replica: the model, its engine and its app (built after the constructor, on the replica)."""

    def __init__(self, model: str, backend: str, dtype, engine: dict, max_tokens: int, keys,
                 max_request_bytes: int):
        import kvrt
        from kvrt.serving.engine import Engine

        self.name, self.max_tokens, self.keys, self.max_request_bytes = model, max_tokens, keys, max_request_bytes
        self.model = kvrt.load(model, backend=backend, dtype=dtype)
        self.engine = Engine(self.model, **engine).start()

    def __serve_build_asgi_app__(self):
        from kvrt.serving.http import build_app

        return build_app(self.model, self.engine, name=self.name, max_tokens=self.max_tokens, keys=self.keys,
                         max_request_bytes=self.max_request_bytes)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


def serve_replicas(model: str, backend: str, dtype, engine: dict, host: str, port: int, replicas: int,
                   max_tokens: int, log, keys, max_request_bytes: int) -> None:
    """Start a local Ray instance, deploy `replicas` replicas on host:port and block until Ctrl-C or SIGTERM;
    `keys` (kvrt.serving.keys.ApiKeys) guard every replica's routes."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise KvrtError(f"--replicas needs Ray Serve ({exc}): pip install 'kvrt[ray]'") from None
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        # each replica's engine is its own admission control: let Serve hand it everything it may queue
        deployment = serve.deployment(name="kvrt", num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                                      max_ongoing_requests=engine["max_batch"] + engine["max_queue"],
                                      graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=1)
        app = deployment(serve.ingress()(Replica)).bind(model, backend, dtype, engine, max_tokens, keys, max_request_bytes)
        serve.run(app, name="kvrt", route_prefix="/", blocking=False)
        log(f"serving '{model}' on http://{host}:{port}/v1 with {replicas} replicas behind Ray Serve")
        stop = threading.Event()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
