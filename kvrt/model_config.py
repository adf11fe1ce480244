"""ModelArgs: the decoder hyper-parameters kvrt needs, read from an HF config.json."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvrt.errors import KvrtError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2/2.5 put a bias on q, k and v
    qk_norm: bool  # Qwen3 RMS-normalizes q and k per head before RoPE

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type", "?")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise KvrtError(
                f"unsupported architecture '{model_type}' on the torch backend; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        heads = cfg["num_attention_heads"]
        rope = rope_parameters(cfg)
        rope_theta = cfg.get("rope_theta") or rope.get("rope_theta", 10000.0)
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", model_type != "llama"),
            attention_bias=cfg.get("attention_bias", model_type == "qwen2"),
            qk_norm=model_type == "qwen3",
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelArgs":
        try:
            return cls.from_config(read_config(folder))
        except (KeyError, TypeError) as exc:
            raise KvrtError(f"{folder}/config.json is not a usable model config ({type(exc).__name__}: {exc})") from None


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict, or one clear error."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise KvrtError(f"{folder} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KvrtError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise KvrtError(f"{path} is not a JSON object")
    return cfg


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def rope_parameters(cfg: dict) -> dict:
    """The config's rope settings as one dict with `rope_type` set ({} when it has none).

    transformers >= 5 writes them as `rope_parameters`, older configs as `rope_scaling` (with `type`
    in the oldest). Like transformers' `standardize_rope_params`, llama3 and yarn take
    `original_max_position_embeddings` from the top level of the config when it is there (Phi-3
    style), else from the rope dict, else `max_position_embeddings`."""
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    if not rope:
        return rope
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] in ("llama3", "yarn"):
        if cfg.get("original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
    return rope


def context_length(cfg: dict) -> int:
    """Tokens kvrt lets a sequence reach.

    The model's positions (`max_position_embeddings`), except that yarn and dynamic rope scaling
    extend them to `original_max_position_embeddings` x `factor` where that is larger (Qwen2.5's
    YaRN configs keep max_position_embeddings at the pretraining 32768 and say factor 4;
    dynamic NTK has no original length, so it is max_position_embeddings x factor). Then capped
    at the sliding window if the model has one (kvrt attends over the whole cache, which equals
    sliding-window attention only inside it)."""
    length = int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 4096)
    rope = rope_parameters(cfg)
    if rope.get("rope_type") in ("yarn", "dynamic") and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or length
        length = max(length, int(original * float(rope["factor"])))
    window = cfg.get("sliding_window")
    slides = cfg.get("model_type") == "mistral" or cfg.get("use_sliding_window")
    return min(length, int(window)) if slides and window else length


def rope_type(args: ModelArgs) -> str:
    """The rope variant of `args`, or one clear error for a variant kvrt does not compute."""
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise KvrtError(f"unsupported rope scaling '{kind}'; supported: {', '.join(ROPE_TYPES)}")
    if kind != "default" and "factor" not in scaling:
        raise KvrtError(f"rope scaling '{kind}' in the config has no factor")
    return kind


def rope_inv_freq(args: ModelArgs, seq_len: int | None = None) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim/2] (float32) as transformers computes them.

    `seq_len` matters for dynamic NTK only: the frequencies of a forward whose last position is
    seq_len - 1 (transformers' `dynamic_rope_update` recomputes them from max position + 1 once
    that exceeds max_position_embeddings; below it they are the unscaled ones)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = args.rope_scaling or {}
    kind = rope_type(args)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = llama3_scaled(inv_freq, scaling)
    elif kind == "yarn":
        inv_freq = yarn_scaled(inv_freq, scaling, args.rope_theta, args.max_position_embeddings)
    elif kind == "dynamic" and seq_len is not None and seq_len > args.max_position_embeddings:
        inv_freq = dynamic_ntk_inv_freq(args, seq_len)
    return inv_freq.astype(np.float32)


def rope_attention_factor(args: ModelArgs) -> float:
    """What cos and sin are multiplied by: YaRN's attention factor, 1 for every other variant."""
    if rope_type(args) != "yarn":
        return 1.0
    return yarn_attention_factor(args.rope_scaling, args.max_position_embeddings)


def llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 rope scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between.

    inv_freq: [head_dim/2]. The pretraining length defaults to 8192 only for callers that give none
    (`rope_parameters` fills it in from the config as transformers does)."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def _yarn_factor(scaling: dict, max_position_embeddings: int) -> float:
    # DeepSeek-V3 style configs leave factor out: transformers takes the ratio of the two lengths
    factor = scaling.get("factor")
    if factor is None:
        return max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(factor)


def yarn_attention_factor(scaling: dict, max_position_embeddings: int) -> float:
    """YaRN's cos/sin scale: `attention_factor` if given, else 0.1·mscale·ln(factor) + 1 (over the
    same with mscale_all_dim when both are set), as transformers' `_compute_yarn_parameters`."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = _yarn_factor(scaling, max_position_embeddings)

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
    return mscale_of(factor)


def yarn_scaled(inv_freq: np.ndarray, scaling: dict, base: float, max_position_embeddings: int) -> np.ndarray:
    """YaRN (arXiv 2309.00071) frequencies [head_dim/2]: pairs that rotate more than `beta_fast` times
    over the pretraining length keep their frequency, those under `beta_slow` are divided by `factor`,
    a linear ramp over pair index between (bounds floored/ceiled unless `truncate` is false)."""
    factor = _yarn_factor(scaling, max_position_embeddings)
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    dim = 2 * len(inv_freq)

    def pair_of(rotations: float) -> float:
        # the (fractional) pair index that completes `rotations` turns over `original` positions
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_of(beta_fast), pair_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(len(inv_freq), dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # share of the unscaled (extrapolated) frequency
    return inv_freq / factor * (1.0 - keep) + inv_freq * keep


def dynamic_ntk_inv_freq(args: ModelArgs, seq_len: int) -> np.ndarray:
    """Dynamic NTK frequencies [head_dim/2] for a sequence of `seq_len` positions: the base grows
    to base·(factor·seq_len/max_pos − (factor − 1))^(d/(d−2)), as transformers'
    `_compute_dynamic_ntk_parameters`."""
    d, max_pos = args.head_dim, args.max_position_embeddings
    factor = float(args.rope_scaling["factor"])
    seq_len = max(seq_len, max_pos)
    base = args.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (d / (d - 2))
    return 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float64) / d))
