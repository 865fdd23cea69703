"""Model architecture configuration, read from a Hugging Face ``config.json``.

One decoder covers every registered family (:mod:`dcd_jax.models.families`: Llama 3, Qwen2/2.5,
Qwen3, Gemma 3 text); they differ only in the switches below (q/k/v biases, q/k RMSNorm, tied
embeddings, RoPE scaling, head_dim, the MLP activation, the norm's ``1 + w`` scale, norms after
attention and the MLP, the embedding scale, the attention scale, sliding-window layers). Each
family's module translates its HF config into these switches (:func:`ModelConfig.from_hf_config`
reads the registry) and refuses what the decoder does not implement with a clear error rather
than computing it wrong.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal, Mapping

import dcd_jax.models.families  # noqa: F401  (registers every family)
from dcd_jax.errors import CheckpointError
from dcd_jax.models.registry import FAMILIES, RopeConfig, UnsupportedModelError, family_of

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer (any registered family)."""

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
    # Switches the Gemma 3 family sets (the defaults are the Llama layout).
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"  # the gate's activation (GeGLU: gelu_tanh)
    norm_plus_one: bool = False  # RMSNorm scales by (1 + w), its weight stored around 0
    sandwich_norms: bool = False  # RMSNorm of the attention and MLP outputs before each residual add
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), the scale cast to param_dtype
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim)
    # Sliding-window (local) layers: local_layers[i] says whether layer i is local (empty: none);
    # a local layer's query at slot t sees keys at slots s with t - s < sliding_window. rope_local:
    # the local layers' RoPE (None: the global one).
    sliding_window: int | None = None
    local_layers: tuple[bool, ...] = ()
    rope_local: RopeConfig | None = None
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
        if self.local_layers:
            if len(self.local_layers) != self.num_layers:
                raise UnsupportedModelError(f"local_layers has {len(self.local_layers)} entries for {self.num_layers} layers")
            if any(self.local_layers) and not (self.sliding_window and self.sliding_window > 0):
                raise UnsupportedModelError(f"local layers need a positive sliding_window, got {self.sliding_window!r}")

    @property
    def attention_scale(self) -> float:
        """The factor of q . k in the softmax: query_pre_attn_scalar ** -0.5, else head_dim ** -0.5."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def has_local_layers(self) -> bool:
        return any(self.local_layers)

    def layer_is_local(self, i: int) -> bool:
        return bool(self.local_layers) and bool(self.local_layers[i])

    def layer_rope(self, i: int) -> RopeConfig:
        return self.rope_local if self.layer_is_local(i) and self.rope_local is not None else self.rope

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
        layer = attn + 3 * d * f + (4 if self.sandwich_norms else 2) * d
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
        family = family_of(hf.get("model_type"), source)
        return cls(model_type=family.model_type, **family.translate(hf, source), **runtime)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path, **runtime: Any) -> "ModelConfig":
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json (not a model directory)")
        return cls.from_hf_config(json.loads(cfg_path.read_text()), source=str(cfg_path), **runtime)
