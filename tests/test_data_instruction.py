"""Instruction and chat sources: loss on the answer tokens only, checked against a hand-computed loss."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_data_fixtures import data_config, sp_model
from tokenizer_fixtures import qwen_style_tokenizer_dir

from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_eval_batches, build_train_iterator
from jaxcpt.data.tokenize import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _jsonl(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _first_batch(path, tokenizer, instruction, **kw):
    cfg = data_config(sources=[{"name": "sft", "paths": [path], "instruction": instruction, "repeat": False, **kw}],
                      tokenizer=tokenizer, seq_len=96, shuffle_buffer=0, packing_bins=1)
    return next(build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1))


@pytest.mark.slow  # a model forward and the jitted loss: ~10 s on a quiet machine, far more on a loaded one
def test_prompt_completion_loss_is_the_hand_computed_loss_over_the_completion(tmp_path):
    from test_scan_and_loss import TINY

    from jaxcpt.model.transformer import init_model
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.train.loss import model_loss

    prompt, completion = "the quick brown fox asks", " and the lazy dog answers"
    batch = _first_batch(_jsonl(tmp_path / "pc.jsonl", [{"prompt": prompt, "completion": completion}]),
                         sp_model(), "prompt_completion")
    tok = load_tokenizer(sp_model())
    p, c = tok.encode(prompt), tok.encode(completion)
    tokens = [1, *p, *c, 2]  # BOS prompt completion EOS
    assert list(batch["inputs"][0, : len(tokens) - 1]) == tokens[:-1]
    model = init_model(dataclasses.replace(TINY, vocab_size=320, num_layers=1), build_mesh({"data": 1}, jax.devices()[:1]))
    logits = model(jnp.asarray(batch["inputs"]))  # [1, T, V]; one document from position 0, padding after
    nll = -jax.nn.log_softmax(logits, -1)[0, np.arange(len(tokens) - 1), np.array(tokens[1:])]  # [n - 1]
    answer = slice(len(p), len(tokens) - 1)  # positions whose target is a completion token or the EOS
    expected = nll[answer].mean()
    loss = model_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert batch["loss_mask"].sum() == len(c) + 1


def test_loss_on_all_trains_every_token_of_the_record(tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a question", "completion": " an answer"}])
    batch = _first_batch(path, sp_model(), "prompt_completion", loss_on="all")
    assert batch["loss_mask"].sum() == (batch["segment_ids"] > 0).sum()


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("chat") / "tok")
    shutil.copytree(qwen_style_tokenizer_dir(), out)
    with open(os.path.join(out, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = CHATML
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return out


def test_chat_messages_train_on_the_assistant_turns_only(tmp_path, chat_tokenizer):
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "the answer"},
                {"role": "user", "content": "and more"}, {"role": "assistant", "content": "second one"}]
    batch = _first_batch(_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), chat_tokenizer, "messages")
    tok = load_tokenizer(chat_tokenizer)
    trained = batch["targets"][0][batch["loss_mask"][0] > 0]
    expected = [*tok.encode("the answer<|im_end|>\n"), *tok.encode("second one<|im_end|>\n"), 400]  # 400: EOS
    assert list(trained) == expected
    seen = batch["targets"][0][batch["segment_ids"][0] > 0]
    assert tok._tok.decode(list(seen)).startswith("im_start|>user\nhello there") or len(seen) > len(trained)
    evals = build_eval_batches(data_config(
        sources=[{"name": "sft", "paths": [str(tmp_path / "chat.jsonl")], "instruction": "messages",
                  "eval_documents": 1}], tokenizer=chat_tokenizer, seq_len=96), batch_size=1, process_index=0,
        process_count=1)
    np.testing.assert_array_equal(evals["sft"][0]["loss_mask"], batch["loss_mask"])  # the mask reaches evaluation


def test_chat_source_without_a_chat_template_is_an_error_naming_the_fix(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ConfigError, match="no chat template.*prompt_completion"):
        _first_batch(path, sp_model(), "messages")


def test_records_without_an_answer_are_counted_bad(tmp_path, chat_tokenizer):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]},
                                            {"messages": [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": "a"}]}])
    cfg = data_config(sources=[{"name": "sft", "paths": [path], "instruction": "messages"}], tokenizer=chat_tokenizer,
                      seq_len=48, max_bad_fraction=1.0)
    it = build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1)
    next(it)
    assert it.bad_input_counts()["sft"]["missing_field"] >= 1


def _parquet(path, records, row_group_size=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path), row_group_size=row_group_size)
    return str(path)


def _batches(path, tokenizer, instruction, n):
    cfg = data_config(sources=[{"name": "sft", "paths": [path], "instruction": instruction}], tokenizer=tokenizer,
                      seq_len=48, shuffle_buffer=0, packing_bins=1, shuffle_files=False)
    it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    return [next(it) for _ in range(n)]


def test_instruction_records_in_parquet_train_as_the_same_records_in_jsonl(tmp_path, chat_tokenizer):
    pairs = [{"prompt": f"question {i} about things", "completion": f" answer number {i}"} for i in range(7)]
    chats = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": f"reply {i}"}]}
             for i in range(7)]
    for name, records, tokenizer, instruction in (("pc", pairs, sp_model(), "prompt_completion"),
                                                  ("chat", chats, chat_tokenizer, "messages")):
        from_jsonl = _batches(_jsonl(tmp_path / f"{name}.jsonl", records), tokenizer, instruction, 4)
        from_parquet = _batches(_parquet(tmp_path / f"{name}.parquet", records), tokenizer, instruction, 4)
        for a, b in zip(from_jsonl, from_parquet):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}: {k}")
        assert 0 < from_parquet[0]["loss_mask"].sum() < (from_parquet[0]["segment_ids"] > 0).sum()  # answers only


def test_parquet_instruction_source_without_its_columns_is_an_error_naming_them(tmp_path):
    path = _parquet(tmp_path / "pc.parquet", [{"prompt": "a question", "text": "no completion column"}])
    with pytest.raises(ConfigError, match=r"no columns \['completion'\].*prompt_completion reads the columns"):
        _batches(path, sp_model(), "prompt_completion", 1)


def test_instruction_source_cannot_be_read_elastically_and_the_error_says_why(tmp_path):
    path = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a question", "completion": " an answer"}])
    cfg = data_config(sources=[{"name": "sft", "paths": [path], "instruction": "prompt_completion"}],
                      tokenizer=sp_model(), seq_len=16, elastic=True)
    with pytest.raises(ConfigError, match="cannot be read with data.elastic=true.*answer mask.*data.elastic=false"):
        build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1)
