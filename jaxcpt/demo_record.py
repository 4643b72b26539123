"""The demo's results JSON (``jaxcpt demo --json PATH``) and the documentation blocks generated from it.

The README's "What the demo shows" table and docs/merging.md's sweep table quote a demo run. So
that they never drift from a measurement, the demo writes what it printed, its numbers, the wall
time of each phase, the git commit and the machine to a JSON (``benchmarks/results/demo.json``),
and the blocks between ``<!-- demo:begin -->`` / ``<!-- demo:end -->`` (README.md) and
``<!-- demo-merge:begin -->`` / ``<!-- demo-merge:end -->`` (docs/merging.md) are rendered from
it (``jaxcpt demo --render-only --json benchmarks/results/demo.json --update README.md --update
docs/merging.md``; a fresh ``jaxcpt demo --fresh --json ... --update ...`` measures and renders at once).
tests/test_docs_generated.py checks that the files hold exactly what this module renders.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

BLOCKS = {"demo": ("<!-- demo:begin -->", "<!-- demo:end -->"),
          "demo-merge": ("<!-- demo-merge:begin -->", "<!-- demo-merge:end -->")}
README_SWEEP_ROWS = (0.0, 0.1, 0.5, 1.0)  # the README shows these and the recommended row; docs/merging.md all


class CpuLoad:
    """Wall time, and the CPU time of this process and of everything else on the machine, since start.

    On a shared machine the demo's wall time says little without the load it ran under.
    """

    def __init__(self):
        self.t0, self.machine0, self.own0 = time.monotonic(), self._machine_busy(), self._own()

    @staticmethod
    def _machine_busy() -> float:
        try:
            with open("/proc/stat") as f:  # Linux: busy jiffies of all cores
                fields = [float(x) for x in f.readline().split()[1:]]
        except OSError:
            return float("nan")
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        return sum(u.ru_utime + u.ru_stime for u in usage)

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        machine, own = self._machine_busy() - self.machine0, self._own() - self.own0
        return {"wall_s": round(wall, 1), "own_cpu_s": round(own, 1),
                "other_processes_cores": round(max(machine - own, 0.0) / wall, 2) if machine == machine else None}


def machine_info() -> dict:
    import jax

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    except OSError:
        cpu = platform.processor() or "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0], "jax": jax.__version__,
            "platform": jax.devices()[0].platform}


def git_commit() -> str | None:
    """The commit of the checkout jaxcpt runs from (with '-dirty' for uncommitted changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def build_record(*, scale: dict, table: str, runs: dict, sweeps: dict, timings: dict, load: dict,
                 reused: dict) -> dict:
    """The JSON the demo writes: its printed table, the numbers behind it, the run's time and machine."""
    from jaxcpt.report.forgetting import summarize

    numbers = {}
    for label, run_dir in runs.items():
        numbers[label] = {"loss": summarize(run_dir), "loss_ema": summarize(run_dir, "ema"),
                          "bits_per_byte": summarize(run_dir, unit="bits_per_byte")}
    return {"what": "jaxcpt demo: pretrain on 'general', continue on 'domain' without (A) and with (B) replay, "
                    "merge sweep of the base with A",
            "git_commit": git_commit(), "machine": machine_info(), "cpu_load": load, "timings_s": timings,
            "reused": reused, "scale": scale, "table": table, "runs": numbers, "merge_sweep": sweeps["linear"],
            "merge_sweep_slerp": sweeps.get("slerp")}


# ----------------------------------------------------------------------------- rendering
def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _machine_phrase(record: dict) -> str:
    machine, load = record["machine"], record["cpu_load"]
    busy = load.get("other_processes_cores")
    shared = (f"while other processes kept {busy:.1f} of its {machine['cores']} cores busy" if busy is not None
              and busy >= 0.1 else "on an otherwise quiet machine")
    return f"{machine['cores']}-core {machine['cpu']}, {shared}"


def _wrap(paragraph: str) -> str:
    """A generated paragraph wrapped like the hand-written ones (100 columns)."""
    return textwrap.fill(paragraph.strip(), width=100, break_long_words=False, break_on_hyphens=False)


def _commit(record: dict) -> str:
    commit = record.get("git_commit") or "unknown"
    return commit[:7] + (" with uncommitted changes" if commit.endswith("-dirty") else "")


def wall_time(record: dict) -> str:
    """The demo's measured wall time, e.g. '6 min 40 s' (what the README quotes)."""
    return _duration(record["timings_s"]["total"])


def _coefficient(line: str) -> float | None:
    """The t of a merge-sweep row of the printed table; None for any other line."""
    try:
        return float(line.split()[0])
    except (IndexError, ValueError):
        return None


def readme_table(record: dict) -> str:
    """The demo's printed comparison, less the run paths and the middle of the merge sweep."""
    sweep = record["merge_sweep"]
    shown = set(README_SWEEP_ROWS) | {(sweep.get("recommended") or {}).get("coefficient")}
    lines, in_sweep = [], False
    for line in record["table"].splitlines():
        if line.startswith(("A = ", "B = ", "chg = ")):
            continue
        if line.startswith("merge sweep ("):
            in_sweep = True
            line = line.split(";")[0] + ")"
        elif in_sweep and _coefficient(line) is not None and _coefficient(line) not in shown:
            continue
        lines.append(line)
    return "\n".join(lines)


def readme_block(record: dict) -> str:
    """README.md's "What the demo shows": how it was run and how long it took, the table, what it says."""
    scale, timings, reused = record["scale"], record["timings_s"], record["reused"]
    a, b = record["runs"]["no_replay"]["loss"], record["runs"]["replay"]["loss"]
    rise_a, rise_b = a["general"]["change"], b["general"]["change"]
    gain_a, gain_b = -a["domain"]["change"], -b["domain"]["change"]
    sweep, best = record["merge_sweep"], record["merge_sweep"].get("recommended")
    reuse = [what for what, flag in (("corpora and tokenizer", reused.get("data")), ("base model", reused.get("base")))
             if flag]
    head = (f"From `jaxcpt demo` at commit {_commit(record)} ({scale['pretrain_steps']} pretraining steps, "
            f"{scale['cpt_steps']} CPT steps per run) on a {_machine_phrase(record)}: {wall_time(record)} of wall time "
            f"in all and {record['cpu_load']['own_cpu_s']:.0f} CPU-seconds of its own; the base model took "
            f"{_duration(timings['pretrain'])}, each CPT run about "
            f"{_duration((timings['cpt_no_replay'] + timings['cpt_replay']) / 2)}, the merge sweep "
            f"{_duration(timings['merge_sweep'])}" + (f" ({' and '.join(reuse)} reused from an earlier run)" if reuse else "")
            + " (`benchmarks/results/demo.json`):")
    removed = 1 - rise_b / rise_a if rise_a > 0 else None
    tail = (f"Without replay the general loss rises by {rise_a:.2f} nats, with {scale['replay_weight']:.0%} replay "
            f"by {rise_b:.2f}" + (f" ({removed:.0%} of the rise removed)" if removed is not None else "") +
            f"; the domain loss falls by {gain_a:.2f} and {gain_b:.2f} nats.")
    ema = record["runs"]["replay"]["loss_ema"]
    if "domain" in ema and "general" in ema:
        tail += (f" With replay, the moving average of the weights (`ema.decay` {scale['ema_decay']:g}) ends with a "
                 f"loss {ema['domain']['last'] - b['domain']['last']:+.3f} nats from the raw weights' on domain and "
                 f"{ema['general']['last'] - b['general']['last']:+.3f} on general.")
    if best is not None:
        tail += (f" Merging the base with the no-replay model at t = {best['coefficient']:g} keeps "
                 f"{best['kept_share']:.0%} of its domain gain for a {best['general_rise']:.2f}-nat general rise, "
                 f"inside the sweep's {sweep['tolerance']:g} tolerance (replay keeps {gain_b / gain_a:.0%} of the "
                 f"gain for {rise_b:.2f}).")
    else:
        tail += f" No merge coefficient keeps the general rise within the sweep's {sweep['tolerance']:g} nats."
    return f"{_wrap(head)}\n\n```\n{readme_table(record)}\n```\n\n{_wrap(tail)}"


def merge_block(record: dict) -> str:
    """docs/merging.md: the demo's whole merge sweep as ``jaxcpt merge --sweep`` printed it, SLERP and replay beside it."""
    from jaxcpt.merge.sweep import format_table

    sweep, slerp = record["merge_sweep"], record.get("merge_sweep_slerp")
    head = (f"`jaxcpt merge --run {sweep['run']} --sweep {record['scale']['merge_coefficients']} --tolerance "
            f"{sweep['tolerance']:g}`, as the demo ran it at commit {_commit(record)} "
            f"({_duration(record['timings_s']['merge_sweep'])} on a {_machine_phrase(record)}; "
            "`benchmarks/results/demo.json`):")
    best, domain, general = sweep.get("recommended"), sweep["roles"]["domain"], sweep["roles"]["general"]
    notes = []
    if slerp is not None and best is not None:
        row = next(r for r in slerp["rows"] if r["coefficient"] == best["coefficient"])
        notes.append(f"SLERP (`--method slerp`, {_duration(record['timings_s']['merge_sweep_slerp'])}) at t = "
                     f"{best['coefficient']:g}: {domain} {row['change'][domain]:+.4f}, {general} "
                     f"{row['change'][general]:+.4f}; {row['linear_fallbacks']} of its tensors are colinear enough to "
                     "fall back to linear.")
    if best is not None:
        replay = record["runs"]["replay"]["loss"]
        notes.append(f"The {record['scale']['replay_weight']:.0%} replay run learned the domain by "
                     f"{replay[domain]['change']:+.4f} nats at a general rise of {replay[general]['change']:+.4f}; the "
                     f"merge within {sweep['tolerance']:g} nats keeps {best['kept_share']:.0%} of the no-replay run's "
                     "domain gain.")
    text = f"{_wrap(head)}\n\n```\n{format_table(sweep)}\n```"
    return text + (f"\n\n{_wrap(' '.join(notes))}" if notes else "")


RENDERERS = {"demo": readme_block, "demo-merge": merge_block}


def fill(text: str, record: dict) -> str:
    """``text`` with every demo block it has markers for rendered from ``record``."""
    for name, (begin, end) in BLOCKS.items():
        if begin in text and end in text:
            text = text.split(begin)[0] + begin + "\n" + RENDERERS[name](record) + "\n" + end + text.split(end, 1)[1]
    return text
