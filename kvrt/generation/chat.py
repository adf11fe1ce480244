"""A chat session that keeps its KV cache across turns: earlier turns are never prefilled again.

Each turn renders the whole conversation with the model's chat template, finds the
longest prefix the cache already holds, rewinds the cache to it and feeds only the rest.
Every turn must fit the model's context with its `max_tokens` to generate (positions past
the context are out of the model's range, whatever the cache keeps); one that would not
either drops the oldest turns (`overflow="drop"`, counted in its stats) or is refused
(`"stop"`). A refused turn leaves the conversation as it was.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

from kvrt.errors import InvalidValue, KvrtError
from kvrt.generation.request import Request
from kvrt.generation.sampling import SamplingParams
from kvrt.generation.stream import TextStream, stream_alone

OVERFLOW = ("drop", "stop")


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    def __init__(self, model, system_prompt: str | None = None, cache="full", overflow: str = "drop"):
        if overflow not in OVERFLOW:
            raise InvalidValue(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
        self.model, self.runtime, self.tokenizer = model, model.runtime, model.tokenizer
        self.system_prompt = system_prompt
        self.spec = cache
        self.context_length = model.context_length
        self.overflow = overflow
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and the cache."""
        self.messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        self.cache = self.runtime.new_cache(self.spec)
        self.cached_ids: list[int] = []

    def send(self, text: str, *, max_tokens: int = 256, stop: Sequence[str] = (),
             params: SamplingParams | None = None, progress: Callable[[int, int], None] | None = None,
             **sampling) -> TextStream:
        """Stream the assistant's reply to a user message (the same keyword sampling arguments as
        Model.generate); the reply joins the conversation. A turn that cannot fit raises here."""
        params = params or SamplingParams(**sampling)
        messages, ids, dropped = self.fitted(self.messages + [{"role": "user", "content": text}], max_tokens)
        self.messages = messages
        keep = min(common_prefix(self.cached_ids, ids), len(ids) - 1)  # at least one token must be fed
        if not self.cache.rewind_to(keep):  # compressed tokens cannot be un-fed: start the cache over
            self.cache, keep = self.runtime.new_cache(self.spec), 0
        self.cached_ids = ids[:keep]
        request = Request(self.model, ids[keep:], self.spec, params, max_tokens, stop, cache=self.cache,
                          progress=progress)
        request.stats.dropped_turns = dropped
        return TextStream(self._reply(ids, request), request.stats)

    def fitted(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], list[int], int]:
        """(messages, their prompt ids, turns dropped) that fit the context with `max_tokens` to spare."""
        first = 1 if messages and messages[0].get("role") == "system" else 0
        dropped = 0
        while True:
            ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
            if self.context_length is None or len(ids) + max_tokens <= self.context_length:
                return messages, ids, dropped
            need = f"{len(ids)} tokens + {max_tokens} to generate exceed the model's context of {self.context_length}"
            if self.overflow == "stop":
                raise KvrtError(f"the conversation no longer fits: {need}; /reset starts over "
                                "(or drop the oldest turns with --overflow drop)")
            if len(messages) - first <= 1:
                raise KvrtError(f"this message does not fit even alone: {need}; shorten it or lower --max-tokens")
            # a turn is a user message and the replies up to the next one
            end = next((i for i in range(first + 1, len(messages)) if messages[i].get("role") == "user"),
                       len(messages) - 1)
            messages = messages[:first] + messages[end:]
            dropped += 1

    def _reply(self, ids: list[int], request: Request) -> Iterator[str]:
        reply = []
        try:
            for piece in stream_alone(self.model, request):
                reply.append(piece)
                yield piece
        finally:
            # the cache holds the prompt and every sampled token but the last (a cut-short forward is undone)
            fed = ids + request.tokens[:-1]
            if self.cache.rewind_to(min(len(fed), self.cache.offset)):
                self.cached_ids = fed[: self.cache.offset]
            else:  # a forward cut short inside a compression: the next turn rebuilds the cache
                self.cache, self.cached_ids = self.runtime.new_cache(self.spec), []
            self.messages.append({"role": "assistant", "content": "".join(reply)})
