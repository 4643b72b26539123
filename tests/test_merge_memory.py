"""Peak host memory of a merge of a 48-layer model, measured in a child process (tests/merge_peak_rss.py).

Model: Llama shape, hidden 256, FFN 512, 4 heads, 48 layers, vocab 512, float32:
one layer 2.50 MiB, the whole model 121 MiB per input.

Bounds, as increases of resident memory over the child's own baseline after imports:
* HF directory inputs: below 3 layers (7.5 MiB). The merge holds the current tensor
  of each input, the float32 terms and the result, and each read unmaps its file again.
* jaxcpt checkpoint inputs: below (inputs + 2) x the largest stacked parameter + 3 layers
  (103.5 MiB here, against 242 MiB for both inputs). A checkpoint is read a parameter at
  a time ([48, 256, 512] = 24 MiB for the MLP matrices; see jaxcpt/merge/inputs.py): each
  input holds one, and restoring one can take twice its size for a moment (measured for
  the down projection, whose chunks are cut along its last axis by the fsdp sharding).
A control run that keeps the whole base model reads above the model's size, so the
measurement does see a model held in memory.

The child runs with MALLOC_MMAP_THRESHOLD_=1 MiB: glibc otherwise raises its mmap
threshold to the size of the last freed buffer (up to 32 MiB) and keeps later buffers of
up to that size in its arenas after they are freed. Tensors of real models are far above
32 MiB and are always returned to the system; at this scale the default would measure
the allocator's retention instead of what the merge holds.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from jaxcpt.cli import main

LAYERS, HIDDEN, FFN, VOCAB = 48, 256, 512, 512
LAYER_BYTES = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * FFN + 2 * HIDDEN) * 4
MODEL_BYTES = LAYERS * LAYER_BYTES + (2 * VOCAB + 1) * HIDDEN * 4
LARGEST_PARAMETER_BYTES = LAYERS * HIDDEN * FFN * 4  # a stacked MLP matrix in a jaxcpt checkpoint

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux /proc/self/clear_refs to reset the peak-memory mark")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    for name, seed in (("base", 0), ("model", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(root / name)
    return root


def peak_increase(base: Path, model: Path, out: Path, *extra: str) -> int:
    here = Path(__file__).parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", MALLOC_MMAP_THRESHOLD_=str(2**20),
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, str(here / "merge_peak_rss.py"), str(base), str(model), str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    return measured["peak_bytes"] - measured["baseline_bytes"]


@pytest.mark.slow
def test_merging_hf_directories_holds_about_one_layer(models):
    increase = peak_increase(models / "base", models / "model", models / "merged_hf")
    print(f"peak increase {increase / 2**20:.1f} MiB; one layer {LAYER_BYTES / 2**20:.2f} MiB, model {MODEL_BYTES / 2**20:.0f} MiB")
    assert increase < 3 * LAYER_BYTES
    assert peak_increase(models / "base", models / "model", models / "unused", "--load-all") > MODEL_BYTES


@pytest.mark.slow
def test_merging_checkpoints_holds_about_one_parameter_per_input(models):
    for name in ("base", "model"):
        assert main(["import-hf", str(models / name), "--out", str(models / f"{name}_ckpt"), "--mesh", "{fsdp: 8}"]) == 0
    increase = peak_increase(models / "base_ckpt", models / "model_ckpt", models / "merged_ckpt")
    bound = (2 + 2) * LARGEST_PARAMETER_BYTES + 3 * LAYER_BYTES
    print(f"peak increase {increase / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB; inputs {2 * MODEL_BYTES / 2**20:.0f} MiB")
    assert increase < bound
