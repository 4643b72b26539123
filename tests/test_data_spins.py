"""No silent spins (issue 19.5): a source that encodes to nothing stops with a message, a tokenizer far
smaller than the model is refused at start, a stalled input pipeline says what it waits for, and a
SIGTERM during a stall stops `jaxcpt train` with a checkpoint."""

import contextlib
import json
import os
import signal
import threading
import time

import pytest
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl

from jaxcpt.data.pipeline import build_train_iterator
from jaxcpt.errors import UserError


@pytest.fixture(scope="module")
def three_id_tokenizer(tmp_path_factory):
    """What transformers builds from LlamaTokenizerFast(vocab_file=...): 3 ids, every text encodes to nothing."""
    from transformers import LlamaTokenizerFast

    out = str(tmp_path_factory.mktemp("tok3") / "tokenizer")
    LlamaTokenizerFast(vocab_file=sp_model()).save_pretrained(out)
    return out


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging when the code under test spins (as it did before the check)."""
    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s: the pipeline spins")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_source_whose_documents_encode_to_nothing_stops_naming_source_and_tokenizer(tmp_path, three_id_tokenizer):
    path = write_jsonl(str(tmp_path / "web.jsonl"), make_texts(300, seed=31))
    cfg = data_config(sources=[{"name": "web", "paths": [path]}], tokenizer=three_id_tokenizer, seq_len=32)
    it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    with _deadline(60), pytest.raises(UserError) as error:
        next(it)
    message = str(error.value)
    assert "source 'web'" in message and three_id_tokenizer in message and "3 ids" in message
    assert "from_pretrained" in message  # the fix


def test_tokenizer_far_smaller_than_the_model_is_refused_at_start_with_the_numbers(three_id_tokenizer):
    from jaxcpt.model.config import ModelConfig
    from jaxcpt.train.setup import _agree_with_tokenizer

    cfg = data_config(sources=[], tokenizer=three_id_tokenizer)
    with pytest.raises(UserError, match=r"has 3 ids, but the model's embedding has 32000 rows"):
        _agree_with_tokenizer(ModelConfig(vocab_size=32000), cfg, defaults_apply=False)
    # The model's own tokenizer (320 ids) fits a 320-row model, and a model padded to twice its size.
    ok = data_config(sources=[], tokenizer=sp_model())
    assert _agree_with_tokenizer(ModelConfig(vocab_size=640), ok, defaults_apply=False).vocab_size == 640


def _fifo(path) -> str:
    os.mkfifo(path)
    return str(path)


def test_stalled_pipeline_warns_naming_the_source_and_file_it_waits_for(tmp_path, caplog):
    fifo = _fifo(tmp_path / "hung_mount.jsonl")  # open() blocks until a writer comes: a hung file system
    cfg = data_config(sources=[{"name": "web", "paths": [fifo], "repeat": False}], tokenizer=sp_model(), seq_len=32,
                      shuffle_buffer=0, packing_bins=1, stall_warn_seconds=0.5)
    it = build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1)
    batches = []
    reader = threading.Thread(target=lambda: batches.append(next(it)), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while "input pipeline stalled" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(fifo, "w") as f:  # unblock the reader whatever happened
        f.write("".join(json.dumps({"text": t}) + "\n" for t in make_texts(50, seed=32)))
    reader.join(30)
    warning = next(r.getMessage() for r in caplog.records if "input pipeline stalled" in r.getMessage())
    assert "the batch for step 1" in warning and "source 'web'" in warning and "hung_mount.jsonl" in warning
    assert "worker 0 of 1" in warning
    assert batches and batches[0]["inputs"].shape == (1, 32)  # the wait ended normally once data came


def test_a_signal_during_a_stalled_wait_leaves_the_state_from_before_the_wait(tmp_path):
    from jaxcpt.data.watch import InputWaitInterrupted

    fifo = _fifo(tmp_path / "hung_mount.jsonl")
    cfg = data_config(sources=[{"name": "web", "paths": [fifo]}], tokenizer=sp_model(), seq_len=32, shuffle_buffer=0)
    it = build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1)
    before = it.get_state()
    # What the trainer's handler does (StopRequests.on_signal): the signal arrives inside the blocked open().
    previous = signal.signal(signal.SIGALRM, lambda *_: it.interrupt_if_waiting())
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(InputWaitInterrupted):
            next(it)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert it.get_state() == before  # a checkpoint now holds the position before the batch that never came
    with pytest.raises(InputWaitInterrupted):  # and the stream is not read again half-way
        next(it)
    it.close()


@pytest.mark.slow
def test_sigterm_during_a_stalled_wait_for_data_saves_and_stops_the_run(tmp_path):
    from train_helpers import make_corpora, run_cli, tiny_overrides

    fifo = _fifo(tmp_path / "hung_mount.jsonl")
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run_dir, make_corpora(tmp_path / "data"), steps=4)
                 if not o.startswith("data.sources")]
    overrides += [f"data.sources=[{{name: web, paths: [{fifo}]}}]", "data.stall_warn_seconds=1"]
    proc = run_cli(["train", *overrides])
    lines = []
    try:
        for line in proc.stdout:  # until the stall warning: the run is inside the wait for step 1's batch
            lines.append(line)
            if "input pipeline stalled" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    output = "".join(lines) + out
    assert "hung_mount.jsonl" in "".join(lines), output[-3000:]
    assert "saved checkpoint at step 0" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert (run_dir / "checkpoints" / "0").is_dir()
