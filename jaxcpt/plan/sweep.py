"""Proxy sweeps: short ordinary runs over replay ratios, budgets and model sizes, resumable.

    SWEEP/sweep.json          what the sweep is (config, overrides, which source is general/domain) and its runs
    SWEEP/configs/NAME.yaml   each run's full config: `jaxcpt train --config SWEEP/configs/NAME.yaml` reruns it
    SWEEP/runs/NAME/          each run's ordinary run directory (metrics.jsonl, checkpoints/, summary.json)

A run is named ``SIZE-sSTEPS-rRATIO``. The replay ratio ``r`` is the general source's weight
and the domain source gets ``1 - r``; any other source is given weight 0, and the mixture is
fixed (a config with ``data.stages`` is refused: a staged mixture has no single ratio).
Rerunning the same command resumes: a run whose ``summary.json`` reached its steps is done and
skipped; an interrupted one restarts ``train``, which resumes from its latest checkpoint
(so proxy configs should keep ``checkpoint.every_steps`` small enough to be worth resuming).
Proxy runs write no HF export unless the overrides ask for one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import yaml

from jaxcpt.config import apply_overrides, read_yaml
from jaxcpt.errors import UserError
from jaxcpt.plan.laws import Observation

MANIFEST = "sweep.json"
# Defaults for proxy runs, applied under the user's overrides: proxies need no exports.
_PROXY_DEFAULTS = ["export.final=false", "export.hf_every=0"]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    config: str
    overrides: list[str]
    ratios: list[float]
    steps: list[int]
    sizes: dict[str, list[str]]  # size name -> dotted overrides
    general: str = "general"
    domain: str = "domain"


def parse_size(text: str) -> tuple[str, list[str]]:
    """'small:model.hidden_size=256,model.num_layers=4' -> ('small', ['model.hidden_size=256', ...])."""
    name, sep, rest = text.partition(":")
    if not sep or not name or not all(c.isalnum() or c in "_.-" for c in name):
        raise UserError(f"--size {text!r} must look like NAME:key=value,key=value (NAME of letters, digits, _.-)")
    overrides = [o for o in rest.split(",") if o.strip()]
    if any("=" not in o for o in overrides):
        raise UserError(f"--size {text!r}: each override must be key=value")
    return name, overrides


def run_name(size: str, steps: int, ratio: float) -> str:
    return f"{size}-s{steps}-r{ratio:g}"


def set_mixture(raw: dict, spec: SweepSpec, ratio: float) -> list[str]:
    """Set the sources' weights in ``raw`` for ``ratio``; returns notes about what was changed."""
    data = raw.get("data") or {}
    sources = data.get("sources") or []
    names = [s.get("name") for s in sources if isinstance(s, dict)]
    for role, name, flag in (("general (replay)", spec.general, "--general"), ("domain", spec.domain, "--domain")):
        if name not in names:
            raise UserError(f"the {role} source '{name}' is not among the config's sources {names}; name it with "
                            f"{flag} NAME")
    if spec.general == spec.domain:
        raise UserError(f"--general and --domain name the same source '{spec.general}'")
    if data.get("stages"):
        raise UserError("the config has data.stages, so its mixture changes during the run and has no single "
                        "replay ratio; sweep a fixed mixture (add the override data.stages=[])")
    notes = []
    for source in sources:
        if source["name"] == spec.general:
            source["weight"] = ratio
        elif source["name"] == spec.domain:
            source["weight"] = 1.0 - ratio
        elif source.get("weight", 1.0):
            source["weight"] = 0.0
            notes.append(f"source '{source['name']}' gets weight 0 in the sweep (only general and domain are mixed)")
    return notes


def run_config(spec: SweepSpec, out: Path, size: str, steps: int, ratio: float) -> tuple[dict, list[str]]:
    """The full raw config of one proxy run, and notes on what the sweep changed in it."""
    raw = apply_overrides(read_yaml(spec.config), _PROXY_DEFAULTS)
    raw = apply_overrides(raw, [*spec.overrides, *spec.sizes[size]])
    notes = set_mixture(raw, spec, ratio)
    if (raw.get("checkpoint") or {}).get("directory"):
        notes.append("checkpoint.directory is cleared: each proxy run keeps its checkpoints in its run directory")
    raw = apply_overrides(raw, [f"run_dir={out / 'runs' / run_name(size, steps, ratio)}", f"train.steps={steps}",
                                "checkpoint.directory=''"])
    return raw, notes


def _check_eval_splits(cfg, spec: SweepSpec) -> None:
    for source in cfg.data.sources:
        if source.name in (spec.general, spec.domain) and not source.has_eval_split:
            raise UserError(f"source '{source.name}' has no held-out split, so the sweep cannot measure its loss; "
                            "set eval_documents (or eval_fraction) on it")


def finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("step") == steps
    except ValueError:
        return False


def _manifest(spec: SweepSpec, out: Path) -> dict:
    identity = {"config": str(Path(spec.config).resolve()), "overrides": spec.overrides,
                "general": spec.general, "domain": spec.domain}
    path = out / MANIFEST
    if path.is_file():
        manifest = json.loads(path.read_text())
        old = {k: manifest.get(k) for k in identity}
        if old != identity:
            changed = sorted(k for k in identity if old[k] != identity[k])
            raise UserError(f"'{out}' holds a sweep of another setup ({', '.join(changed)} differ); "
                            "resume it with the same --config, overrides, --general and --domain, or choose a new --out")
        return manifest
    return {**identity, "runs": {}}


def run_sweep(spec: SweepSpec, out: Path, *, dry_run: bool = False, train_fn: Callable | None = None) -> dict:
    """Run (or resume) every run of ``spec`` under ``out``; returns the manifest."""
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.state import resolve_model_config

    bad = [r for r in spec.ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise UserError(f"--ratios must lie in [0, 1] (the general source's share), got {bad}")
    if any(s < 1 for s in spec.steps):
        raise UserError(f"--steps must be >= 1, got {spec.steps}")
    interior = sorted({r for r in spec.ratios if 0.0 < r < 1.0})
    if len(interior) < 2:
        raise UserError(f"--ratios has {len(interior)} ratio(s) strictly between 0 and 1 ({interior}); every law needs "
                        "at least 2 (the CMR law 3, and 4 to measure its error by leave-one-out), e.g. "
                        "--ratios 0,0.05,0.1,0.25,0.5, or --ratios auto")
    out.mkdir(parents=True, exist_ok=True)
    (out / "configs").mkdir(exist_ok=True)
    manifest = _manifest(spec, out)
    plan = [(size, steps, ratio) for size in spec.sizes for steps in spec.steps for ratio in spec.ratios]
    notes = set()
    for size, steps, ratio in plan:  # write and check every config before training anything
        name = run_name(size, steps, ratio)
        raw, changed = run_config(spec, out, size, steps, ratio)
        notes.update(changed)
        path = out / "configs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        cfg = load_train_config(str(path))
        _check_eval_splits(cfg, spec)
        model_cfg = resolve_model_config(cfg)
        manifest["runs"][name] = {
            "size": size, "steps": steps, "replay": ratio, "config": str(path), "run_dir": cfg.run_dir,
            "tokens": steps * cfg.train.batch_size * cfg.data.seq_len,
            "params": model_cfg.num_params(),  # N of the laws: the stored (total) parameters
            "active_params": model_cfg.num_active_params(),  # per token; less than params for an MoE model
            "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        }
        if model_cfg.moe is not None:
            notes.add(f"size {size} is a mixture of experts: {model_cfg.describe_params()}; the laws' N is the "
                      "total (the manifest records both: params, active_params)")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for note in sorted(notes):
        print(f"note: {note}", flush=True)
    if dry_run:
        for size, steps, ratio in plan:
            print(f"  {run_name(size, steps, ratio)}: {manifest['runs'][run_name(size, steps, ratio)]['config']}")
        return manifest
    if train_fn is None:
        from jaxcpt.train.loop import train as train_fn
    for i, (size, steps, ratio) in enumerate(plan, 1):
        name = run_name(size, steps, ratio)
        run = manifest["runs"][name]
        if finished(Path(run["run_dir"]), steps):
            print(f"[{i}/{len(plan)}] {name}: done, skipped", flush=True)
            continue
        resuming = (Path(run["run_dir"]) / "checkpoints").is_dir()
        print(f"[{i}/{len(plan)}] {name}: replay {ratio:g}, {steps} steps" + (" (resuming)" if resuming else ""),
              flush=True)
        summary = train_fn(load_train_config(run["config"]))
        if summary.get("stopped_by_signal"):  # preempted: the run saved a checkpoint; the rest waits for a rerun
            print(f"{name}: stopped by a signal after saving a checkpoint; rerun the same command to resume",
                  flush=True)
            return manifest
    print(f"sweep done: {len(plan)} runs in {out}; fit it with `jaxcpt plan fit {out} --law cmr`", flush=True)
    return manifest


def load_manifest(out: Path) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise UserError(f"'{out}' is not a sweep directory (no {MANIFEST}); make one with `jaxcpt plan sweep`")
    return json.loads(path.read_text())


def collect(out: Path) -> tuple[list[Observation], list[str]]:
    """Observations of the finished runs, and the names of runs not finished (left out)."""
    manifest = load_manifest(out)
    general, domain = manifest["general"], manifest["domain"]
    observations, unfinished = [], []
    for name, run in sorted(manifest["runs"].items()):
        run_dir = Path(run["run_dir"])
        if not run_dir.is_dir():  # a relative path from another working directory, or a moved sweep
            run_dir = Path(out) / "runs" / name
        if not finished(run_dir, run["steps"]):
            unfinished.append(name)
            continue
        observations.append(_observation(name, run, general, domain, run_dir))
    return observations, unfinished


def _observation(name: str, run: dict, general: str, domain: str, run_dir: Path) -> Observation:
    """One finished run's final and step-0 held-out losses of the general and domain sources."""
    from jaxcpt.report.forgetting import eval_curves

    curves = eval_curves(run_dir)
    missing = [s for s in (general, domain) if s not in curves]
    if missing:
        raise UserError(f"run '{name}' has no evaluation of {missing}; its sources need held-out splits")
    first = {s: dict(curves[s]).get(0) for s in (general, domain)}
    if None in first.values():
        raise UserError(f"run '{name}' has no step-0 evaluation, so its base losses are unknown")
    return Observation(run=name, replay=run["replay"], tokens=float(run["tokens"]), params=float(run["params"]),
                       general_loss=curves[general][-1][1], domain_loss=curves[domain][-1][1],
                       base_general_loss=first[general], base_domain_loss=first[domain])
