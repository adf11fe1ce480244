"""Cache specs: `METHOD[:key=value,...][+MODIFIER[:key=value,...]]...`, e.g. `full`.

One string names the whole cache configuration on the CLI (`--cache SPEC`) and in
Python (`CacheSpec.parse`), e.g. `full`, `snapkv:budget=128+calidrop`,
`pyramidkv:ratio=0.2+calidrop:theta1=0.7,theta2=0.85`, `streaming:budget=256,sinks=4`,
`ott:bits=2`, `snapkv:budget=512+ott:bits=2`, `snapkv:budget=128+calidrop:offload=int2+kivi`.
The method is `full`, an eviction method or a quantizer (kivi, ott); modifiers are
CaliDrop and, after an eviction method, a quantizer. Each declares its keys (kvrt/methods).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvrt.errors import InvalidValue

from kvrt.cache.methods import EVICTION_METHODS, QUANTIZERS, MODIFIERS as MODIFIER_CLASSES

# name -> {key: type} of the options each accepts
METHODS: dict[str, dict[str, type]] = {
    "full": {}, **{n: c.options for n, c in EVICTION_METHODS.items()}, **{n: c.options for n, c in QUANTIZERS.items()}
}
MODIFIERS: dict[str, dict[str, type]] = {
    **{n: c.options for n, c in MODIFIER_CLASSES.items()}, **{n: c.options for n, c in QUANTIZERS.items()}
}


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
            raise InvalidValue(f"empty cache spec part in '{text}'; expected METHOD[:key=value,...][+MODIFIER...]")
        method = parse_part(pieces[0], METHODS, "cache method")
        modifiers = tuple(parse_part(p, MODIFIERS, "cache modifier") for p in pieces[1:])
        spec = cls(method, modifiers)
        spec.build()  # the methods check their values now, not mid-generation
        return spec

    def __str__(self) -> str:
        return "+".join(str(p) for p in (self.method, *self.modifiers))

    @property
    def compresses(self) -> bool:
        """Whether its cache compresses what it is fed (evicts, calibrates or quantizes); `full` does not."""
        return any(part is not None for part in self.build())

    def eviction(self):
        """The configured eviction method object, or None."""
        cls = EVICTION_METHODS.get(self.method.name)
        return cls(**self.method.options) if cls else None

    def quantization(self):
        """The configured quantizer (KIVI or OTT), as the method or a modifier, or None."""
        parts = [p for p in (self.method, *self.modifiers) if p.name in QUANTIZERS]
        if len(parts) > 1:
            raise InvalidValue(f"'{self}' names {len(parts)} quantizers; use one (kivi or ott)")
        return QUANTIZERS[parts[0].name](**parts[0].options) if parts else None

    def calibration(self):
        """The CaliDrop configuration if the spec has the modifier, else None."""
        parts = [p for p in self.modifiers if p.name in MODIFIER_CLASSES]
        return MODIFIER_CLASSES[parts[0].name](**parts[0].options) if parts else None

    def build(self):
        """(eviction, calibration, quantization), validated: every bad value is one InvalidValue line."""
        eviction, calibration, quantization = self.eviction(), self.calibration(), self.quantization()
        stray = [p.name for p in self.modifiers if p.name in QUANTIZERS and eviction is None]
        if stray:
            raise InvalidValue(f"+{stray[0]} follows an eviction method (e.g. snapkv:budget=512+{stray[0]}); "
                            f"without one, make it the method: {stray[0]}:bits=2")
        if calibration is not None and eviction is None:
            raise InvalidValue("calidrop calibrates evicted tokens: put it after an eviction method, e.g. snapkv:budget=128+calidrop")
        if len({p.name for p in self.modifiers}) != len(self.modifiers):
            raise InvalidValue(f"a modifier appears twice in '{self}'")
        return eviction, calibration, quantization


def parse_part(text: str, registry: dict[str, dict[str, type]], what: str) -> Part:
    name, _, rest = text.partition(":")
    name = name.strip().lower()
    if name not in registry:
        known = ", ".join(registry) or "none yet"
        raise InvalidValue(f"unknown {what} '{name}'; available: {known}")
    keys = registry[name]
    options = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in keys:
            valid = ", ".join(keys) or "none"
            raise InvalidValue(f"bad option '{item}' for {name}; valid keys: {valid}")
        try:
            options[key] = keys[key](value.strip())
        except ValueError:
            raise InvalidValue(f"bad value '{value}' for {name}:{key} (expected {keys[key].__name__})") from None
        if isinstance(options[key], float) and not math.isfinite(options[key]):
            raise InvalidValue(f"bad value '{value}' for {name}:{key} (expected a finite number)")
    return Part(name, options)
