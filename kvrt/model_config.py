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
        # transformers >= 5 writes rope settings as `rope_parameters`, older configs as `rope_scaling`
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
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


def context_length(cfg: dict) -> int:
    """Tokens kvrt lets a sequence reach: the model's positions, capped at its sliding window if it
    has one (kvrt attends over the whole cache, which equals sliding-window attention only inside it)."""
    length = int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 4096)
    window = cfg.get("sliding_window")
    slides = cfg.get("model_type") == "mistral" or cfg.get("use_sliding_window")
    return min(length, int(window)) if slides and window else length


def rope_inv_freq(args: ModelArgs) -> np.ndarray:
    """Per-pair rotation frequencies [head_dim/2], with linear or Llama-3 scaling applied."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq.astype(np.float32)
    if kind == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if kind == "llama3":
        return llama3_scaled(inv_freq, scaling).astype(np.float32)
    raise KvrtError(f"unsupported rope scaling '{kind}'; supported: default, linear, llama3")


def llama3_scaled(inv_freq: np.ndarray, scaling: dict) -> np.ndarray:
    """Llama 3.1 rope scaling: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq
