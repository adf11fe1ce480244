"""The library API: `kvrt.load(...)` returns a Model with generate, stream and chat.

A Model may be shared by several threads: each call builds its own cache and returns its own
stats (on the Generation, or on the TextStream it hands back), and the backend runs one
forward at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from kvrt.errors import InvalidValue, KvrtError
from kvrt.generation.chat import ChatSession
from kvrt.generation.request import Request
from kvrt.generation.scheduler import run_requests
from kvrt.generation.stats import GenerationStats
from kvrt.generation.stream import TextStream, stream_alone
from kvrt.models.loading import load_runtime
from kvrt.models.config import context_length, read_config
from kvrt.models.store import resolve_model
from kvrt.generation.sampling import SamplingParams
from kvrt.cache.spec import CacheSpec
from kvrt.models.tokenizer import Tokenizer, checked_text

Progress = Callable[[int, int], None]  # (layers done, layers) while a prompt runs through the model


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

    @property
    def backend(self) -> str:
        return self.runtime.backend

    def encode_prompt(self, prompt: str, system_prompt: str | None = None, chat_template: bool = True) -> list[int]:
        """Prompt ids, through the chat template unless disabled. An empty prompt starts from the
        model's BOS token; a model without one refuses it (both backends alike)."""
        prompt = checked_text(prompt)
        system_prompt = None if system_prompt is None else checked_text(system_prompt)
        if chat_template and self.tokenizer.has_chat_template:
            messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
            ids = self.tokenizer.encode_chat(messages + [{"role": "user", "content": prompt}])
        else:
            ids = self.tokenizer.encode(((system_prompt + "\n") if system_prompt else "") + prompt)
        if not ids and self.tokenizer.bos_token_id is None:
            raise InvalidValue("the prompt is empty and this model has no BOS token to start from; give a prompt")
        return ids or [self.tokenizer.bos_token_id]

    def fit_prompt(self, ids: list[int], max_tokens: int = 0, truncate: bool = False) -> list[int]:
        """`ids` if they fit the context with `max_tokens` to generate, else cut in the middle
        (`truncate`) or refused."""
        room = self.context_length - max_tokens
        if len(ids) <= room:
            return ids
        if room < 2:
            raise KvrtError(f"prompt is {len(ids)} tokens but the model's context is {self.context_length} and "
                            f"{max_tokens} to generate leave {max(room, 0)} of it for the prompt; lower --max-tokens")
        if not truncate:
            raise KvrtError(
                f"prompt is {len(ids)} tokens but the model's context is {self.context_length} "
                f"(with {max_tokens} to generate); shorten it or pass --truncate"
            )
        return truncate_middle(ids, room)

    def stream(
        self, prompt: str, *, max_tokens: int = 256, system_prompt: str | None = None,
        chat_template: bool = True, cache: str | CacheSpec = "full", stop: Sequence[str] = (),
        truncate: bool = False, params: SamplingParams | None = None, progress: Progress | None = None,
        **sampling,
    ) -> TextStream:
        """The completion's text as it is generated (iterate it); its stats are the stream's `.stats`.

        Sampling is `params`, or keyword arguments of SamplingParams (temp, top_p, top_k, min_p, seed ...).
        The prompt is checked now: a bad one raises here, before the first piece.
        """
        params = params or SamplingParams(**sampling)
        spec = CacheSpec.parse(cache)
        ids = self.encode_prompt(prompt, system_prompt, chat_template)
        fitted = self.fit_prompt(ids, max_tokens, truncate)
        stream = self.stream_ids(fitted, max_tokens=max_tokens, cache=spec, params=params, stop=stop,
                                 progress=progress)
        stream.stats.truncated_tokens = len(ids) - len(fitted)
        return stream

    def stream_ids(self, ids: Sequence[int], *, max_tokens: int, cache: str | CacheSpec = "full",
                   params: SamplingParams | None = None, stop: Sequence[str] = (),
                   progress: Progress | None = None) -> TextStream:
        """Stream the completion of already-tokenized prompt ids (kvrt eval builds its prompts to exact
        lengths)."""
        if not ids:
            raise InvalidValue("no prompt token ids to start from")
        request = Request(self, ids, CacheSpec.parse(cache), params or SamplingParams(), max_tokens, stop,
                          progress=progress)
        return stream_alone(self, request)

    def generate_ids(self, ids: Sequence[int], **kwargs) -> Generation:
        """The whole completion of prompt ids at once, with its stats."""
        stream = self.stream_ids(ids, **kwargs)
        return Generation(stream.text(), stream.stats)

    def generate(self, prompt: str | Sequence[str], **kwargs) -> Generation | list[Generation]:
        """The whole completion at once, with its stats (same arguments as `stream`). A list of
        prompts is generated as a batch (`max_batch` rows at once, default 8; see `generate_batch`)."""
        if not isinstance(prompt, str) and isinstance(prompt, Sequence):
            return self.generate_batch(prompt, **kwargs)
        stream = self.stream(prompt, **kwargs)
        return Generation(stream.text(), stream.stats)

    def generate_batch(
        self, prompts: Sequence[str], *, max_tokens: int = 256, system_prompt: str | None = None,
        chat_template: bool = True, cache: str | CacheSpec = "full", stop: Sequence[str] = (),
        truncate: bool = False, params: SamplingParams | None = None, max_batch: int = 8, **sampling,
    ) -> list[Generation]:
        """One Generation per prompt, decoded together (kvrt.generation.scheduler: one model call per step for all
        rows, each over its own compressed cache); greedy text equals each prompt's text alone."""
        ids = [self.encode_prompt(p, system_prompt, chat_template) for p in prompts]
        fitted = [self.fit_prompt(i, max_tokens, truncate) for i in ids]
        results = self.generate_ids_batch(fitted, max_tokens=max_tokens, cache=cache, stop=stop, params=params,
                                          max_batch=max_batch, **sampling)
        for result, full, kept in zip(results, ids, fitted):
            result.stats.truncated_tokens = len(full) - len(kept)
        return results

    def generate_ids_batch(self, prompts: Sequence[Sequence[int]], *, max_tokens: int, cache: str | CacheSpec = "full",
                           stop: Sequence[str] = (), params: SamplingParams | None = None, max_batch: int = 8,
                           **sampling) -> list[Generation]:
        """`generate_batch` for already-tokenized prompts (kvrt eval --batch)."""
        if max_batch < 1:
            raise InvalidValue(f"max_batch must be >= 1, got {max_batch}")
        if any(not ids for ids in prompts):
            raise InvalidValue("no prompt token ids to start from")
        params = params or SamplingParams(**sampling)
        spec = CacheSpec.parse(cache)
        requests = [Request(self, ids, spec, params, max_tokens, stop) for ids in prompts]
        run_requests(self, requests, max_batch=max_batch)
        return [Generation(request.text, request.stats) for request in requests]

    def chat_session(self, system_prompt: str | None = None, cache: str | CacheSpec = "full",
                     overflow: str = "drop") -> ChatSession:
        """A multi-turn session that keeps its cache between turns (see kvrt.generation.chat); a turn that would
        not fit the context drops the oldest turns (`overflow="drop"`) or raises (`"stop"`)."""
        return ChatSession(self, system_prompt, CacheSpec.parse(cache), overflow=overflow)

    def chat(self, messages: list[dict], *, max_tokens: int = 256, stop: Sequence[str] = (),
             cache: str | CacheSpec = "full", params: SamplingParams | None = None, **sampling) -> Generation:
        """Reply to a list of {"role", "content"} messages (the last one from the user); a conversation
        that does not fit the context is refused, never shortened behind the caller's back."""
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise InvalidValue("chat needs a list of messages ending with a user message")
        session = self.chat_session(cache=cache, overflow="stop")
        session.messages = [dict(m) for m in messages[:-1]]
        stream = session.send(messages[-1]["content"], max_tokens=max_tokens, stop=stop, params=params, **sampling)
        return Generation(stream.text(), stream.stats)


def load(model: str = "default", backend: str = "auto", dtype: str | None = None, log=None) -> Model:
    """Resolve a model name (folder, .gguf, 'default', hub id), load it on a backend."""
    folder = resolve_model(model, log=log or (lambda *_: None))
    runtime = load_runtime(folder, backend, dtype)
    tokenizer = Tokenizer.from_folder(folder)
    return Model(runtime, tokenizer, context_length(read_config(folder)))
