"""A burst of bad requests against a kvrt server, sent from its own process (as a remote client
would: its CPU and interpreter are not the server's, nor the test's).

    python bad_requests.py URL LONGEST_TEXT_CHARS ROUNDS

Prints one JSON list of [status received, status expected] per request."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx


def kinds(longest: int) -> list[tuple[str, object, int]]:
    """(path, body or a function making it, the status it must get), twelve kinds."""
    huge = b'{"prompt": "' + b"x" * (50 * 2**20) + b'"}'  # 50 MB, as a load run sent

    def chunked():
        return iter([huge[i : i + 2**16] for i in range(0, len(huge), 2**16)])

    def body(value) -> bytes:
        return json.dumps(value).encode()

    completions, chat = "/v1/completions", "/v1/chat/completions"
    return [
        (completions, huge, 413), (completions, chunked, 413), (completions, b"[" * 5000, 400),
        (completions, b'{"prompt": "hi", "x": ' + b'{"a": ' * 100 + b"1" + b"}" * 100 + b"}", 400),
        (completions, body({"prompt": "a" * (longest + 1)}), 400),  # refused before tokenizing
        (completions, b'{"prompt": "hi", ', 400), (completions, body({"prompt": "hi", "model": "other"}), 404),
        (completions, body({"prompt": [10**9]}), 400), (completions, body({"prompt": "hi", "max_tokens": -1}), 400),
        (completions, body({"prompt": "hi", "kvrt": {"cache": "snapkv:budget=lots"}}), 400),
        (completions, body({"prompt": "hi", "logprobs": 99}), 400), (chat, body({"messages": []}), 400),
    ]


def main() -> None:
    url, longest, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    burst = kinds(longest)
    # the longest text the server tokenizes, of digits (the most tokens): tokenized, then refused; twice
    text = ("1234567890" * (longest // 10 + 1))[:longest]
    requests = [("/v1/completions", json.dumps({"prompt": text}).encode(), 400)] * 2 + burst * rounds

    def send(request) -> list[int]:
        path, body, status = request
        reply = httpx.post(f"{url}{path}", content=body() if callable(body) else body, timeout=120,
                           headers={"Content-Type": "application/json"})
        return [reply.status_code, status]

    with ThreadPoolExecutor(8) as pool:
        print(json.dumps(list(pool.map(send, requests))))


if __name__ == "__main__":
    main()
