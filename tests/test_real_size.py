"""The real-size benchmark (benchmarks/real_size.py) at its small shape: a 43M-parameter Qwen2.5-shaped
model with Qwen's 151,936-entry vocabulary, trained from an HF directory, killed (-9) after its first
checkpoint, resumed, exported and reloaded in transformers, each command in its own process.

It asserts what docs/real-size.md states: every phase's peak host RSS under the bound computed from
the train state's bytes, the step after a checkpoint save included (at 0acb231 that step ran beside
an asynchronous write whose host copy of the state shared CPU memory with the step's temporaries);
HF import holding the parameters plus a bounded slice (at 0acb231 it held the vocabulary table
several times over); and checkpoints whose items besides the state (data, meta, files) stay under
1 MB (at 0acb231 the files item carried the whole HF start directory). (Export's slice is checked
against a growing vocabulary in tests/test_hf_roundtrip.py: at this size compiler start-up, not the
tensors, dominates its memory.)

Not slow: a checkpoint save on the CPU platform returns with its step on disk, and the page's tables
are the JSONs' rendering.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import real_size  # noqa: E402

MiB = 2**20


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return real_size.benchmark("small", tmp_path_factory.mktemp("real_size"), separate_tokenizer=False, extra=[])


def _phases(result: dict, process: str) -> list[dict]:
    return next(p["phases"] for p in result["processes"] if p["process"] == process)


@pytest.mark.slow
def test_real_size_run_from_hf_survives_kill_and_reloads_in_transformers(result):
    assert "error" not in result, result.get("error")
    assert [p["process"] for p in result["processes"]] == ["train", "resume", "export", "reload"]
    assert result["export_weight_bytes"] > 0.9 * result["param_bytes"] / 2  # bf16 of every parameter


def _over_bound(result: dict, beside_write: bool) -> dict:
    return {(p["process"], ph["phase"]): ph["peak_rss"] for p in result["processes"] for ph in p["phases"]
            if ph["peak_rss"] > result["rss_bound"] and (ph["phase"] == real_size.BESIDE_WRITE) == beside_write}


@pytest.mark.slow
def test_real_size_every_phase_stays_under_the_stated_bound(result):
    """Peak RSS of every phase <= baseline + 2 x state + 2 x params + 512 MiB (real_size.rss_bound),
    import, state init, compile, steps, restore, saves, export and reload alike."""
    over = _over_bound(result, beside_write=False)
    assert not over, f"over the bound of {result['rss_bound'] / MiB:.0f} MiB: {over}"


@pytest.mark.slow
def test_real_size_step_after_a_checkpoint_save_stays_under_the_stated_bound(result):
    """At 0acb231 the save was asynchronous on CPU too: Orbax's host copy of the state and the next
    step's temporaries shared host memory (0.5B: 19.06 GiB against 11.43 GiB waiting for the write)."""
    over = _over_bound(result, beside_write=True)
    assert not over, f"over the bound of {result['rss_bound'] / MiB:.0f} MiB: {over}"


def test_a_checkpoint_save_on_the_cpu_platform_returns_with_its_step_on_disk(tmp_path):
    """With async_save (the default) a CPU save must not leave a write running beside the next step:
    there its host copy is a second train state in the memory the step needs (docs/real-size.md)."""
    import jax.numpy as jnp
    import numpy as np

    from jaxcpt.checkpoint import CheckpointConfig, Checkpointer

    big = jnp.asarray(np.random.default_rng(0).random(16_000_000, dtype=np.float32))  # 64 MB: ~0.2 s to write
    with Checkpointer(tmp_path, CheckpointConfig(every_steps=1, async_save=True)) as ckpt:
        assert ckpt.save(1, {"big": big, "w": jnp.ones(4)}, {"pos": 1}, {})
        assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["1"]  # committed, no tmp left


def test_real_size_page_tables_are_rendered_from_the_results_jsons():
    import real_size_page

    page = Path(real_size.REPO / "docs" / "real-size.md").read_text()
    blocks = real_size_page.BLOCK.findall(page)
    assert {stems for _, kind, stems, _, _ in blocks if kind == "phases"} >= {"real_size_qwen2.5-0.5b",
                                                                              "real_size_llama3.2-1b-lora"}
    assert page == real_size_page.render(page), \
        "regenerate with: python benchmarks/real_size_page.py --update docs/real-size.md"


@pytest.mark.slow
def test_real_size_hf_import_holds_the_parameters_plus_a_bounded_slice(result):
    """At 0acb231 the 151,936 x 256 embedding was read, padded, cast and placed whole: ~2.5x its float32
    bytes on top of the parameters."""
    from jaxcpt.hf.tensor_io import HOST_BLOCK_BYTES

    train = _phases(result, "train")
    state_init = next(ph for ph in train if ph["phase"] == "state init")
    imported = next(ph for ph in train if ph["phase"] == "hf import")
    slack = imported["peak_rss"] - imported["start_rss"] - state_init["param_bytes"]
    # measured: 110-120 MiB here (XLA's compiler starts in this phase), 220 MiB at 0acb231
    assert slack < 4 * HOST_BLOCK_BYTES + 144 * MiB, f"import held {slack / MiB:.0f} MiB beyond the parameters"


@pytest.mark.slow
def test_real_size_checkpoint_items_besides_the_state_stay_under_a_megabyte(result):
    """Fails until the ckpt-files branch is merged: today the 'files' item base64-encodes the whole HF
    start directory, weights included (issue 19)."""
    items = result["checkpoint_items"]
    assert set(items) >= {"state", "meta", "data"}
    assert result["checkpoint_non_state_bytes"] < 1_000_000, items
