"""jaxcpt decontaminate: 13-gram overlap of the training sources with held-out sets and eval.downstream
tasks, on data that overlaps on purpose, and dropping the contaminated documents at read time."""

import json

import pytest
from test_data_fixtures import make_texts, sp_model, write_jsonl

from jaxcpt.cli import main

PASSAGE = ("the patient was given twelve milligrams of the experimental compound every morning for three weeks "
           "before the scan")  # 19 words


def _corpus(tmp_path):
    web = make_texts(30, seed=1) + [f"some preamble words here {PASSAGE} and then more unrelated text follows"]
    dom = make_texts(20, seed=2, tag="dom")
    web.append("an echo of a held-out document: " + dom[0])  # not the same text, so not held out itself
    write_jsonl(str(tmp_path / "web.jsonl"), web)
    write_jsonl(str(tmp_path / "dom.jsonl"), dom)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [{"question": q, "choices": ["yes", "no"], "answer": 0} for q in make_texts(5, seed=3, tag="q")]
    rows.append({"question": PASSAGE, "choices": ["yes", "no"], "answer": 1})
    with open(tasks / "leaky.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tasks / "leaky.yaml").write_text(
        "task: jaxcpt_leaky\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tasks / 'leaky.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n")
    sources = (f"[{{name: web, paths: [{tmp_path / 'web.jsonl'}]}}, "
               f"{{name: dom, paths: [{tmp_path / 'dom.jsonl'}], eval_documents: 2}}]")
    return [f"data.tokenizer={sp_model()}", f"data.sources={sources}", "eval.downstream.tasks=[jaxcpt_leaky]",
            f"eval.downstream.include_path={tasks}"]


@pytest.mark.slow  # lm-eval loads the task (tens of seconds on a busy machine)
def test_report_finds_the_planted_overlaps_and_the_hashes_drop_them_at_read_time(tmp_path, capsys):
    overrides = _corpus(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("model: {vocab_size: 320}\n")
    report_path, hashes = tmp_path / "report.json", tmp_path / "exclude.json"
    assert main(["decontaminate", "--config", str(config), *overrides, "--json", str(report_path),
                 "--write-hashes", str(hashes)]) == 0
    report = json.loads(report_path.read_text())
    task, held = report["eval_sets"]["task:jaxcpt_leaky"], report["eval_sets"]["held-out:dom"]
    assert (task["documents"], task["contaminated"]) == (6, 1)
    assert task["examples"][0]["training_source"] == "web" and task["examples"][0]["ngram"] in PASSAGE
    assert (held["documents"], held["contaminated"]) == (2, 1)
    assert report["contaminated_training_documents"] == 2
    assert "task:jaxcpt_leaky" in capsys.readouterr().out

    assert main(["decontaminate", "--config", str(config), *overrides, f"data.exclude_documents={hashes}",
                 "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert all(r["contaminated"] == 0 for r in report["eval_sets"].values())
    assert report["training_documents"]["web"] == 32 - 2
