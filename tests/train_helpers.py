"""Small training runs for tests: corpora, a tokenizer and config overrides, all made in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from test_data_fixtures import make_texts, sp_model, write_jsonl


def make_corpora(directory) -> dict[str, str]:
    """Two JSONL sources ('general' and 'domain') with distinct vocabularies' documents."""
    os.makedirs(directory, exist_ok=True)
    general = write_jsonl(os.path.join(directory, "general.jsonl"), make_texts(300, seed=1))
    domain = write_jsonl(os.path.join(directory, "domain.jsonl"), make_texts(300, seed=2, tag="dom"))
    return {"general": general, "domain": domain}


def tiny_overrides(run_dir, corpora: dict[str, str], *, steps: int = 8, mesh: str = "{data: 8}", width: int = 32,
                   seq_len: int = 32, batch: int = 8) -> list[str]:
    sources = ", ".join(
        f"{{name: {name}, paths: [{path}], weight: {w}, eval_documents: 16}}"
        for (name, path), w in zip(corpora.items(), (0.25, 0.75))
    )
    return [
        f"run_dir={run_dir}", "model.vocab_size=320", f"model.hidden_size={width}", f"model.intermediate_size={2 * width}",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.dtype=float32",
        f"data.tokenizer={sp_model()}", f"data.seq_len={seq_len}", f"data.sources=[{sources}]", "data.eval_rows=8",
        "data.shuffle_buffer=64", f"train.steps={steps}", f"train.batch_size={batch}", "train.log_every=1",
        "train.loss_chunk_size=16", "eval.every=0", "checkpoint.every_steps=0", "export.final=false",
        "optim.schedule.peak_lr=3e-3", "optim.schedule.warmup_steps=2", f"mesh={mesh}",
    ]


def run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    """``jaxcpt ARGS`` in a child process with 8 fake devices (as the tests' own process has)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-m", "jaxcpt.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def train_losses(run_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == "train":
                assert record["step"] not in out, f"step {record['step']} recorded twice"
                out[record["step"]] = record["loss"]
    return out


def wait_for(predicate, proc, timeout=240):
    """Poll ``predicate`` while the training subprocess ``proc`` runs; fail with its output if it exits first."""
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)
