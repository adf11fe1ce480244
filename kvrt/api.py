"""The library API: `kvrt.load(...)` returns a Model with generate, stream and chat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from kvrt.chat import ChatSession
from kvrt.errors import KvrtError
from kvrt.generate import GenerationStats, stream_text
from kvrt.loading import load_runtime
from kvrt.model_config import context_length, read_config
from kvrt.model_store import resolve_model
from kvrt.sampling import SamplingParams
from kvrt.spec import CacheSpec
from kvrt.tokenizer import Tokenizer


@dataclass
class Generation:
    text: str
    stats: GenerationStats


def truncate_middle(ids: list[int], limit: int) -> list[int]:
    """Keep the first and last halves of `limit` tokens, dropping the middle (LongBench's rule)."""
    if len(ids) <= limit:
        return ids
    head = limit // 2
    return ids[:head] + ids[len(ids) - (limit - head) :]


class Model:
    """A loaded model: tokenizer, chat template and a backend runtime."""

    def __init__(self, runtime, tokenizer: Tokenizer, context_length: int):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.last_stats = GenerationStats()

    @property
    def backend(self) -> str:
        return self.runtime.backend

    def encode_prompt(
        self, prompt: str, system_prompt: str | None = None, chat_template: bool = True,
        max_tokens: int = 0, truncate: bool = False,
    ) -> list[int]:
        """Prompt ids (through the chat template unless disabled), fitted to the context window."""
        if chat_template and self.tokenizer.has_chat_template:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            ids = self.tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(((system_prompt + "\n") if system_prompt else "") + prompt)
        room = self.context_length - max_tokens
        if len(ids) > room:
            if not truncate or room < 2:
                raise KvrtError(
                    f"prompt is {len(ids)} tokens but the model's context is {self.context_length} "
                    f"(with {max_tokens} to generate); shorten it or pass --truncate"
                )
            ids = truncate_middle(ids, room)
        return ids

    def stream(
        self, prompt: str, *, max_tokens: int = 256, system_prompt: str | None = None,
        chat_template: bool = True, cache: str | CacheSpec = "full", stop: Sequence[str] = (),
        truncate: bool = False, params: SamplingParams | None = None, **sampling,
    ) -> Iterator[str]:
        """Yield the completion's text as it is generated; stats land in `self.last_stats`.

        Sampling is `params`, or keyword arguments of SamplingParams (temp, top_p, top_k, min_p, seed ...).
        """
        spec = CacheSpec.parse(cache)
        ids = self.encode_prompt(prompt, system_prompt, chat_template, max_tokens, truncate)
        yield from self.stream_ids(ids, max_tokens=max_tokens, cache=spec, params=params or SamplingParams(**sampling),
                                   stop=stop)

    def stream_ids(self, ids: Sequence[int], *, max_tokens: int, cache: str | CacheSpec = "full",
                   params: SamplingParams | None = None, stop: Sequence[str] = ()) -> Iterator[str]:
        """Stream the completion of already-tokenized prompt ids (kvrt eval builds its prompts to
        exact lengths); stats land in `self.last_stats`."""
        self.last_stats = GenerationStats()
        yield from stream_text(self.runtime, self.tokenizer, list(ids), self.runtime.new_cache(CacheSpec.parse(cache)),
                               params or SamplingParams(), max_tokens, stop, self.last_stats)

    def generate_ids(self, ids: Sequence[int], **kwargs) -> Generation:
        """The whole completion of prompt ids at once, with its stats."""
        text = "".join(self.stream_ids(ids, **kwargs))
        return Generation(text, self.last_stats)

    def generate(self, prompt: str, **kwargs) -> Generation:
        """The whole completion at once, with its stats."""
        text = "".join(self.stream(prompt, **kwargs))
        return Generation(text, self.last_stats)

    def chat_session(self, system_prompt: str | None = None, cache: str | CacheSpec = "full") -> ChatSession:
        """A multi-turn session that keeps its cache between turns (see kvrt.chat)."""
        return ChatSession(self.runtime, self.tokenizer, system_prompt, CacheSpec.parse(cache))

    def chat(self, messages: list[dict], *, max_tokens: int = 256, stop: Sequence[str] = (),
             cache: str | CacheSpec = "full", **sampling) -> Generation:
        """Reply to a list of {"role", "content"} messages (the last one from the user)."""
        if not messages or messages[-1].get("role") != "user":
            raise KvrtError("chat needs a list of messages ending with a user message")
        session = ChatSession(self.runtime, self.tokenizer, cache=CacheSpec.parse(cache))
        session.messages = [dict(m) for m in messages[:-1]]
        text = "".join(session.send(messages[-1]["content"], SamplingParams(**sampling), max_tokens, stop))
        self.last_stats = session.last_stats
        return Generation(text, session.last_stats)


def load(model: str = "default", backend: str = "auto", dtype: str | None = None, log=None) -> Model:
    """Resolve a model name (folder, .gguf, 'default', hub id), load it on a backend."""
    folder = resolve_model(model, log=log or (lambda *_: None))
    runtime = load_runtime(folder, backend, dtype)
    tokenizer = Tokenizer.from_folder(folder)
    return Model(runtime, tokenizer, context_length(read_config(folder)))
