"""ModelArgs: the decoder hyper-parameters kvrt needs, read from an HF config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from kvrt.errors import KvrtError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3")
GEMMA = ("gemma2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")

# transformers' config-class defaults for the fields kvrt reads, where a config.json may leave them
# out (Gemma 3's multimodal configs carry a sparse text_config; Phi-3's class fixes the original length)
_GEMMA_DEFAULTS = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4096, rms_norm_eps=1e-6,
                       hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, num_attention_heads=8,
                       num_key_value_heads=4, attention_bias=False)
CONFIG_DEFAULTS = {
    "gemma2": dict(_GEMMA_DEFAULTS, vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, max_position_embeddings=8192, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0),
    "gemma3_text": dict(_GEMMA_DEFAULTS, vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                        num_hidden_layers=26, max_position_embeddings=131072, attn_logit_softcapping=None,
                        final_logit_softcapping=None),
    "phi3": dict(original_max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
DEFAULT_ROPE_THETA = {"gemma3_text": 1_000_000.0}  # everything else: 10000
LOCAL, GLOBAL = "sliding_attention", "full_attention"


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
    qk_norm: bool  # Qwen3 and Gemma 3 RMS-normalize q and k per head before RoPE
    hidden_act: str = "silu"  # the MLP's gate activation (Gemma: gelu_pytorch_tanh)
    partial_rotary_factor: float = 1.0  # Phi-4-mini rotates only the first 0.75 of each head's dims
    # per layer, "sliding_attention" or "full_attention"; () = all full
    layer_types: tuple[str, ...] = ()
    windows: tuple[int | None, ...] = ()  # per layer, the sliding window (None: global); () = all global
    local_rope_theta: float | None = None  # Gemma 3: sliding layers rotate with their own base...
    local_rope_scaling: dict | None = None  # ...and their own scaling (none in released checkpoints)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is its -1/2 power, not head_dim's
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> c·tanh(scores / c) before softmax
    final_logit_softcapping: float | None = None  # Gemma 2/3: the same on the output logits

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (the first ones; the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def gemma(self) -> bool:
        """Gemma's block: (1 + w) norms around attention and MLP, embeddings scaled by sqrt(hidden)."""
        return self.model_type in GEMMA

    def local_rope_args(self) -> "ModelArgs | None":
        """These args with the sliding layers' rope in place of the global one (Gemma 3); None
        where every layer rotates alike. The functions of kvrt.models.rope take either."""
        if self.local_rope_theta is None:
            return None
        return replace(self, rope_theta=self.local_rope_theta, rope_scaling=self.local_rope_scaling)

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelArgs":
        model_type = cfg.get("model_type", "?")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise KvrtError(
                f"unsupported architecture '{model_type}' on the torch backend; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        cfg = decoder_config(cfg)
        model_type = cfg["model_type"]
        if cfg.get("use_bidirectional_attention"):
            raise KvrtError(f"{model_type} with bidirectional attention (an embedding model) is not a decoder "
                            "kvrt runs")
        heads = cfg["num_attention_heads"]
        rope = rope_parameters(cfg)
        rope_theta = cfg.get("rope_theta") or rope.get("rope_theta") or DEFAULT_ROPE_THETA.get(model_type, 10000.0)
        act = cfg.get("hidden_activation" if model_type in GEMMA else "hidden_act") or "silu"
        if act not in ACTIVATIONS:
            raise KvrtError(f"unsupported activation '{act}' in {model_type}'s config; "
                            f"supported: {', '.join(ACTIVATIONS)}")
        local = local_rope_parameters(cfg)
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
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            hidden_act=act,
            partial_rotary_factor=float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1),
            layer_types=tuple(layer_types(cfg)),
            windows=tuple(layer_windows(cfg)),
            local_rope_theta=None if local is None else float(local["rope_theta"]),
            local_rope_scaling=None if local is None or local["rope_type"] == "default" else local,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if model_type in GEMMA else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if model_type in GEMMA else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if model_type in GEMMA else None,
        )

    @classmethod
    def from_folder(cls, folder: Path) -> "ModelArgs":
        try:
            return cls.from_config(read_config(folder))
        except (KeyError, TypeError) as exc:
            raise KvrtError(f"{folder}/config.json is not a usable model config ({type(exc).__name__}: {exc})") from None


def decoder_config(cfg: dict) -> dict:
    """The config of the text decoder, with transformers' class defaults for fields it leaves out.

    Gemma 3's multimodal `gemma3` configs nest the decoder's in `text_config` (often sparse: the
    rest are Gemma3TextConfig's defaults); kvrt runs that decoder on text alone."""
    if cfg.get("model_type") == "gemma3":
        text = cfg.get("text_config") or {}
        cfg = {**text, "model_type": "gemma3_text"}
    return {**CONFIG_DEFAULTS.get(cfg.get("model_type"), {}), **cfg}


def layer_types(cfg: dict) -> list[str]:
    """Per decoder layer, "sliding_attention" or "full_attention", as transformers decides it:
    `layer_types` where the model class reads it (Gemma, Qwen2/3), else Gemma 3's pattern (every
    `sliding_window_pattern`-th layer global), Gemma 2's alternation (layer 0 local), Qwen2/3's
    `use_sliding_window` from layer `max_window_layers` on, and Mistral's / Phi-3's `sliding_window`
    on every layer."""
    cfg = decoder_config(cfg)
    kind, n = cfg.get("model_type"), int(cfg.get("num_hidden_layers") or 0)
    given = cfg.get("layer_types")
    if given and kind in ("gemma2", "gemma3_text", "qwen2", "qwen3"):
        return list(given)
    if kind == "gemma3_text":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return [LOCAL if (i + 1) % pattern else GLOBAL for i in range(n)]
    if kind == "gemma2":
        return [LOCAL if i % 2 == 0 else GLOBAL for i in range(n)]
    if kind in ("qwen2", "qwen3"):
        slides = cfg.get("use_sliding_window") and cfg.get("sliding_window")
        first = int(cfg.get("max_window_layers", 28))
        return [LOCAL if slides and i >= first else GLOBAL for i in range(n)]
    if kind in ("mistral", "phi3") and cfg.get("sliding_window"):
        return [LOCAL] * n
    return [GLOBAL] * n


def layer_windows(cfg: dict) -> list[int | None]:
    """Per decoder layer, the sliding window W of a local layer (None for a global one): a query at
    position q attends key positions k with q - W < k <= q, as transformers' sliding mask."""
    cfg = decoder_config(cfg)
    window = cfg.get("sliding_window")
    if cfg.get("model_type") in ("qwen2", "qwen3") and not cfg.get("use_sliding_window"):
        window = None  # Qwen2/3 configs carry a window they do not use unless told
    return [int(window) if window and kind == LOCAL else None for kind in layer_types(cfg)]


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


def _nested_rope(rope: dict) -> bool:
    """transformers >= 5 writes per-layer-type rope settings as {"full_attention": {...}, ...}."""
    return bool(rope) and all(k in (LOCAL, GLOBAL) and isinstance(v, dict | None) for k, v in rope.items())


def rope_parameters(cfg: dict) -> dict:
    """The config's (global layers') rope settings as one dict with `rope_type` set ({} when it has none).

    transformers >= 5 writes them as `rope_parameters` (keyed by layer type for Gemma 3: this takes
    "full_attention"), older configs as `rope_scaling` (with `type` in the oldest). Like transformers'
    `standardize_rope_params`, llama3, yarn and longrope take `original_max_position_embeddings` from
    the top level of the config when it is there (Phi-3 style), else from the rope dict, else
    `max_position_embeddings`. Phi-3's old "su" and "yarn" names mean longrope."""
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if _nested_rope(rope):
        rope = rope.get(GLOBAL) or {}
    rope = dict(rope)
    if not rope:
        return rope
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if cfg.get("model_type") == "phi3" and rope["rope_type"] in ("su", "yarn"):
        rope["rope_type"] = "longrope"
    if rope["rope_type"] in ("llama3", "yarn", "longrope"):
        if cfg.get("original_max_position_embeddings"):
            rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        rope.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 4096))
    return rope


def local_rope_parameters(cfg: dict) -> dict | None:
    """Gemma 3's sliding layers' own rope ({rope_type, rope_theta, ...}); None where every layer
    shares the global one. Old configs give only its base, `rope_local_base_freq` (no scaling)."""
    if cfg.get("model_type") != "gemma3_text":
        return None
    nested = cfg.get("rope_parameters") or {}
    if _nested_rope(nested) and nested.get(LOCAL):
        local = dict(nested[LOCAL])
        local["rope_type"] = local.get("rope_type", local.get("type", "default"))
        local.setdefault("rope_theta", cfg.get("rope_local_base_freq") or 10000.0)
        return local
    return {"rope_type": "default", "rope_theta": cfg.get("rope_local_base_freq") or 10000.0}


def context_length(cfg: dict) -> int:
    """Tokens kvrt lets a sequence reach.

    The model's positions (`max_position_embeddings`), except that yarn and dynamic rope scaling
    extend them to `original_max_position_embeddings` x `factor` where that is larger (Qwen2.5's
    YaRN configs keep max_position_embeddings at the pretraining 32768 and say factor 4;
    dynamic NTK has no original length, so it is max_position_embeddings x factor). A sliding
    window does not shorten it: local layers attend only their window (the cache applies
    `layer_windows`), as transformers does, so the whole context stays usable."""
    cfg = decoder_config(cfg)
    length = int(cfg.get("max_position_embeddings") or cfg.get("max_sequence_length") or 4096)
    rope = rope_parameters(cfg)
    if rope.get("rope_type") in ("yarn", "dynamic") and rope.get("factor"):
        original = rope.get("original_max_position_embeddings") or length
        length = max(length, int(original * float(rope["factor"])))
    return length
