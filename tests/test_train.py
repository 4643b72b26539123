"""The training entrypoint: re-sharding resume, the base model's step-0 evaluation, config errors."""

import json
import shutil

import pytest
import torch
from hf_models import rel_err
from train_helpers import make_corpora, tiny_overrides, train_losses
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

from jaxcpt.cli import main
from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_eval_batches
from jaxcpt.train.config import load_train_config
from jaxcpt.train.loop import train


def test_checkpoint_from_data_parallel_mesh_resumes_on_fsdp_tensor_mesh(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    base = tiny_overrides(tmp_path / "a", corpora, steps=5, mesh="{data: 8}") + ["checkpoint.every_steps=4"]
    train(load_train_config(None, base))
    straight = train_losses(tmp_path / "a")

    # a new run directory holding only the step-4 checkpoint, resumed on another mesh
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "4", tmp_path / "b" / "checkpoints" / "4")
    overrides = tiny_overrides(tmp_path / "b", corpora, steps=5, mesh="{fsdp: 4, tensor: 2}") + ["checkpoint.every_steps=4"]
    train(load_train_config(None, overrides))
    resharded = train_losses(tmp_path / "b")
    assert list(resharded) == [5]
    assert abs(resharded[5] - straight[5]) / straight[5] < 1e-5


# (config class, extra fields): the tokenizer's 320 ids are stored padded to 384 rows
STEP0_MODELS = {
    "llama": (LlamaConfig, {}),
    "gemma3": (Gemma3TextConfig, dict(head_dim=16, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16)),
    "qwen3": (Qwen3Config, dict(head_dim=32, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("family", list(STEP0_MODELS))
def test_step0_eval_of_hf_model_equals_transformers_loss(family, tmp_path):
    corpora = make_corpora(tmp_path / "data")
    torch.manual_seed(0)
    hf_dir = tmp_path / "hf"
    config_class, extra = STEP0_MODELS[family]
    config = config_class(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(hf_dir)
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora, steps=2) if not o.startswith("model.")]
    overrides += ["init.source=hf", f"init.path={hf_dir}", "model.dtype=float32"]
    cfg = load_train_config(None, overrides)
    train(cfg)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    step0 = next(r for r in records if r["kind"] == "eval" and r["step"] == 0)["sources"]

    # transformers cannot pack: run every document of every held-out row on its own
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for name, batches in build_eval_batches(cfg.data, batch_size=cfg.train.batch_size).items():
        loss_sum, tokens = 0.0, 0.0
        for batch in batches:
            for row in range(batch["inputs"].shape[0]):
                for segment in set(batch["segment_ids"][row].tolist()) - {0}:
                    where = batch["segment_ids"][row] == segment
                    inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
                    mask = batch["loss_mask"][row][where]
                    with torch.no_grad():
                        logits = model(torch.tensor(inputs[None], dtype=torch.long)).logits[0].double()
                    losses = torch.nn.functional.cross_entropy(logits, torch.tensor(targets, dtype=torch.long), reduction="none").numpy()
                    loss_sum += float((losses * mask).sum())
                    tokens += float(mask.sum())
        assert tokens == step0[name]["tokens"]
        assert rel_err(step0[name]["loss"], loss_sum / tokens) < 1e-5, name


def test_misspelled_key_fails_before_anything_starts_and_names_the_closest_key(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"run_dir: {tmp_path / 'run'}\noptim:\n  schedule:\n    peak_lr: 1.0e-4\n    warmup_step: 10\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.schedule.warmup_step'; did you mean 'optim.schedule.warmup_steps'?" in err
    assert not (tmp_path / "run").exists()  # nothing was set up, let alone compiled
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_train_config(None, ["train.batchsize=4"])
    with pytest.raises(ConfigError, match="architecture comes from the checkpoint"):
        load_train_config(None, ["init.source=hf", "init.path=/x", "model.hidden_size=64"])


def test_training_with_splash_attention_under_the_mesh_matches_reference(tmp_path):
    """The loop traces its step under the mesh: splash runs per device in shard_map and gives the same losses."""
    corpora = make_corpora(tmp_path / "data")
    losses = {}
    for attention in ("reference", "splash"):
        overrides = tiny_overrides(tmp_path / attention, corpora, steps=2, mesh="{data: 4, tensor: 2}", seq_len=128)
        train(load_train_config(None, overrides + [f"model.attention={attention}"]))
        losses[attention] = train_losses(tmp_path / attention)
    assert losses["splash"].keys() == losses["reference"].keys() == {1, 2}
    for step in (1, 2):
        assert abs(losses["splash"][step] - losses["reference"][step]) / losses["reference"][step] < 1e-5


def test_loop_traces_under_the_mesh(tmp_path, monkeypatch):
    """Sharding constraints need the mesh in context while the step is traced."""
    import jaxcpt.train.step as step_module

    seen = []
    original = step_module.train_step

    def spy(*args, **kwargs):
        import jax

        seen.append(dict(jax.sharding.get_abstract_mesh().shape))
        return original(*args, **kwargs)

    monkeypatch.setattr("jaxcpt.train.setup.train_step", spy)
    corpora = make_corpora(tmp_path / "data")
    train(load_train_config(None, tiny_overrides(tmp_path / "run", corpora, steps=3, mesh="{data: 2, fsdp: 2, tensor: 2}")))
    assert seen and seen[0] == {"data": 2, "fsdp": 2, "tensor": 2}


def test_checkpoints_can_live_outside_the_run_directory(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    overrides = tiny_overrides(tmp_path / "run", corpora, steps=3) + [f"checkpoint.directory={tmp_path / 'shared' / 'ckpt'}"]
    train(load_train_config(None, overrides))
    assert (tmp_path / "shared" / "ckpt" / "3").is_dir() and not (tmp_path / "run" / "checkpoints").exists()
    train(load_train_config(None, overrides[:-1] + ["train.steps=4", overrides[-1]]))  # resumes from the shared dir
    assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_remote_run_dir_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match="must be a local path.*checkpoint.directory=gs://"):
        load_train_config(None, ["run_dir=gs://bucket/run", "data.sources=[{name: a, paths: [x]}]"])
