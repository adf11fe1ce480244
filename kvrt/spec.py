"""Cache specs: `METHOD[:key=value,...][+MODIFIER[:key=value,...]]...`, e.g. `full`.

One string names the whole cache configuration on the CLI (`--cache SPEC`) and in
Python (`CacheSpec.parse`). Methods and modifiers register their keys in `METHODS`
and `MODIFIERS`; the runtime issue ships `full`, the eviction and quantization
issues add theirs without changing the grammar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvrt.errors import KvrtError

# name -> {key: type} of the options each accepts
METHODS: dict[str, dict[str, type]] = {"full": {}}
MODIFIERS: dict[str, dict[str, type]] = {}


@dataclass(frozen=True)
class Part:
    name: str
    options: dict = field(default_factory=dict)

    def __str__(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


@dataclass(frozen=True)
class CacheSpec:
    method: Part
    modifiers: tuple[Part, ...] = ()

    @classmethod
    def parse(cls, text: "str | CacheSpec") -> "CacheSpec":
        if isinstance(text, CacheSpec):
            return text
        pieces = [p.strip() for p in str(text).strip().split("+")]
        if not pieces[0] or any(not p for p in pieces):
            raise KvrtError(f"empty cache spec part in '{text}'; expected METHOD[:key=value,...][+MODIFIER...]")
        method = parse_part(pieces[0], METHODS, "cache method")
        modifiers = tuple(parse_part(p, MODIFIERS, "cache modifier") for p in pieces[1:])
        return cls(method, modifiers)

    def __str__(self) -> str:
        return "+".join(str(p) for p in (self.method, *self.modifiers))


def parse_part(text: str, registry: dict[str, dict[str, type]], what: str) -> Part:
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in registry:
        known = ", ".join(registry) or "none yet"
        raise KvrtError(f"unknown {what} '{name}'; available: {known}")
    keys = registry[name]
    options = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in keys:
            valid = ", ".join(keys) or "none"
            raise KvrtError(f"bad option '{item}' for {name}; valid keys: {valid}")
        try:
            options[key] = keys[key](value.strip())
        except ValueError:
            raise KvrtError(f"bad value '{value}' for {name}:{key} (expected {keys[key].__name__})") from None
    return Part(name, options)
