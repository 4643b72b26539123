"""The shape and numerics of a Llama-family decoder: one config covers Llama 2/3.x, Mistral, Qwen2/2.5."""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxcpt.config import ConfigError, field


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF ``rope_parameters`` (``rope_type`` != 'default')."""

    type: Literal["linear", "llama3"] = field("llama3", help="'llama3' (Llama 3.1+ long context) or 'linear' (position interpolation)")
    factor: float = field(8.0, help="scaling factor")
    low_freq_factor: float = field(1.0, help="llama3 only")
    high_freq_factor: float = field(4.0, help="llama3 only")
    original_max_position_embeddings: int = field(8192, help="llama3 only: context length of the original pretraining")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Literal["llama", "mistral", "qwen2"] = field("llama", help="HF family written on export (model_type/architectures)")
    vocab_size: int = field(32000, help="vocabulary size (rows of the embedding)")
    hidden_size: int = field(512, help="model width")
    intermediate_size: int = field(1536, help="SwiGLU hidden width")
    num_layers: int = field(8, help="decoder blocks")
    num_heads: int = field(8, help="query heads")
    num_kv_heads: int = field(8, help="key/value heads (< num_heads: grouped-query attention)")
    head_dim: int | None = field(None, help="per-head width; default hidden_size // num_heads")
    rope_theta: float = field(10000.0, help="RoPE base")
    rope_scaling: RopeScaling | None = field(None, help="RoPE scaling (llama3 / linear); null for none")
    max_position_embeddings: int = field(4096, help="longest context the model is meant for (written on export)")
    rms_norm_eps: float = field(1e-5, help="RMSNorm epsilon")
    tie_word_embeddings: bool = field(False, help="output projection shares the input embedding (Llama 3.2 1B/3B, small Qwen2)")
    qkv_bias: bool = field(False, help="bias on q/k/v projections (Qwen2)")
    o_bias: bool = field(False, help="bias on the attention output projection (Llama attention_bias=True)")
    mlp_bias: bool = field(False, help="bias on MLP projections (Llama mlp_bias=True)")
    sliding_window: int | None = field(None, help="attend only to the last N positions (Mistral); null for full causal")
    initializer_range: float = field(0.02, help="std of the normal init for a model trained from scratch")
    bos_token_id: int | None = field(1, help="written to config.json / generation_config.json on export")
    eos_token_id: int | list[int] | None = field(
        2, help="written to config.json / generation_config.json on export (a list for models with several stop tokens)")
    pad_token_id: int | None = field(None, help="written to config.json on export")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="compute dtype of matmuls (bfloat16 on accelerators); parameters stay param_dtype")
    param_dtype: Literal["float32", "bfloat16"] = field("float32", help="dtype parameters are stored (and trained) in")
    remat: Literal["none", "minimal", "full"] = field(
        "none", help="activation rematerialisation per layer: none, minimal (save matmul outputs), full (save only layer inputs)"
    )
    attention: Literal["auto", "reference", "xla", "cudnn", "splash"] = field(
        "auto",
        help="attention kernel: reference (einsum, the oracle), xla (jax.nn.dot_product_attention), cudnn (flash, GPU), "
        "splash (Pallas, TPU), auto (splash on TPU, cudnn on GPU in bf16/fp16, else reference)",
    )

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def validate(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim")
        if self.head_size % 2:
            raise ConfigError(f"head_dim ({self.head_size}) must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")

    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        e, f, d = self.hidden_size, self.intermediate_size, self.head_size
        h, k = self.num_heads, self.num_kv_heads
        attn = e * d * (h + 2 * k) + h * d * e + (d * (h + 2 * k) if self.qkv_bias else 0) + (e if self.o_bias else 0)
        mlp = 3 * e * f + ((2 * f + e) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * e
        head = 0 if self.tie_word_embeddings else e * self.vocab_size
        return self.vocab_size * e + self.num_layers * per_layer + e + head
