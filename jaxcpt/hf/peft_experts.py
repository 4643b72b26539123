"""The experts' LoRA adapters (``jaxcpt.model.expert_lora``) in peft's layout for transformers 5's fused experts.

transformers 5 holds an MoE layer's experts as two 3-D parameters of ``model.layers.{i}.mlp.experts``:
``gate_up_proj`` [X, 2Fe, E] (gate rows, then up rows; gpt-oss: [X, E, 2Fe], gate and up interleaved along
the last axis, ``is_transposed``) and ``down_proj`` [X, E, Fe] (gpt-oss [X, Fe, E]). peft 0.21 adapts such
parameters with ``LoraConfig.target_parameters`` (``lora.ParamWrapper``): per expert e, a rank-r pair whose
delta is added to the parameter before the experts' forward (and by ``merge_and_unload``), stored as

    lora_A.weight [r * X, in]    rows expert-major:  row e * r + j is A_e[j]          (A_e [r, in])
    lora_B.weight [out, r * X]   columns rank-major: column j * X + e is B_e[:, j]     (B_e [out, r])

(``ParamWrapper.get_delta_factors``: A reshaped (X, r, in), B reshaped (out, r, X)), with ``in``/``out`` the
expert's input and output widths whichever way the parameter is stored. jaxcpt's A [X, in, r] and
B [X, r, out] are the transposes of A_e and B_e, so the export is a transpose and a reshape per layer.

Two parameters of one module are two nested wrappers: peft wraps them in the module's parameter order
(gate_up_proj first), so with both targeted gate_up's adapter is saved under ``mlp.experts.base_layer.``
and down's under ``mlp.experts.``; with one, under ``mlp.experts.``.
"""

from __future__ import annotations

import numpy as np

from jaxcpt.model import expert_lora

EXPERTS_MODULE = "model.layers.{i}.mlp.experts"
HF_PARAMETER = {"expert_gate_up": "gate_up_proj", "expert_down": "down_proj"}
# families whose gate_up_proj interleaves gate and up columns (gate at even, up at odd positions)
INTERLEAVED = ("gpt_oss",)
# the router module as transformers 5 names it (peft's modules_to_save), per family
ROUTER_MODULE = {"qwen3_moe": "mlp.gate", "mixtral": "mlp.gate", "olmoe": "mlp.gate", "gpt_oss": "mlp.router"}


def target_parameters(cfg) -> list[str]:
    """adapter_config.json's ``target_parameters`` for the model's expert targets."""
    return [f"mlp.experts.{HF_PARAMETER[t]}" for t in expert_lora.TARGETS if t in cfg.lora.targets]


def _module(cfg, target: str, layer: int) -> str:
    nested = all(t in cfg.lora.targets for t in expert_lora.TARGETS) and target == "expert_gate_up"
    return EXPERTS_MODULE.format(i=layer) + (".base_layer" if nested else "")


def layer_tensors(cfg, target: str, layer: int, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """{name without peft's base_model.model. prefix: tensor} of one layer's expert adapter ``target``:
    a [X, in, r], b [X, r, out] (expert_down) or [X, r, 2, Fe] (expert_gate_up)."""
    experts, _, rank = a.shape
    if b.ndim == 4:  # gate and up: [X, r, 2, Fe] -> the fused tensor's output order
        b = np.swapaxes(b, -1, -2) if cfg.family in INTERLEAVED else b  # [X, r, Fe, 2]: column 2f gate, 2f+1 up
        b = b.reshape(experts, rank, -1)  # [X, r, 2Fe]
    lora_a = np.transpose(a, (0, 2, 1)).reshape(experts * rank, -1)  # [X * r, in], expert-major rows
    lora_b = np.transpose(b, (2, 1, 0)).reshape(b.shape[-1], rank * experts)  # [out, r * X], rank-major columns
    module = _module(cfg, target, layer)
    return {f"{module}.lora_A.weight": np.ascontiguousarray(lora_a),
            f"{module}.lora_B.weight": np.ascontiguousarray(lora_b)}
