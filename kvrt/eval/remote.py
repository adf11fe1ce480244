"""`kvrt eval --server URL`: the same samples, scored the same way, against any OpenAI-compatible server.

Samples are built here with the named model's tokenizer (so the server must serve a model with that
tokenizer) and sent as token ids to `/v1/completions`: greedy, streamed, `max_tokens` the task's
answer budget. Each request carries its cache spec in kvrt's extension field
`"kvrt": {"cache": SPEC}`, so one kvrt server evaluates every spec; another server (vLLM,
llama.cpp) ignores the field and the spec is then only the run's label for what that server does.
The stream gives the stats a local run records: prompt tokens/s up to the first token, generation
tokens/s after it; the server's KV bytes are not known here (0).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from kvrt.api import Generation
from kvrt.errors import KvrtError
from kvrt.generation.stats import GenerationStats

TIMEOUT_SECONDS = 600.0  # one request: a long prompt on a slow server takes minutes


class RemoteModel:
    """What kvrt eval's runner needs of a model (`tokenizer`, `context_length`, `generate_ids`), served
    by a server at `url` (its base, with or without /v1)."""

    def __init__(self, url: str, tokenizer, context_length: int, api_key: str | None = None):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.tokenizer, self.context_length, self.api_key = tokenizer, context_length, api_key
        models = self._call("GET", "/v1/models").get("data") or []
        if not models:
            raise KvrtError(f"the server at {self.base} lists no model (GET /v1/models)")
        self.name = models[0]["id"]

    def generate_ids(self, ids: list[int], *, max_tokens: int, cache: str, params=None) -> Generation:
        """A greedy completion of prompt ids (`params` is ignored: kvrt eval decodes greedily)."""
        body = {"model": self.name, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}, "kvrt": {"cache": cache}}
        started, first, last, pieces, usage = time.perf_counter(), None, None, [], {}
        for event in self._stream("/v1/completions", body):
            if "error" in event:
                raise KvrtError(f"the server failed a request: {event['error'].get('message', event['error'])}")
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    last = time.perf_counter()
                    first = first or last
                    pieces.append(choice["text"])
            usage = event.get("usage") or usage
        stats = GenerationStats(prompt_tokens=usage.get("prompt_tokens", len(ids)),
                                generation_tokens=usage.get("completion_tokens", 0))
        if first is not None:
            stats.prompt_tps = stats.prompt_tokens / max(first - started, 1e-9)
            if stats.generation_tokens > 1 and last > first:
                stats.generation_tps = (stats.generation_tokens - 1) / (last - first)
        return Generation("".join(pieces), stats)

    # --- HTTP ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS)
        except urllib.error.HTTPError as exc:
            raise KvrtError(f"the server at {self.base} answered {method} {path} with {exc.code}: "
                            f"{error_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise KvrtError(f"cannot reach the server at {self.base}: {reason}") from None

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._request(method, path, body) as reply:
            try:
                return json.loads(reply.read())
            except ValueError:
                raise KvrtError(f"the server at {self.base} answered {path} with something other than JSON") from None

    def _stream(self, path: str, body: dict):
        """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
        with self._request("POST", path, body) as reply:
            for raw in reply:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    return
                try:
                    yield json.loads(data)
                except ValueError:
                    raise KvrtError(f"the server at {self.base} sent an event that is not JSON: {data[:80]}") from None


def error_message(body: bytes) -> str:
    """An OpenAI-style error body's message, else the body's first line."""
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()
        return text.splitlines()[0][:200] if text else "no body"
