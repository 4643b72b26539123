"""The forgetting report reads every measurement of a run: held-out loss, EMA, downstream tasks, merge sweeps."""

import json

from jaxcpt.report.forgetting import compare, format_table, write_report


def _run(directory, general_last: float, with_extras: bool = True):
    directory.mkdir()
    records = [
        {"kind": "eval", "step": 0, "sources": {"general": {"loss": 3.0}, "domain": {"loss": 4.0}},
         **({"ema": {"general": {"loss": 3.0}, "domain": {"loss": 4.0}}} if with_extras else {})},
        {"kind": "train", "step": 1, "loss": 3.9},
        {"kind": "eval", "step": 10, "sources": {"general": {"loss": general_last}, "domain": {"loss": 2.5}},
         **({"ema": {"general": {"loss": 3.2}, "domain": {"loss": 3.0}}} if with_extras else {})},
    ]
    if with_extras:
        records += [
            {"kind": "downstream", "step": 0, "tasks": {"arc": {"acc": 0.50}}, "ema": {"arc": {"acc": 0.50}}},
            {"kind": "downstream", "step": 10, "tasks": {"arc": {"acc": 0.40}}, "ema": {"arc": {"acc": 0.45}}},
        ]
        sweep = directory / "merge_sweep_linear"
        sweep.mkdir()
        rows = [{"coefficient": t, "loss": {"general": 3.0 + t, "domain": 4.0 - t},
                 "change": {"general": t, "domain": -t}} for t in (0.0, 0.5, 1.0)]
        (sweep / "sweep.json").write_text(json.dumps({
            "kind": "jaxcpt.merge_sweep", "version": 1, "method": "linear", "sources": ["general", "domain"],
            "rows": rows, "recommended": {"coefficient": 0.5}, "tolerance": 0.5}))
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


def test_report_shows_held_out_ema_downstream_and_merge_rows_against_step_0(tmp_path):
    run = _run(tmp_path / "run", general_last=3.5)
    text = write_report(run)
    lines = {line.split()[0] + (" (ema)" if "(ema)" in line else ""): line for line in text.splitlines() if line.strip()}
    assert lines["general"].split()[1:] == ["3.0000", "3.0000", "3.5000", "+0.5000"]
    assert lines["general (ema)"].split()[-4:] == ["3.0000", "3.0000", "3.2000", "+0.2000"]
    assert "arc acc" in text and "0.5000    0.4000   -0.1000" in text and "0.5000    0.4500   -0.0500" in text
    sweep_rows = [line for line in text.splitlines() if line.strip().startswith(("0 ", "0.5 ", "1 "))]
    assert len(sweep_rows) == 3 and sweep_rows[1].endswith("<- recommended")
    assert (run / "report.txt").read_text().strip() == text and (run / "eval_loss.png").stat().st_size > 0


def test_comparison_adds_ema_rows_and_the_share_of_forgetting_removed(tmp_path):
    a, b = _run(tmp_path / "a", general_last=4.0), _run(tmp_path / "b", general_last=3.25, with_extras=False)
    table, removed = compare(a, b)
    assert removed["general"] == 0.75  # rise 1.0 without replay, 0.25 with
    assert "general (ema)" not in table  # only one of the two runs kept an average
    assert "merge sweep (linear" in table


def test_report_without_a_step_0_evaluation_says_so(tmp_path):
    run = tmp_path / "late"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 5, "sources": {"general": {"loss": 3.0}}}) + "\n")
    assert "no step-0 evaluation recorded; 'step 0' above is the evaluation at step 5" in format_table(run)
