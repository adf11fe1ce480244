"""The CLI's cache options: `--cache SPEC`, or convenience flags that map onto the same spec.

`--evict snapkv --budget 512 --calibrate --kv-bits 2` is `snapkv:budget=512+calidrop+ott:bits=2`.
`--kv-group-size` is kvrt's key group: G tokens share a scale and zero per channel (KIVI/OTT),
not mlx-lm's `--kv-group-size`, which groups channels.
"""

from __future__ import annotations

import functools

import click

from kvrt.errors import KvrtError

EVICTION_CHOICES = ["streaming", "h2o", "snapkv", "pyramidkv"]


def cache_spec_from(cache_spec=None, evict=None, budget=None, calibrate=False, kv_bits=None, kv_group_size=None,
                    kv_residual=None, kv_outliers=None) -> str:
    """One canonical spec string from --cache or the convenience flags."""
    from kvrt.cache.spec import CacheSpec

    quant = {"bits": kv_bits, "group": kv_group_size, "residual": kv_residual, "outliers": kv_outliers}
    flags = evict or budget or calibrate or any(v is not None for v in quant.values())
    if cache_spec is not None and flags:
        raise click.UsageError("use either --cache SPEC or the flags --evict/--budget/--calibrate/--kv-*, not both")
    if cache_spec is not None:
        return str(CacheSpec.parse(cache_spec))
    if (budget is not None or calibrate) and evict is None:
        raise click.UsageError("--budget and --calibrate need --evict METHOD")
    if evict is not None and budget is None:
        raise click.UsageError(f"--evict {evict} needs --budget N")
    if kv_bits is None and any(v is not None for v in quant.values()):
        raise click.UsageError("--kv-group-size, --kv-residual and --kv-outliers need --kv-bits")
    parts = [f"{evict}:budget={budget}"] if evict else []
    parts += ["calidrop"] if calibrate else []
    if kv_bits is not None:  # OTT: with --kv-outliers 0 it is exactly KIVI
        parts.append("ott:" + ",".join(f"{k}={v}" for k, v in quant.items() if v is not None))
    return str(CacheSpec.parse("+".join(parts) or "full"))


def cache_options(command):
    """Add the cache options to a click command, which receives one `cache_spec` string."""
    options = [
        click.option("--cache", "cache_spec", default=None,
                     help="Cache spec METHOD[:key=value,...][+MODIFIER...], e.g. snapkv:budget=128+calidrop, "
                          "ott:bits=2, snapkv:budget=512+ott:bits=2 (default: full)."),
        click.option("--evict", type=click.Choice(EVICTION_CHOICES), default=None,
                     help="Eviction method (same as --cache METHOD:budget=N)."),
        click.option("--budget", type=click.IntRange(min=1), default=None, help="Tokens kept per layer and KV head."),
        click.option("--calibrate", is_flag=True, help="Add CaliDrop calibration (same as +calidrop)."),
        click.option("--kv-bits", type=click.Choice(["2", "4", "8"]), default=None,
                     help="Quantize the KV cache (OTT, same as +ott:bits=B)."),
        click.option("--kv-group-size", type=click.IntRange(min=1), default=None,
                     help="Tokens per key group sharing a scale and zero [128]."),
        click.option("--kv-residual", type=click.IntRange(min=0), default=None,
                     help="Newest tokens kept in full precision [32]."),
        click.option("--kv-outliers", type=click.IntRange(min=0), default=None,
                     help="Outlier tokens traced per KV head [3]; 0 = plain KIVI."),
    ]

    @functools.wraps(command)
    def resolved(**kwargs):
        names = ("cache_spec", "evict", "budget", "calibrate", "kv_bits", "kv_group_size", "kv_residual", "kv_outliers")
        flags = {name: kwargs.pop(name) for name in names}
        flags["kv_bits"] = int(flags["kv_bits"]) if flags["kv_bits"] else None
        try:
            kwargs["cache_spec"] = cache_spec_from(**flags)
        except KvrtError as exc:  # a bad spec is a usage error of these options
            raise click.UsageError(str(exc)) from None
        return command(**kwargs)

    for option in reversed(options):
        resolved = option(resolved)
    return resolved
