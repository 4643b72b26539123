"""The shape and numerics of a decoder-only transformer, with the block options families declare.

One config covers Llama 2/3.x, Mistral, Qwen2/2.5/3, Gemma 2/3, OLMo 3 and SmolLM3: the shared decoder in
``transformer.py`` reads the options below (norm form, extra norms, activation, q/k norms,
soft-capping, the per-layer attention pattern ...), and each family module in
``jaxcpt.hf.families`` declares which ones its checkpoints set.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxcpt.config import ConfigError, field
from jaxcpt.model import expert_lora
from jaxcpt.model.lora import LoraConfig
from jaxcpt.model.mla import MlaConfig
from jaxcpt.model.moe import MoeConfig

LayerType = Literal["full_attention", "sliding_attention", "linear_attention"]  # the words transformers' layer_types uses
LINEAR = "linear_attention"
MAX_PATTERN = 8  # layers unrolled inside one scan step of a hybrid model (jaxcpt.model.hybrid)


@dataclasses.dataclass(frozen=True)
class LinearAttentionConfig:
    """The Gated DeltaNet layers of a hybrid model (``layer_types`` entries ``linear_attention``; Qwen3.5)."""

    num_key_heads: int = field(16, help="query/key heads of the linear-attention layers")
    num_value_heads: int = field(32, help="value heads (a multiple of num_key_heads; each key head serves a group)")
    key_head_dim: int = field(128, help="width of each query/key head")
    value_head_dim: int = field(128, help="width of each value head")
    conv_kernel: int = field(4, help="width of the short causal convolution on q, k and v")
    chunk_size: int = field(64, help="tokens per chunk of the chunked delta rule in training (the result does not "
                            "depend on it; memory grows with it, the sequential scan shrinks)")

    @property
    def conv_channels(self) -> int:
        return 2 * self.num_key_heads * self.key_head_dim + self.num_value_heads * self.value_head_dim

    def matmul_params(self, hidden: int) -> int:
        """Matmul weights of one layer's mixer: the q/k/v, z, b, a and output projections (not the conv kernel)."""
        hv, dv = self.num_value_heads, self.value_head_dim
        return hidden * self.conv_channels + 2 * hidden * hv * dv + 2 * hidden * hv

    def mixer_flops_per_token(self, chunk_size: int | None = None) -> float:
        """Forward FLOPs per token of the chunked gated delta rule (the counterpart of attention's scores and
        values): per value head, q.k over the C keys of its chunk and their values (2C(dk + dv)), and the
        recurrent state's read and update (2 x 2 dk dv), the chunk's triangular solve left out (C^2 / 3 per
        token, small beside them)."""
        dk, dv, c = self.key_head_dim, self.value_head_dim, chunk_size or self.chunk_size
        return 2 * self.num_value_heads * (c * (dk + dv) + 2 * dk * dv)

    def num_params(self, hidden: int) -> int:
        """Parameters of one layer's linear-attention mixer."""
        hv, dv = self.num_value_heads, self.value_head_dim
        c = self.conv_channels
        return hidden * c + self.conv_kernel * c + 2 * hidden * hv * dv + 2 * hidden * hv + 2 * hv + dv


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, as in HF ``rope_parameters`` (``rope_type`` != 'default')."""

    type: Literal["linear", "llama3", "yarn", "dynamic", "longrope"] = field(
        "llama3", help="'linear' (position interpolation), 'llama3' (Llama 3.1+), 'yarn', 'dynamic' (NTK, grows with "
        "a document beyond max_position_embeddings) or 'longrope' (short/long factors)")
    factor: float = field(8.0, help="scaling factor")
    low_freq_factor: float = field(1.0, help="llama3 only")
    high_freq_factor: float = field(4.0, help="llama3 only")
    original_max_position_embeddings: int = field(
        8192, help="llama3, yarn, longrope: context length of the original pretraining")
    attention_factor: float | None = field(
        None, help="yarn, longrope: scale of cos/sin (so of q and k); null: derived from factor as transformers does")
    beta_fast: float = field(32.0, help="yarn only: extrapolation boundary of the ramp")
    beta_slow: float = field(1.0, help="yarn only: interpolation boundary of the ramp")
    mscale: float | None = field(None, help="yarn only: with mscale_all_dim, derives attention_factor")
    mscale_all_dim: float | None = field(None, help="yarn only")
    truncate: bool = field(True, help="yarn only: round the correction range to whole dimensions")
    short_factor: tuple[float, ...] | None = field(None, help="longrope only: head_dim/2 factors for documents within "
                                                   "original_max_position_embeddings")
    long_factor: tuple[float, ...] | None = field(None, help="longrope only: head_dim/2 factors for longer documents")


@dataclasses.dataclass(frozen=True)
class RopeChange:
    """A RoPE change applied to the starting model (context extension; jaxcpt/model/rope_change.py)."""

    theta: float | None = field(None, help="new rope_theta; null: keep the starting model's")
    scaling: RopeScaling | None = field(
        None, help="new RoPE scaling (linear, llama3, yarn with a new factor and original length); null: keep the "
        "starting model's")
    max_position_embeddings: int | None = field(
        None, help="new max_position_embeddings (written on export); null: the starting model's, raised to "
        "factor x original_max_position_embeddings when scaling is set")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Literal["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo3", "smollm3", "qwen3_moe",
                    "mixtral", "qwen3_5_text", "olmoe", "gpt_oss", "gemma4_text", "deepseek_v3"] = field(
        "llama", help="HF family written on export (model_type/architectures); its block options must match")
    vocab_size: int = field(32000, help="vocabulary size (real rows of the embedding)")
    vocab_pad_multiple: int = field(
        128, help="embedding and output projection are stored with their rows padded to a multiple of this, so a "
        "tensor axis can split them; padded rows stay zero and their logits are masked; 1 = no padding")
    hidden_size: int = field(512, help="model width")
    intermediate_size: int = field(1536, help="gated MLP hidden width")
    num_layers: int = field(8, help="decoder blocks")
    num_heads: int = field(8, help="query heads")
    num_kv_heads: int = field(8, help="key/value heads (< num_heads: grouped-query attention)")
    head_dim: int | None = field(None, help="per-head width; default hidden_size // num_heads")
    rope_theta: float = field(10000.0, help="RoPE base (of full-attention layers, when rope_local_theta is set)")
    rope_scaling: RopeScaling | None = field(None, help="RoPE scaling of full-attention layers; null for none")
    rope_local_theta: float | None = field(
        None, help="RoPE base of sliding-window layers, unscaled (Gemma 3's local base); null: the same RoPE as "
        "full-attention layers")
    max_position_embeddings: int = field(4096, help="longest context the model is meant for (dynamic RoPE scales "
                                         "beyond it; written on export)")
    rms_norm_eps: float = field(1e-5, help="RMSNorm epsilon")
    norm_plus_one: bool = field(False, help="RMSNorm scales by (1 + weight), in float32 (Gemma); weights start at 0")
    pre_norms: bool = field(True, help="RMSNorm the input of attention and of the MLP (pre-norm); false with "
                            "post_norms: only the outputs are normed (OLMo 2/3's post-norm placement)")
    post_norms: bool = field(False, help="also RMSNorm the attention and MLP outputs before each residual add (Gemma)")
    qk_norm: bool = field(False, help="RMSNorm on queries and keys before RoPE (Qwen3, Gemma 3, OLMo 3)")
    qk_norm_scope: Literal["head", "projection"] = field(
        "head", help="what qk_norm normalises: head (each head's D channels, one [D] scale shared by all heads; Qwen3, "
        "Gemma 3) or projection (all heads' H*D channels at once, an [H, D] scale; OLMo 2/3)")
    rope_layers: tuple[bool, ...] | None = field(
        None, help="per layer, whether it rotates q and k by RoPE (false: no position encoding, NoPE; SmolLM3's "
        "no_rope_layers); null: every layer does")
    activation: Literal["silu", "gelu_tanh"] = field(
        "silu", help="gated MLP activation: silu (SwiGLU) or gelu_tanh (GeGLU, tanh approximation; Gemma)")
    scale_embeddings: bool = field(False, help="multiply input embeddings by sqrt(hidden_size) in the compute dtype "
                                   "(Gemma)")
    query_pre_attn_scalar: float | None = field(
        None, help="attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma); null: head_dim**-0.5")
    attn_logit_softcap: float | None = field(
        None, help="attention scores become cap * tanh(scores / cap) before masking (Gemma 2); null: none")
    final_logit_softcap: float | None = field(
        None, help="output logits become cap * tanh(logits / cap) (Gemma 2); null: none")
    tie_word_embeddings: bool = field(False, help="output projection shares the input embedding (Llama 3.2 1B/3B, "
                                      "small Qwen, Gemma)")
    qkv_bias: bool = field(False, help="bias on q/k/v projections (Qwen2)")
    o_bias: bool = field(False, help="bias on the attention output projection (Llama attention_bias=True)")
    mlp_bias: bool = field(False, help="bias on MLP projections (Llama mlp_bias=True)")
    sliding_window: int | None = field(None, help="sliding-window layers attend only to the last N positions; "
                                       "null for full causal")
    layer_types: tuple[LayerType, ...] | None = field(
        None, help="attention of each layer, full_attention or sliding_attention (Gemma 2/3, Qwen with "
        "use_sliding_window); null: every layer slides when sliding_window is set (Mistral)")
    attention_sinks: bool = field(
        False, help="a learned logit per query head joins every attention softmax's denominator, so a query may "
        "attend to nothing (gpt-oss's sinks; layers.sinks [L, H]). Attention kernels: reference and xla (auto picks "
        "them); cudnn, splash and context parallelism refuse it")
    attn_output_gate: bool = field(
        False, help="full-attention output times sigmoid of a per-head gate that q_proj also produces (Qwen3.5); the q "
        "projection then holds 2 * num_heads heads, query and gate interleaved as in the checkpoint")
    partial_rotary_factor: float = field(1.0, help="RoPE rotates only this fraction of each head's dims, the first "
                                         "ones (Qwen3.5: 0.25); the rest pass through")
    linear_attention: LinearAttentionConfig | None = field(
        None, help="the Gated DeltaNet layers of layer_types' linear_attention entries (Qwen3.5); null: none")
    # Gemma 4's options; layers whose shapes differ stack apart and scan in groups (jaxcpt/model/layer_groups.py)
    global_head_dim: int | None = field(
        None, help="head_dim of the full-attention layers when it differs from head_dim (Gemma 4's global_head_dim); "
        "their weights then stack apart from the sliding layers'; null: head_dim")
    global_kv_heads: int | None = field(
        None, help="KV heads of the full-attention layers (Gemma 4's num_global_key_value_heads); null: num_kv_heads")
    attention_k_eq_v: bool = field(
        False, help="full-attention layers have no v projection: their values are the key projection, before k's "
        "norm and RoPE (Gemma 4's attention_k_eq_v)")
    value_norm: bool = field(False, help="RMSNorm without a scale on every head's values (Gemma 4's v_norm)")
    rope_proportion: float = field(
        1.0, help="full-attention layers rotate only the lowest rope_proportion of their head_dim/2 frequency pairs "
        "over the whole head; the other pairs get frequency 0 and pass through (Gemma 4's 'proportional' RoPE, its "
        "partial_rotary_factor); 1: all")
    kv_shared_layers: int = field(
        0, help="the last N layers have no k/v projections and attend to the keys and values of the last earlier "
        "layer of their kind (Gemma 4's num_kv_shared_layers); 0: none")
    double_wide_mlp: bool = field(False, help="the kv-shared layers' MLP is 2 * intermediate_size wide (Gemma 4)")
    per_layer_input: int | None = field(
        None, help="width P of the per-layer input embeddings (Gemma 4's hidden_size_per_layer_input): a second "
        "[vocab, num_layers * P] table plus a projection of the main embedding give each layer a [P] input, gated "
        "into its output; null: none")
    per_layer_vocab_size: int | None = field(
        None, help="rows of the per-layer input table (Gemma 4's vocab_size_per_layer_input); null: vocab_size")
    layer_scalar: bool = field(False, help="each layer's output is multiplied by a per-layer scalar (Gemma 4)")
    initializer_range: float = field(0.02, help="std of the normal init for a model trained from scratch")
    bos_token_id: int | None = field(1, help="written to config.json / generation_config.json on export")
    eos_token_id: int | list[int] | None = field(
        2, help="written to config.json / generation_config.json on export (a list for models with several stop tokens)")
    pad_token_id: int | None = field(None, help="written to config.json on export")
    dtype: Literal["float32", "bfloat16", "float16"] = field("float32", help="compute dtype of matmuls (bfloat16 on accelerators); parameters stay param_dtype")
    param_dtype: Literal["float32", "bfloat16"] = field(
        "float32", help="dtype parameters are stored in. Parameters that train must be float32 (Adam's updates round "
        "away in bfloat16); bfloat16 halves the memory of frozen ones, e.g. a LoRA run's base (adapters are always "
        "float32)")
    remat: Literal["none", "minimal", "save_dot_except_mlp", "save_attention", "full", "offload"] = field(
        "none", help="activation rematerialisation per layer, named for what it keeps for the backward pass "
        "(jaxcpt/model/remat.py; memory and recomputation of each: docs/accelerators.md): none (everything), minimal "
        "(every projection output), save_dot_except_mlp (q, k, v, attention output and o; recompute the MLP), "
        "save_attention (q, k, v and attention output; recompute o and the MLP), full (only the layer input; "
        "recompute the layer), offload (save_dot_except_mlp's activations in pinned host memory; TPU)"
    )
    attention: Literal["auto", "reference", "xla", "cudnn", "splash"] = field(
        "auto",
        help="attention kernel: reference (einsum, the oracle), xla (jax.nn.dot_product_attention), cudnn (flash, GPU), "
        "splash (Pallas, TPU), auto (splash on TPU; on GPU cudnn in bf16/fp16 without soft-capping, else xla; reference on CPU)",
    )
    linear_chunk_size: int | None = field(
        None, help="tokens per chunk of the Gated DeltaNet layers' chunked delta rule in this run's training "
        "(Qwen3.5); memory grows with it, the result does not depend on it. Settable on any start, an HF "
        "directory's included; null: the model's linear_attention.chunk_size")
    cudnn_documents_per_row: int = field(
        64, help="document slots of cuDNN's packed attention layout (model.attention=cudnn or auto on GPU). jax "
        "sizes cuDNN's softmax statistics by them, float32 [batch x slots, heads, seq_len] per layer, so one slot per "
        "token (slots = seq_len) did not fit an H200 at 4096 tokens. A batch with a row of more documents is not "
        "truncated: that step takes cuDNN's masked form (a [B, 1, T, T] bias), the same result, slower")
    rope: RopeChange | None = field(
        None, help="RoPE change for context extension, applied to whatever model the run starts from (an HF "
        "directory, a checkpoint); every export's config.json carries it. null: keep the model's RoPE")
    lora: LoraConfig | None = field(
        None, help="LoRA adapters on the projections (jaxcpt/model/lora.py); null = none. Allowed with any init.source: "
        "the adapters are added to the starting model, and by default only they train. Exports: export.lora")

    moe: MoeConfig | None = field(
        None, help="mixture-of-experts MLPs on every layer instead of the dense MLP (jaxcpt/model/moe.py; families "
        "qwen3_moe, mixtral, olmoe, gpt_oss); null = dense")
    mla: MlaConfig | None = field(
        None, help="multi-head latent attention instead of q/k/v projections, and the DeepSeek-V3 block with it "
        "(jaxcpt/model/mla.py; family deepseek_v3); null = the shared decoder's attention")

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        """Rows the embedding and output projection really have (vocab_size rounded up to vocab_pad_multiple)."""
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    @property
    def attention_scale(self) -> float:
        if self.mla is not None:  # MLA: the q/k head width, not head_dim (the rotated part); mscale**2 under YaRN
            from jaxcpt.model.mla import softmax_scale

            return softmax_scale(self.mla, self.rope_scaling)
        return (self.query_pre_attn_scalar or self.head_size) ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    def kind_head_dim(self, kind: str) -> int:
        """head_dim of the layers of ``kind`` (full-attention layers may have their own, Gemma 4)."""
        return self.global_head_dim if kind == "full_attention" and self.global_head_dim else self.head_size

    def kind_kv_heads(self, kind: str) -> int:
        return self.global_kv_heads if kind == "full_attention" and self.global_kv_heads else self.num_kv_heads

    @property
    def delta_rule_chunk_size(self) -> int:
        """Tokens per chunk of the delta rule in training: the run's ``linear_chunk_size``, else the model's."""
        return self.linear_chunk_size or self.linear_attention.chunk_size

    @property
    def kv_shared(self) -> tuple[int, ...]:
        """Indices of the layers that reuse an earlier layer's keys and values (the last kv_shared_layers)."""
        return tuple(range(self.num_layers - self.kv_shared_layers, self.num_layers))

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers with (full or sliding) attention; all of them in a model without linear ones."""
        return tuple(i for i, kind in enumerate(self.layer_kinds()) if kind != LINEAR)

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """Indices of the Gated DeltaNet layers."""
        return tuple(i for i, kind in enumerate(self.layer_kinds()) if kind == LINEAR)

    def layer_pattern(self) -> tuple[LayerType, ...]:
        """The shortest run of layer kinds whose repeats make up ``layer_kinds()`` (one scan step of a hybrid)."""
        kinds = self.layer_kinds()
        for size in range(1, len(kinds) + 1):
            if len(kinds) % size == 0 and kinds == kinds[:size] * (len(kinds) // size):
                return kinds[:size]
        return kinds

    def layer_kinds(self) -> tuple[LayerType, ...]:
        """The attention of every layer, spelled out."""
        if self.layer_types is not None:
            return self.layer_types
        kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
        return (kind,) * self.num_layers

    def validate(self) -> None:
        if self.lora is not None:
            self.lora.validate()
        if self.moe is not None:
            self.moe.validate()
            if self.lora is not None:  # dense MLP targets on an MoE model, with the fix (jaxcpt.model.expert_lora)
                expert_lora.check_targets(self)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads}); set head_dim")
        if self.head_size % 2:
            raise ConfigError(f"head_dim ({self.head_size}) must be even for RoPE")
        if self.linear_chunk_size is not None and self.linear_chunk_size < 1:
            raise ConfigError(f"linear_chunk_size must be >= 1 or null, got {self.linear_chunk_size}")
        if self.cudnn_documents_per_row < 1:
            raise ConfigError(f"cudnn_documents_per_row must be >= 1, got {self.cudnn_documents_per_row}")
        if self.vocab_pad_multiple < 1:
            raise ConfigError(f"vocab_pad_multiple must be >= 1 (1 = no padding), got {self.vocab_pad_multiple}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types lists {len(self.layer_types)} layers, but num_layers is {self.num_layers}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is null; set it")
            self._validate_linear()
        elif self.linear_attention is not None:
            raise ConfigError("linear_attention is set but layer_types lists no linear_attention layer; list them "
                              "or set linear_attention to null")
        if self.rope_layers is not None and len(self.rope_layers) != self.num_layers:
            raise ConfigError(f"rope_layers lists {len(self.rope_layers)} layers, but num_layers is {self.num_layers}")
        if self.attention_sinks and self.linear_layers:
            raise ConfigError("attention_sinks is not supported in a model with linear_attention layers (no family "
                              "has both); set one of them off")
        if self.qk_norm_scope != "head" and not self.qk_norm:
            raise ConfigError(f"qk_norm_scope={self.qk_norm_scope!r} needs qk_norm: true")
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ConfigError(f"partial_rotary_factor ({self.partial_rotary_factor}) must be in (0, 1] and leave an "
                              f"even number of rotated dims (head_dim {self.head_size})")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be > 0 or null, got {value}")
        from jaxcpt.model import layer_groups  # imports this module

        layer_groups.validate(self)
        from jaxcpt.model import mla

        mla.validate(self)
        s = self.rope_scaling
        if s is not None and s.type == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = getattr(s, name)
                if factors is None or len(factors) != self.head_size // 2:
                    raise ConfigError(f"rope_scaling.{name} needs head_dim/2 = {self.head_size // 2} numbers for "
                                      f"longrope, got {None if factors is None else len(factors)}")

    def _validate_linear(self) -> None:
        if not self.linear_layers:
            return
        lin = self.linear_attention
        if lin is None:
            raise ConfigError("layer_types has linear_attention layers but linear_attention is null; set its heads")
        if lin.num_value_heads % lin.num_key_heads:
            raise ConfigError(f"linear_attention.num_value_heads ({lin.num_value_heads}) must be a multiple of "
                              f"num_key_heads ({lin.num_key_heads})")
        if lin.conv_kernel < 1 or lin.chunk_size < 1:
            raise ConfigError("linear_attention.conv_kernel and chunk_size must be >= 1")
        pattern = self.layer_pattern()
        if len(pattern) > MAX_PATTERN:
            raise ConfigError(
                f"layer_types does not repeat a pattern of at most {MAX_PATTERN} layers (its shortest period is "
                f"{len(pattern)} of {self.num_layers}), so the hybrid layers cannot be scanned in groups; make "
                "layer_types a repeated pattern (Qwen3.5: 3 linear_attention then 1 full_attention, repeated; "
                "full_attention_interval in config.json) or a num_layers that is a multiple of it")

    def num_params(self) -> int:
        """Parameters as stored: the padded vocabulary rows included, the embedding counted once when tied, adapters
        included."""
        from jaxcpt.model import layer_groups

        if layer_groups.grouped(self):  # layers of several shapes: counted stack by stack
            return layer_groups.num_params(self)
        if self.mla is not None:  # DeepSeek-V3's block (jaxcpt.model.mla)
            from jaxcpt.model import mla

            return mla.num_params(self)[0]
        e, f, d = self.hidden_size, self.intermediate_size, self.head_size
        h, k = self.num_heads, self.num_kv_heads
        q_heads = 2 * h if self.attn_output_gate else h
        attn = e * d * (q_heads + 2 * k) + h * d * e + (d * (h + 2 * k) if self.qkv_bias else 0) + (e if self.o_bias else 0)
        mlp = 3 * e * f + ((2 * f + e) if self.mlp_bias else 0)
        if self.moe is not None:
            mlp = self.moe.params_per_layer(e)[0]
        qk_norms = (h + k) * d if self.qk_norm_scope == "projection" else 2 * d
        norms = (2 * e if self.pre_norms else 0) + (2 * e if self.post_norms else 0) + (qk_norms if self.qk_norm else 0)
        attn += h if self.attention_sinks else 0
        per_layer = attn + mlp + norms
        vocab = self.padded_vocab_size
        head = 0 if self.tie_word_embeddings else e * vocab
        layers = self.num_layers * per_layer
        if self.linear_layers:  # a linear layer has the MLP and two norms, its mixer instead of attention
            attention_only = attn + (2 * d if self.qk_norm else 0)
            layers -= len(self.linear_layers) * (attention_only - self.linear_attention.num_params(e))
        return vocab * e + layers + e + head + self.num_adapter_params()

    def num_active_params(self) -> int:
        """Parameters one token uses: ``num_params`` less the experts it is not routed to (equal when dense)."""
        if self.moe is None:
            return self.num_params()
        if self.mla is not None:
            from jaxcpt.model import mla

            return mla.num_params(self)[1]
        total, active = self.moe.params_per_layer(self.hidden_size)
        idle_adapters = expert_lora.num_params(self) - expert_lora.num_params(self, active=True)  # unrouted experts'
        return self.num_params() - self.num_layers * (total - active) - idle_adapters

    def describe_params(self, scale: float = 1e6, unit: str = "M", digits: int = 1) -> str:
        """'12.3M parameters', or for an MoE model '40.1M parameters total, 12.3M active per token': every
        parameter figure jaxcpt prints for an MoE model says which of the two it is."""
        if self.moe is None:
            return f"{self.num_params() / scale:.{digits}f}{unit} parameters"
        return (f"{self.num_params() / scale:.{digits}f}{unit} parameters total, "
                f"{self.num_active_params() / scale:.{digits}f}{unit} active per token")

    def num_adapter_params(self) -> int:
        """Parameters of the LoRA adapters (A and B of every target, all layers); 0 without LoRA."""
        if self.lora is None:
            return 0
        from jaxcpt.model import layer_groups

        if layer_groups.grouped(self):  # one adapter per stack of each target
            return layer_groups.num_adapter_params(self)
        e, f, d, h, k = self.hidden_size, self.intermediate_size, self.head_size, self.num_heads, self.num_kv_heads
        sizes = {"q": (e, (2 if self.attn_output_gate else 1) * h * d), "k": (e, k * d), "v": (e, k * d), "o": (h * d, e), "gate": (e, f), "up": (e, f),
                 "down": (f, e)}  # (in, out) of each projection
        layers = {t: len(self.attention_layers) if t in ("q", "k", "v", "o") else self.num_layers for t in sizes}
        if self.linear_layers:  # the Gated DeltaNet projections, on the linear layers only
            lin = self.linear_attention
            heads = lin.num_value_heads * lin.value_head_dim
            sizes |= {"lin_qkv": (e, lin.conv_channels), "lin_z": (e, heads), "lin_b": (e, lin.num_value_heads),
                      "lin_a": (e, lin.num_value_heads), "lin_out": (heads, e)}
            layers |= dict.fromkeys(("lin_qkv", "lin_z", "lin_b", "lin_a", "lin_out"), len(self.linear_layers))
        dense = [t for t in self.lora.targets if t not in expert_lora.TARGETS]  # the experts' are counted apart
        return self.lora.rank * sum(layers[t] * sum(sizes[t]) for t in dense) + expert_lora.num_params(self)
