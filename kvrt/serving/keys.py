"""API keys for `kvrt serve`: a bearer key on every /v1 route and the tokenizer's routes (and
/metrics unless it is public).

As vLLM's and llama.cpp's `--api-key`: a client sends `Authorization: Bearer KEY`. Keys are compared
as SHA-256 digests in constant time, every key each time, so a reply's timing tells nothing of a
key's length or of which key came close. /health stays open for load balancers.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Sequence

TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")  # vLLM's, which lm-eval-harness calls


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


class ApiKeys:
    """The keys a server accepts (none: every route is open)."""

    def __init__(self, keys: Sequence[str] = (), metrics_public: bool = False):
        self.digests = [_digest(k) for k in keys if k]
        self.metrics_public = metrics_public

    def __bool__(self) -> bool:
        return bool(self.digests)

    def guards(self, path: str) -> bool:
        """Whether a request for `path` must carry a key."""
        if not self.digests:
            return False
        if path == "/metrics":
            return not self.metrics_public
        return path == "/v1" or path.startswith("/v1/") or path in TOKENIZER_PATHS

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header carries one of the keys (scheme Bearer, any case)."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        given = _digest(token.strip())
        matched = False
        for digest in self.digests:  # no early exit: every key costs the same
            matched |= hmac.compare_digest(given, digest)
        return matched and scheme.lower() == "bearer"


def exposure_warning(host: str, keys: ApiKeys) -> str | None:
    """One warning line when the server listens beyond this machine without a key, else None."""
    if keys or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return None
    except ValueError:  # a host name: it may resolve to any interface
        pass
    return (f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model "
            "(set --api-key or KVRT_API_KEY)")
