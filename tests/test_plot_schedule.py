"""``jaxcpt plot-schedule``: a readable PNG and the boundary table, from a full training YAML."""

import struct

import pytest

from jaxcpt.cli import main

TRAINING_YAML = """\
model: {preset: tiny}          # sections other than optim and train are not read
train:
  steps: 2000
optim:
  weight_decay: 0.1
  schedule:
    kind: infinite
    peak_lr: 3e-4
    warmup_steps: 100
    cooldown_fraction: 0.1
    anneal_start_step: 1500
    optimizer_warmup_steps: 50
"""


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table_rows(stdout: str) -> dict[str, tuple[int, float]]:
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit():
            rows[parts[0]] = (int(parts[1]), float(parts[2]))
    return rows


def test_plot_schedule_writes_png_and_prints_boundaries(tmp_path, capsys):
    config = tmp_path / "cpt.yaml"
    config.write_text(TRAINING_YAML)
    out = tmp_path / "plots" / "lr.png"
    assert main(["plot-schedule", "--config", str(config), "--out", str(out)]) == 0

    data = out.read_bytes()
    width, height = png_size(data)
    assert (width, height) == (1000, 500)
    assert len(data) > 10_000  # a drawn curve, not an empty canvas
    rows = table_rows(capsys.readouterr().out)
    assert rows == {
        "optimizer_warmup": (0, 0.0),
        "warmup": (50, 0.0),
        "cooldown": (150, pytest.approx(3e-4)),
        "constant": (350, pytest.approx(1.5e-4)),  # cooldown of 10% of 2000 steps to half the peak
        "anneal": (1500, pytest.approx(1.5e-4)),
        "end": (2000, pytest.approx(3e-5)),
    }


def test_total_steps_flag_and_dotted_overrides(tmp_path, capsys):
    config = tmp_path / "optim_only.yaml"
    config.write_text("optim:\n  schedule:\n    kind: wsd\n    warmup_steps: 10\n")
    out = tmp_path / "wsd.png"
    rc = main(["plot-schedule", "--config", str(config), "--total-steps", "100", "--out", str(out),
               "optim.schedule.peak_lr=1e-4", "optim.schedule.decay_shape=1-sqrt"])  # fmt: skip
    assert rc == 0 and out.is_file()
    rows = table_rows(capsys.readouterr().out)
    assert rows["stable"] == (10, pytest.approx(1e-4))
    assert rows["decay"] == (80, pytest.approx(1e-4))  # wsd decays over the last 20% by default
    assert rows["end"] == (100, pytest.approx(1e-5))


def test_missing_run_length_and_bad_schedule_are_reported_as_errors(tmp_path, capsys):
    config = tmp_path / "no_steps.yaml"
    config.write_text("optim: {}\n")
    assert main(["plot-schedule", "--config", str(config), "--out", str(tmp_path / "x.png")]) == 2
    assert "no run length: the config has no train.steps; pass --total-steps N" in capsys.readouterr().err

    rc = main(["plot-schedule", "--config", str(config), "--total-steps", "100", "optim.schedule.warmup_steps=500"])
    assert rc == 2
    assert "exceed the run of total_steps=100" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
