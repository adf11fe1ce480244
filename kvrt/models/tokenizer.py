"""Tokenizer for an HF-format model folder: `tokenizers` + the model's own chat template.

Chat templates are rendered the way transformers renders them (sandboxed jinja2,
trim_blocks/lstrip_blocks, `raise_exception`, `strftime_now`, a non-escaping
`tojson`), so prompts match what users get elsewhere.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from kvrt.errors import InvalidValue, KvrtError


def _read_json(path: Path) -> dict:
    """Read an optional JSON file ({} when absent); a broken one is a KvrtError."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KvrtError(f"cannot parse {path}: {' '.join(str(e).split())}") from None
    return data if isinstance(data, dict) else {}


def _token_text(tok) -> str | None:
    """tokenizer_config stores special tokens as strings or AddedToken dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _ids(value) -> list[int]:
    """config eos_token_id may be an int, a list of ints, or missing."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def checked_text(text) -> str:
    """`text` if it is a str that is valid Unicode (undecodable bytes read with Python's surrogateescape
    would otherwise reach the tokenizer as lone surrogates); else one clear error."""
    if not isinstance(text, str):
        raise InvalidValue(f"text to encode must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidValue(f"the text is not valid UTF-8 (undecodable bytes from character {exc.start} on); "
                           "give UTF-8 text") from None
    return text


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}` (assistant-mask marker): render the body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's built-in tojson HTML-escapes; chat templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise KvrtError(f"the model's chat template does not parse: {e.message}") from None


class Tokenizer:
    """Encode/decode text and render chat prompts for one model folder."""

    def __init__(self, tok: _HFTokenizer, tok_cfg: dict, config: dict, gen_cfg: dict):
        self._tok = tok
        self._cfg = tok_cfg
        self.chat_template = self._pick_template(tok_cfg.get("chat_template"))
        self.bos_token = _token_text(tok_cfg.get("bos_token"))
        self.eos_token = _token_text(tok_cfg.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        if self.bos_token_id is None and isinstance(config.get("bos_token_id"), int):
            self.bos_token_id = config["bos_token_id"]
        self.add_bos_token = bool(tok_cfg.get("add_bos_token", False)) and self.bos_token_id is not None
        eos = {self._id_of(self.eos_token)} | set(_ids(config.get("eos_token_id")))
        eos |= set(_ids(gen_cfg.get("eos_token_id")))
        self.eos_token_ids: set[int] = {i for i in eos if i is not None}

    @classmethod
    def from_folder(cls, path) -> "Tokenizer":
        """Load ``tokenizer.json`` (+ tokenizer_config/config/generation_config) from a folder."""
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise KvrtError(f"{path} has no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(tj))
        except Exception as e:
            raise KvrtError(f"cannot load {tj}: {' '.join(str(e).split())}") from None
        return cls(tok, _read_json(path / "tokenizer_config.json"), _read_json(path / "config.json"),
                   _read_json(path / "generation_config.json"))

    @staticmethod
    def _pick_template(t):
        # Some configs hold a list of named templates; "default" is the chat one.
        if isinstance(t, list):
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            return named.get("default")
        return t if isinstance(t, str) else None

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def longest_token_chars(self) -> int:
        """The most characters of text one token can stand for (its vocabulary string's length, which a
        byte-level token's bytes or a piece's characters never exceed): a bound for refusing a text
        too long for the context before tokenizing it."""
        return max((len(t) for t in self._tok.get_vocab(with_added_tokens=True)), default=1)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text to ids; with special tokens, BOS is prepended when the model wants it."""
        # encode_batch lets go of the interpreter while it works (encode does not), so a long text
        # being tokenized on one thread never stalls the others (a server's requests)
        ids = self._tok.encode_batch([checked_text(text)], add_special_tokens=add_special_tokens)[0].ids
        # tokenizer.json's post-processor may already add BOS; never add it twice.
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` with the model's own template (as transformers does)."""
        if not self.chat_template:
            raise KvrtError("this model has no chat template; use a plain prompt instead")
        template = _compile_template(self.chat_template)
        special = {k: _token_text(self._cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        variables = {**special, "tools": None, "documents": None, **kwargs}
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise KvrtError(f"chat template error: {' '.join(str(e).split())}") from None
        except TypeError as e:  # a message whose content is no text (bytes, a number) meets the template's str ops
            raise InvalidValue(f"chat messages must hold text: {' '.join(str(e).split())}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render and tokenize a chat; the template supplies BOS itself (transformers adds none)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    def streaming_detokenizer(self, skip_special_tokens: bool = True) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self, skip_special_tokens=skip_special_tokens)


_MAX_HELD = 8  # tokens an incomplete character may be held back for


class StreamingDetokenizer:
    """Turn a stream of token ids into text pieces, never splitting a UTF-8 character.

    Keeps two offsets into the ids: text before ``_read`` has been emitted, and
    ``_prefix`` marks a few tokens of context decoded again so that merges across
    the boundary (leading spaces, multi-byte characters) come out right. Each
    step decodes only the ids since ``_prefix``: O(new tokens) amortized.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tk = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already emitted

    def _decode(self, start: int, end: int) -> str:
        return self._tk.decode(self._ids[start:end], skip_special_tokens=self._skip)

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it completed (possibly "")."""
        self._ids.append(int(token_id))
        return self._advance()

    def _advance(self) -> str:
        prefix_text = self._decode(self._prefix, self._read)
        full_text = self._decode(self._prefix, len(self._ids))
        # A trailing U+FFFD is an unfinished multi-byte character: wait for more bytes
        # (but not forever: a character needs at most 4 byte tokens, so emit invalid bytes as is).
        waiting = full_text.endswith("\ufffd") and len(self._ids) - self._read < _MAX_HELD
        if len(full_text) <= len(prefix_text) or waiting:
            return ""
        new = full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        self._trim()
        return new

    def _trim(self) -> None:
        # Forget ids before the window so memory (and slicing) stays bounded.
        if self._prefix > 256:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0

    def finalize(self) -> str:
        """Flush whatever is held back (an incomplete character is emitted as is)."""
        prefix_text = self._decode(self._prefix, self._read)
        full_text = self._decode(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]
