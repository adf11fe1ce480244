"""A chat session that keeps its KV cache across turns: earlier turns are never prefilled again.

Each turn renders the whole conversation with the model's chat template, finds the
longest prefix the cache already holds, rewinds the cache to it and feeds only the rest.
"""

from __future__ import annotations

from typing import Iterator

from kvrt.generate import GenerationStats, stream_text
from kvrt.sampling import SamplingParams


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, runtime, tokenizer, system_prompt: str | None = None, cache="full"):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.spec = cache
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = self.runtime.new_cache(self.spec)
        self.cached_ids: list[int] = []
        self.last_stats = GenerationStats()

    def send(self, text: str, params: SamplingParams, max_tokens: int, stop=()) -> Iterator[str]:
        """Stream the assistant's reply to a user message; the reply joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        ids = self.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
        keep = min(common_prefix(self.cached_ids, ids), len(ids) - 1)  # at least one token must be fed
        if not self.cache.rewind_to(keep):  # compressed tokens cannot be un-fed: start the cache over
            self.cache, keep = self.runtime.new_cache(self.spec), 0
        self.cached_ids = ids[:keep]
        generated: list[int] = []
        self.last_stats = GenerationStats()
        reply = []
        try:
            for piece in stream_text(
                self.runtime, self.tokenizer, ids[keep:], self.cache, params, max_tokens, stop,
                self.last_stats, generated,
            ):
                reply.append(piece)
                yield piece
        finally:
            # the cache holds the prompt and every generated token but the last (a cut-short forward is undone)
            fed = ids + generated[:-1]
            if self.cache.rewind_to(min(len(fed), self.cache.offset)):
                self.cached_ids = fed[: self.cache.offset]
            else:  # a forward cut short inside a compression: the next turn rebuilds the cache
                self.cache, self.cached_ids = self.runtime.new_cache(self.spec), []
            self.messages.append({"role": "assistant", "content": "".join(reply)})
