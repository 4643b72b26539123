"""LoRA on the experts of MoE models (jaxcpt/model/expert_lora.py): peft's layout, merging, training, meshes.

The oracle is peft 0.21 on transformers 5: ``PeftModel.from_pretrained(base, our adapter directory)`` must
compute our logits, with the experts' adapters as peft's ``target_parameters`` on the fused
``mlp.experts.gate_up_proj`` / ``down_proj``; its ``merge_and_unload`` and our merged export must too
(float32, < 1e-5 relative).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_logits, rel_err
from moe_models import make_moe_model

from jaxcpt.config import ConfigError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.hf.peft_export import save_peft_adapter
from jaxcpt.model import lora as lora_lib
from jaxcpt.model.lora import LoraConfig
from jaxcpt.model.persist import fresh_adapters, merged_model, model_from_params, params_of, with_adapters
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules
from jaxcpt.train.config import load_train_config

SEQ = 20
BOTH = ["expert_gate_up", "expert_down"]


def _make_base(name, directory):
    if name == "gpt_oss":
        from test_moe_families import make_model

        return make_model(name, directory)
    return make_moe_model(name, directory)


def _adapted(hf_dir, lora: LoraConfig, mesh, trained_too=(), seed=1):
    """The HF model with adapters whose A and B are both random (B = 0 would hide a wrong B layout) and the
    tensors ``trained_too`` perturbed as training would, as jax arrays in their shardings on ``mesh``."""
    rules = make_rules()
    base = load_hf(hf_dir, mesh=mesh)
    cfg = dataclasses.replace(base.config, lora=lora)
    params = with_adapters(params_of(base), fresh_adapters(cfg, mesh, rules, seed=seed))
    rng = np.random.RandomState(seed)
    layers = dict(params["layers"])
    for name in layers:
        noise = None
        if name.endswith("_lora_b"):
            noise = rng.normal(0, 0.2, layers[name].shape)
        elif f"layers.{name}" in trained_too:
            noise = np.asarray(layers[name]) + rng.normal(0, 0.05, layers[name].shape)
        if noise is not None:
            layers[name] = jax.device_put(noise.astype(np.float32), layers[name].sharding)
    return model_from_params(cfg, {**params, "layers": layers}, rules)


CASES = {
    # both fused tensors (nested ParamWrappers), an attention adapter beside them, the router trained whole
    "qwen3_moe": (LoraConfig(rank=3, alpha=5.0, targets=["q", *BOTH], train_router=True), ("layers.router",)),
    # gpt-oss: gate_up_proj [X, E, 2F] with gate and up interleaved, is_transposed; rsLoRA scale
    "gpt_oss": (LoraConfig(rank=2, alpha=3.0, rslora=True, targets=["o", *BOTH]), ()),
    # gate_up alone (one wrapper, not nested); mixtral's checkpoints name the experts w1/w3/w2
    "mixtral_window": (LoraConfig(rank=2, alpha=4.0, targets=["expert_gate_up"]), ()),
}


# qwen3_moe in the default suite; gpt-oss's interleaved layout and mixtral's single wrapper in the slow one
@pytest.mark.parametrize("name", ["qwen3_moe", pytest.param("gpt_oss", marks=pytest.mark.slow),
                                  pytest.param("mixtral_window", marks=pytest.mark.slow)])
def test_expert_adapters_loaded_by_peft_and_both_merges_compute_our_logits(name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora, trained = CASES[name]
    _make_base(name, tmp_path / "base")
    model = _adapted(tmp_path / "base", lora, build_mesh({"expert": 4, "data": 2}), trained_too=trained)
    input_ids = np.random.RandomState(0).randint(0, 256, size=(2, SEQ))
    ours = np.asarray(model(jnp.asarray(input_ids)))
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"),
                      trained=trained, dtype="float32")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"mlp.experts.{p}" for p, t in (("gate_up_proj", BOTH[0]),
                                                                           ("down_proj", BOTH[1])) if t in lora.targets]
    assert "expert_gate_up" not in config["target_modules"]

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert rel_err(hf_logits(peft_model, input_ids), ours) < 1e-5
    assert rel_err(hf_logits(peft_model.merge_and_unload(), input_ids), ours) < 1e-5
    save_hf(model, tmp_path / "merged", dtype="float32")  # folded one expert slice at a time
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert rel_err(hf_logits(merged, input_ids), ours) < 1e-5
    assert rel_err(np.asarray(merged_model(model)(jnp.asarray(input_ids))), ours) < 1e-5


def test_fresh_expert_adapters_compute_the_base_model_exactly_and_split_like_the_experts(tmp_path):
    make_moe_model("qwen3_moe", tmp_path / "base")
    mesh, rules = build_mesh({"expert": 4, "data": 2}), make_rules()
    base = load_hf(tmp_path / "base", mesh=mesh)
    cfg = dataclasses.replace(base.config, lora=LoraConfig(rank=4, targets=BOTH))
    adapters = fresh_adapters(cfg, mesh, rules, seed=0)
    model = model_from_params(cfg, with_adapters(params_of(base), adapters), rules)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, size=(2, SEQ)))
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(base(ids)))  # B = 0: exactly the base

    X, E, F = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_intermediate_size
    assert adapters["expert_gate_up_lora_a"].shape == (2, X, E, 4)
    assert adapters["expert_gate_up_lora_b"].shape == (2, X, 4, 2, F)
    assert adapters["expert_down_lora_a"].shape == (2, X, F, 4) and adapters["expert_down_lora_b"].shape == (2, X, 4, E)
    a = np.asarray(adapters["expert_down_lora_a"])  # peft's init per expert: U(-1/sqrt(in), 1/sqrt(in)), in = F
    assert np.abs(a).max() <= 1 / np.sqrt(F) and np.abs(a).max() > 0.9 / np.sqrt(F)
    assert not np.asarray(adapters["expert_gate_up_lora_b"]).any()
    for name in adapters:  # split over the expert axis like the experts they adapt
        assert adapters[name].sharding.spec[1] == "expert", name
    assert cfg.num_adapter_params() == sum(v.size for v in adapters.values())
    assert cfg.num_params() - cfg.num_active_params() == (  # experts a token skips, their adapters too
        dataclasses.replace(cfg, lora=None).num_params() - dataclasses.replace(cfg, lora=None).num_active_params()
        + sum(v.size for v in adapters.values()) // X * (X - cfg.moe.top_k))
    from jaxcpt.train.metrics import flops_per_token  # training FLOPs count the routed experts' adapters only

    idle = sum(v.size for v in adapters.values()) // X * (X - cfg.moe.top_k)
    assert flops_per_token(dataclasses.replace(cfg, lora=None), 16) + 6 * (cfg.num_adapter_params() - idle) == \
        flops_per_token(cfg, 16)


TINY_MOE = ["model.family=qwen3_moe", "model.vocab_size=128", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.qk_norm=true",
            "model.moe={num_experts: 8, top_k: 2, expert_intermediate_size: 16}", "model.dtype=float32",
            "data.seq_len=16", "train.batch_size=8", "train.loss_chunk_size=0", "data.sources=[{name: a, paths: [x]}]",
            "optim.schedule.peak_lr=1e-2", "optim.schedule.warmup_steps=1"]


def _three_steps(cfg, shape):
    """(losses, params before, params after) of three train steps of ``cfg`` on a mesh of ``shape``."""
    from jaxcpt.model.transformer import init_model
    from jaxcpt.train.setup import build_program
    from jaxcpt.train.state import fresh_state

    tokens = np.random.RandomState(0).randint(0, 128, size=(8, 17))
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16)),
            "positions": np.tile(np.arange(16), (8, 1)), "loss_mask": np.ones((8, 16)), "source": np.zeros((8,))}
    mesh, rules = build_mesh(shape), make_rules()
    program = build_program(cfg, cfg.model, mesh, rules, num_sources=1)
    params = nnx.state(init_model(cfg.model, mesh, seed=0), nnx.Param).to_pure_dict()
    before = jax.tree.map(np.asarray, params)
    state = fresh_state(params, program.tx, program.state_shardings, program.trainable.keys)
    opt_size = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    batch = {k: jax.device_put(np.asarray(v, np.float32 if k == "loss_mask" else np.int32),
                               program.batch_shardings[k]) for k, v in host.items()}
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(3):
            state, metrics = program.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, before, jax.tree.map(np.asarray, state["params"]), program.trainable.keys, opt_size


_REFERENCE = {}


@pytest.mark.slow
# {expert: 4, data: 2} alone is the mesh of the run below; here the experts' mlp axis is split over tensor too
@pytest.mark.parametrize("shape", [{"expert": 2, "tensor": 2, "fsdp": 2}])
def test_expert_lora_steps_train_only_the_adapters_and_equal_one_expert_group(shape):
    """Three Adam steps: the same losses and adapters with the experts split over an expert axis (and mlp over
    tensor) as on {data: 8}; only the adapters moved, every one of them; Adam's state is the adapters' size."""
    cfg = load_train_config(None, TINY_MOE + ["model.lora={rank: 4, alpha: 8, targets: [q, expert_gate_up, "
                                              "expert_down]}"])
    if "reference" not in _REFERENCE:  # both meshes compare with one {data: 8} run
        _REFERENCE["reference"] = _three_steps(cfg, {"data": 8})
    reference = _REFERENCE["reference"]
    losses, before, after, keys, opt_size = _three_steps(cfg, shape)
    np.testing.assert_allclose(losses, reference[0], rtol=1e-5)
    adapters = {f"layers.{n}" for t in ("q", *BOTH) for n in lora_lib.adapter_names(t)}
    assert set(keys) == adapters and opt_size == 2 * cfg.model.num_adapter_params()
    for name, value in after["layers"].items():
        if f"layers.{name}" in adapters:
            assert np.abs(value - before["layers"][name]).max() > 0, name
            # Adam magnifies rounding where a gradient is near 0: 2e-5 is 0.2% of one step (lr 1e-2)
            np.testing.assert_allclose(value, reference[2]["layers"][name], rtol=1e-4, atol=2e-5, err_msg=name)
        else:  # experts, router, attention, norms: bitwise as they started
            np.testing.assert_array_equal(value, before["layers"][name], err_msg=name)
    np.testing.assert_array_equal(after["embedding"], before["embedding"])


def test_train_router_trains_each_router_whole_beside_the_adapters():
    from jaxcpt.optim.trainable import resolve_trainable
    from jaxcpt.train.state import param_infos

    cfg = load_train_config(None, TINY_MOE + ["model.lora={rank: 2, targets: [expert_down], train_router: true}"])
    infos = param_infos(cfg.model, make_rules())
    keys = resolve_trainable(lora_lib.default_trainable(cfg.model.lora, infos), infos, None, 10).keys
    assert set(keys) == {"layers.router", "layers.expert_down_lora_a", "layers.expert_down_lora_b"}
    with pytest.raises(ConfigError, match="train_router choose what trains only when optim.trainable is empty"):
        load_train_config(None, TINY_MOE + ["model.lora={targets: [expert_down], train_router: true}",
                                            "optim.trainable=[{params: ['layers.*_lora_a', 'layers.*_lora_b']}]"])


def test_expert_target_errors_name_the_fix():
    with pytest.raises(ConfigError, match=r"adapt the experts with expert_gate_up and expert_down.*"
                                          r"targets=\[q, expert_gate_up, expert_down\]"):
        load_train_config(None, TINY_MOE + ["model.lora={targets: [q, gate, up]}"])
    with pytest.raises(ConfigError, match="the default lists gate, up, down"):  # the default targets on an MoE model
        load_train_config(None, TINY_MOE + ["model.lora={rank: 4}"])
    with pytest.raises(ConfigError, match="did you mean 'expert_gate_up'.*fuses them into mlp.experts.gate_up_proj"):
        load_train_config(None, TINY_MOE + ["model.lora={targets: [expert_up]}"])
    # a dense model is refused where the adapters are made: a run from an HF directory learns only then that the
    # model has no experts (its model.lora was validated against the default, dense, model config)
    from jaxcpt.model.transformer import abstract_model

    dense = [o for o in TINY_MOE if not o.startswith(("model.moe", "model.family"))]
    with pytest.raises(ConfigError, match="targets expert_down needs an MoE model.*target its MLP as gate, up, down"):
        abstract_model(load_train_config(None, dense + ["model.lora={targets: [q, expert_down]}"]).model)
    with pytest.raises(ConfigError, match="train_router needs an MoE model"):
        abstract_model(load_train_config(None, dense + ["model.lora={targets: [q], train_router: true}"]).model)


@pytest.mark.slow
def test_an_expert_lora_run_from_hf_exports_a_peft_adapter_equal_to_its_merged_export(tmp_path):
    """`jaxcpt train` from a Qwen3-MoE HF directory on {expert: 4, data: 2} with expert adapters and the router
    trained: its merged export and its peft directory (router as modules_to_save) compute the same logits."""
    import os

    from peft import PeftModel
    from test_data_fixtures import make_texts, write_jsonl
    from tokenizer_fixtures import llama_style_tokenizer_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig

    from jaxcpt.train.loop import train

    base, tokenizer = tmp_path / "base", llama_style_tokenizer_dir()
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Qwen3MoeConfig(
        vocab_size=len(AutoTokenizer.from_pretrained(tokenizer)), hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
        num_experts=8, num_experts_per_tok=2))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("mlp.gate.weight"):  # transformers starts routers at zero, where every expert ties
                p.normal_(0, 0.5)
    hf.save_pretrained(base)
    for f in os.listdir(tokenizer):
        (base / f).write_bytes(open(os.path.join(tokenizer, f), "rb").read())
    write_jsonl(str(tmp_path / "domain.jsonl"), make_texts(200, seed=2, tag="dom"))
    train(load_train_config(None, [
        f"run_dir={tmp_path / 'run'}", "init.source=hf", f"init.path={base}", "model.dtype=float32",
        f"data.sources=[{{name: domain, paths: [{tmp_path / 'domain.jsonl'}], eval_documents: 8}}]",
        "data.seq_len=32", "data.eval_rows=8", "data.shuffle_buffer=32", "train.steps=3", "train.batch_size=8",
        "eval.every=0", "checkpoint.every_steps=0", "optim.schedule.peak_lr=1e-2", "optim.schedule.warmup_steps=1",
        "mesh={expert: 4, data: 2}", "export.final=true", "export.dtype=float32",
        "model.lora={rank: 4, alpha: 8, targets: [q, v, expert_gate_up, expert_down], train_router: true}"]))
    adapter = tmp_path / "run" / "hf" / "step_3-adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["mlp.gate"] and config["target_modules"] == ["q_proj", "v_proj"]
    input_ids = np.random.RandomState(0).randint(0, 200, size=(2, SEQ))
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf" / "step_3",
                                                            dtype=torch.float32).eval(), input_ids)
    start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert rel_err(hf_logits(start, input_ids), merged) > 1e-3  # it trained
    assert rel_err(hf_logits(PeftModel.from_pretrained(start, adapter).eval(), input_ids), merged) < 1e-5
