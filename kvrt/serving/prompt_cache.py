"""The prompt cache across requests: `kvrt serve` keeps the KV cache of a request that ended, so
that a later request whose tokens start the same way feeds only the rest. Chat clients resend the
whole conversation every turn; with this, a turn prefills only its new message.

An entry is a one-row KV cache and the tokens it holds, in order: a request's prompt and every
token it sampled but the last. A request of the same cache spec continues from the entry it shares
the most tokens with (never its prompt's last token, which must be fed for its logits):

- `full` compresses nothing, so any shared prefix is reused (a system prompt, an edited last
  message), and the cache of a prefix is the one the whole prompt would build: greedy tokens equal
  a run without the prompt cache.
- Eviction (SnapKV, PyramidKV, StreamingLLM, H2O), CaliDrop, KIVI and OTT compress a prompt once it
  is in, for that prompt. So only a request that extends an earlier request's prompt and reply
  (the next turn of a conversation) continues from that request's compressed cache, exactly as
  the next turn of a ChatSession does (kvrt.generation.chat). That is not the cache compressing
  the whole conversation afresh would build: earlier turns stay as they were compressed (SnapKV
  scored them with their own turn's window, KIVI quantized them before the new turn's queries saw
  them), and the new turn is compressed on its own. A request that wants the fresh compression
  sends `"kvrt": {"prompt_cache": false}`.

A request that extends an entry takes it over (its cache then grows in place); one that shares a
shorter prefix gets a copy of that prefix (KVCache.prefix) and the entry stays. Entries are bounded
in bytes, least recently used out first. The engine calls every method under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from itertools import count

from kvrt.cache.spec import CacheSpec
from kvrt.generation.chat import common_prefix
from kvrt.generation.request import Request

DEFAULT_BYTES = 2**30  # `--prompt-cache`'s default: about 23k tokens of the default model's full cache


@dataclass
class Entry:
    spec: CacheSpec
    ids: list[int]  # the tokens its cache holds, in order
    cache: object  # kvrt.cache.kvcache.KVCache, one row
    nbytes: int


class PromptCache:
    def __init__(self, capacity: int = DEFAULT_BYTES):
        self.capacity = capacity
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.hits = self.misses = self.tokens_reused = 0
        self._keys = count()

    def __len__(self) -> int:
        return len(self.entries)

    def find(self, spec: CacheSpec, ids: list[int]) -> tuple[int | None, int]:
        """(the entry a prompt would continue from, the tokens of it kept); (None, 0) for none."""
        best, most, name, compresses = None, 0, str(spec), spec.compresses
        for key, entry in self.entries.items():
            if str(entry.spec) != name:
                continue
            keep = min(common_prefix(entry.ids, ids), len(ids) - 1)
            whole = keep == len(entry.ids)  # the request extends the entry
            if keep > most and (whole or not compresses) and entry.cache.can_rewind_to(keep):
                best, most = key, keep
        return best, most

    def attach(self, request: Request) -> int:
        """Start a request from its best entry, if any; returns the prompt tokens it need not feed."""
        key, keep = self.find(request.spec, request.prompt_ids)
        if key is None:
            self.misses += 1
            return 0
        entry = self.entries[key]
        if keep == len(entry.ids):  # the request extends the entry: it takes the cache over
            self._remove(key)
            cache = entry.cache
        else:
            cache = entry.cache.prefix(keep)
            self.entries.move_to_end(key)
        request.resume(cache, keep)
        self.hits += 1
        self.tokens_reused += keep
        return keep

    def store(self, request: Request) -> None:
        """Keep the cache of a request that ended (the least recently used entries go to make room)."""
        cache = request.cache
        nbytes = cache.nbytes()
        if nbytes > self.capacity or cache.rows != 1 or cache.offset < 1:
            return
        self.entries[next(self._keys)] = Entry(request.spec, request.held_ids(), cache, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.capacity:
            self.drop_oldest()

    def drop_oldest(self, spare: int | None = None) -> bool:
        """Drop the least recently used entry but `spare`; False when there is none."""
        key = next((k for k in self.entries if k != spare), None)
        if key is None:
            return False
        self._remove(key)
        return True

    def _remove(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes

    def metrics(self) -> dict:
        return {"prompt_cache_hits_total": self.hits, "prompt_cache_misses_total": self.misses,
                "prompt_cache_tokens_reused_total": self.tokens_reused, "prompt_cache_bytes": self.nbytes,
                "prompt_cache_budget_bytes": self.capacity, "prompt_cache_entries": len(self.entries)}
