"""Elastic data across real JAX processes (gloo over loopback): 2 processes -> 1 and 1 -> 2.

Each process builds its stream from JAX's process index and count, and the saved state is the
hosts' states gathered as a checkpoint stores them; the resumed run picks host 0's, as
jaxcpt.train.loop does when the process count changed. Which documents were trained (every
token id names its document and place) must be what one uninterrupted process trains.
"""

import collections
import json
import os
import subprocess
import sys

import pytest
from test_data_elastic import _cfg, _run, corpus  # noqa: F401  (corpus: the fixture)
from test_multihost import free_port

pytestmark = pytest.mark.slow


def _processes(tmp_path, name, cfg_path, count, steps, state_in="-"):
    port, procs, outs = free_port(), [], []
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    for pid in range(count):
        outs.append(tmp_path / f"{name}-{pid}.json")
        procs.append(subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "elastic_process.py"),
                                       str(port), str(count), str(pid), str(cfg_path), str(steps), str(state_in),
                                       str(outs[-1])], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    for p in procs:
        output = p.communicate(timeout=300)[0]
        assert p.returncode == 0, output[-3000:]
    results = [json.loads(o.read_text()) for o in outs]
    state = tmp_path / f"{name}-state.json"
    state.write_text(json.dumps({"hosts": results[0]["hosts"]}))
    return [tuple(p) for r in results for p in r["seen"]], results[0]["hosts"], state


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_across_process_counts_trains_each_document_pair_once(corpus, tmp_path, before, after):  # noqa: F811
    cfg = _cfg(corpus)
    cfg_path = tmp_path / "data.json"
    cfg_path.write_text(json.dumps({"sources": [{"name": s.name, "paths": s.paths, "weight": s.weight}
                                                for s in cfg.sources], "seq_len": cfg.seq_len, "elastic": True}))
    first, hosts, state = _processes(tmp_path, "first", cfg_path, before, 3)
    assert len(hosts) == before and all(h == hosts[0] for h in hosts)
    second, _, _ = _processes(tmp_path, "second", cfg_path, after, 4, state)
    names = [s.name for s in cfg.sources]
    trained = collections.Counter((names[s], i, t) for s, i, t in first + second)
    straight, _ = _run(cfg, 7, hosts=1)
    assert max(trained.values()) == 1
    assert trained == collections.Counter(straight)


def test_training_checkpointed_on_two_processes_resumes_on_one(tmp_path):
    """The trainer's path: 2 processes save an elastic state at step 2, one process continues to step 4
    (the saved hosts' list has 2 entries; the run takes host 0's) and its checkpoint counts 4 global batches."""
    from test_multihost import run_two_processes
    from train_helpers import make_corpora, run_cli, tiny_overrides, train_losses

    from jaxcpt.data.command import tokenize_source
    from jaxcpt.data.config import SourceConfig
    from test_data_fixtures import sp_model

    tokenized = {}
    for name, path in make_corpora(tmp_path / "data").items():
        tokenized[name] = str(tmp_path / f"tok-{name}")
        tokenize_source(SourceConfig(name=name, paths=[path]), sp_model(), tokenized[name], progress=False)
    run = tmp_path / "run"
    overrides = [*tiny_overrides(run, tokenized, steps=2, mesh="{fsdp: 8}"), "data.elastic=true",
                 "checkpoint.every_steps=2"]
    run_two_processes(["train", *overrides])
    proc = run_cli(["train", *[o.replace("train.steps=2", "train.steps=4") for o in overrides]])
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert sorted(train_losses(run)) == [1, 2, 3, 4]
    state = json.loads((run / "checkpoints" / "4" / "data" / "metadata").read_text())["hosts"][0]
    assert state["step"] == 4 and sum(s["rows"] for s in state["sources"].values()) == 4 * 8
