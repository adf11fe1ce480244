"""The torch backend: load an HF-format folder into kvrt's decoder and run it over a kvrt cache."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from kvrt.backends.torch.model import Transformer
from kvrt.backends.torch.ops import TorchOps
from kvrt.cache.kvcache import KVCache
from kvrt.errors import KvrtError
from kvrt.models.runtime import check_token_ids, peak_rss_bytes
from kvrt.models.config import ModelArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards its index names, or every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise KvrtError(f"{folder} has no *.safetensors weights")
    return files


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state = {}
    for path in weight_files(folder):
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise KvrtError(f"cannot read {path}: {str(exc).splitlines()[0]} (truncated or corrupt?)") from None
    return state


# Gemma 3's multimodal checkpoints: where their text decoder's weights sit (transformers >= 5, older)
DECODER_PREFIXES = {"model.language_model.": "model.", "language_model.model.": "model.",
                    "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def decoder_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text decoder's weights under kvrt's names: a multimodal checkpoint's language model
    renamed, its vision tower and projector left out; any other checkpoint unchanged."""
    if not any(k.startswith(tuple(DECODER_PREFIXES)) for k in state):
        return state
    out = {}
    for key, value in state.items():
        if key.startswith(VISION_PREFIXES):
            continue
        prefix = next((p for p in DECODER_PREFIXES if key.startswith(p)), "")
        out[DECODER_PREFIXES[prefix] + key[len(prefix):] if prefix else key] = value
    return out


def column_major_linears(model: torch.nn.Module) -> None:
    """Store each linear weight [out, in] column-major: same values and shape, but CPU GEMV
    (one token per decode step) reads it about 1.6x faster while GEMM (prefill) is unchanged."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data.t().contiguous().t()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class TorchRuntime:
    """A loaded model on torch: `forward` runs token ids through the decoder and the cache."""

    backend = "torch"

    def __init__(self, folder: Path, dtype: str | None = None, device: str | None = None):
        self.folder = Path(folder)
        self.device = torch.device(device or default_device())
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        self.dtype = DTYPES[dtype]
        self.args = ModelArgs.from_folder(self.folder)
        self.ops = self._ops(self.args)
        self.lock = threading.Lock()  # one forward at a time: callers on several threads share the model
        self.model = self._build()

    @classmethod
    def with_random_weights(cls, args: ModelArgs, dtype: str = "bfloat16", device: str | None = None,
                            seed: int = 0) -> "TorchRuntime":
        """A model of `args`' shape with random weights (torch's default init): speed benches of
        shapes whose checkpoints this machine cannot download (Llama-3-8B on a GPU)."""
        runtime = cls.__new__(cls)
        runtime.folder, runtime.args, runtime.ops, runtime.lock = None, args, cls._ops(args), threading.Lock()
        runtime.device, runtime.dtype = torch.device(device or default_device()), DTYPES[dtype]
        torch.manual_seed(seed)
        with torch.device(runtime.device):
            model = Transformer(args).to(runtime.dtype)
        # from_numpy ignores the device context, and .to(dtype) cast the tables: float32 on the device
        model.place_rope(runtime.device)
        model.tie_weights()
        runtime.model = model.eval()
        return runtime

    @staticmethod
    def _ops(args: ModelArgs) -> TorchOps:
        ops = TorchOps()
        # Gemma 2 soft-caps attention scores inside every partial attention: c·tanh(s / c)
        ops.softcap = args.attn_logit_softcapping
        return ops

    def _build(self) -> Transformer:
        state = decoder_weights(load_state_dict(self.folder))
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.args.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        with torch.device("meta"):
            model = Transformer(self.args)
        expected = {k for k in model.state_dict() if not (self.args.tie_word_embeddings and k == "lm_head.weight")}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise KvrtError(f"weights in {self.folder} do not fit a {self.args.model_type} decoder: {detail}")
        state = {k: v.to(device=self.device, dtype=self.dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        state.clear()  # the model owns the tensors now; re-laying them out below frees each old copy
        # buffers built on the meta device hold no data: compute the rope tables for real
        model.place_rope(self.device)
        model.tie_weights()
        if self.device.type == "cpu":
            column_major_linears(model)
        return model.eval()

    @property
    def windows(self) -> list[int | None]:
        """Per layer, the sliding window of a local layer (None: global), from the config."""
        return list(self.args.windows) or [None] * self.args.num_layers

    def new_cache(self, spec="full") -> KVCache:
        return KVCache(self.ops, self.args.num_layers, spec, windows=self.windows)

    @torch.inference_mode()
    def forward(self, ids: list[int], cache: KVCache, all_logits: bool = False,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Feed token ids after what the cache holds; logits [T, V] (all_logits) or [1, V].
        `progress(layers done, layers)` follows a multi-token chunk through the model."""
        check_token_ids(ids, self.args.vocab_size)
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        layer_done = None
        if progress is not None:
            def layer_done(i: int) -> None:
                self.synchronize()  # on CUDA the layer is only queued until then
                progress(i + 1, self.args.num_layers)
        with self.lock:
            return self.model(tokens, cache, all_logits=all_logits, layer_done=layer_done)[0]

    @torch.inference_mode()
    def decode(self, tokens: list[int], cache: KVCache) -> torch.Tensor:
        """One decode step of a batch: token b goes after what row b of the cache holds, each row
        at its own position; logits [B, V]."""
        check_token_ids(tokens, self.args.vocab_size)
        if len(tokens) != cache.rows:
            raise KvrtError(f"{len(tokens)} tokens for a cache of {cache.rows} rows")
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        with self.lock:
            return self.model(ids, cache)[:, -1]

    def kv_shape(self) -> tuple[int, int, int, int]:
        """(layers, KV heads, head dim, bytes per element) of what the cache stores."""
        a = self.args
        return a.num_layers, a.num_kv_heads, a.head_dim, torch.empty((), dtype=self.dtype).element_size()

    @property
    def query_heads(self) -> int:
        return self.args.num_heads

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def peak_memory_bytes(self) -> int:
        """Peak device memory on CUDA; the process's peak resident memory on CPU."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()
