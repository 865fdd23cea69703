"""Model architecture configuration, read from a Hugging Face ``config.json``.

One decoder covers the Llama 3, Qwen2/Qwen2.5 and Qwen3 families; they differ only in the
options below (q/k/v biases, per-head q/k RMSNorm, tied embeddings, RoPE scaling, head_dim).
Anything the decoder does not implement (sliding windows, MLP biases, other activations) is
refused here with a clear error rather than silently computed wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Mapping

from dcd_jax.errors import CheckpointError, ModelError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_KERNELS = ("einsum", "xla", "cudnn", "splash")
# What users may write: a kernel, or "auto" = splash on TPU, einsum elsewhere (see resolve_attention).
ATTENTION_CHOICES = ATTENTION_KERNELS + ("auto",)


def resolve_attention(choice: str, platform: str) -> str:
    """The kernel for ``choice`` on ``platform`` ("tpu", "gpu", "cpu"): "auto" picks splash on TPU
    (long traces need attention that never materializes [T, T] scores) and einsum elsewhere."""
    if choice == "auto":
        return "splash" if platform == "tpu" else "einsum"
    return choice


class UnsupportedModelError(ModelError):
    """The checkpoint uses an architecture or option this decoder does not implement."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``theta`` base plus optional Llama-3 frequency scaling."""

    theta: float = 10000.0
    kind: Literal["default", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (Llama 3 / Qwen2 / Qwen3)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig = RopeConfig()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 when attention_bias=true
    o_bias: bool = False  # Llama/Qwen3 when attention_bias=true (Qwen2 never)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    max_position_embeddings: int = 4096
    # The tokenizer's vocabulary: Qwen checkpoints pad the embedding rows past it. None = vocab_size.
    true_vocab_size: int | None = None
    # Runtime options (not part of the checkpoint): compute/param dtypes, rematerialization, and
    # the attention kernel of full-sequence passes (training, scoring): "einsum" (our own, any
    # backend), "xla" / "cudnn" (jax.nn.dot_product_attention; "cudnn" = cuDNN flash attention on
    # NVIDIA GPUs), "splash" (Pallas splash attention on TPU; interpreted elsewhere). Cached decoding
    # always uses the einsum path.
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: Literal["none", "full", "dots_saveable"] = "none"
    attention: Literal["einsum", "xla", "cudnn", "splash"] = "einsum"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_KERNELS}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.true_vocab_size or self.vocab_size

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included once if tied)."""
        d, h, kv, hd, f = self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size
        attn = d * hd * (h + 2 * kv) + h * hd * d + (hd * (h + 2 * kv) if self.qkv_bias else 0)
        attn += d if self.o_bias else 0
        attn += 2 * hd if self.qk_norm else 0
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N for the matmuls plus attention's 12 * L * T * h * hd (causal ~ half)."""
        n = self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_word_embeddings else 1)
        attn = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim
        return 6 * n + attn

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], *, source: str = "config.json", **runtime: Any) -> "ModelConfig":
        """Translate a HF ``config.json`` mapping; ``runtime`` sets dtype/param_dtype/remat/attention."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type={model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )

        def need(key: str) -> Any:
            if key not in hf:
                raise UnsupportedModelError(f"{source}: missing required field {key!r} for model_type={model_type}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise UnsupportedModelError(f"{source}: mlp_bias=true is not supported")
        if hf.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: use_sliding_window=true is not supported")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise UnsupportedModelError(f"{source}: layer_types other than full_attention are not supported")

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // heads
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope=_rope_from_hf(hf, source),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            **runtime,
        )

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, **runtime: Any) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json (not a model directory)")
        return cls.from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path), **runtime)


def _rope_from_hf(hf: Mapping[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters`; checkpoints saved by transformers 4 use
    # `rope_theta` + `rope_scaling`. Accept both.
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind != "llama3":
        raise UnsupportedModelError(f"{source}: rope scaling type {kind!r} is not supported (default, llama3)")
    return RopeConfig(
        theta=float(theta),
        kind="llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )
