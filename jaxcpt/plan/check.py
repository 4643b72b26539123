"""``jaxcpt plan check SWEEP RUN_DIR``: the loop closed. A finished run against the prediction it was planned from.

``plan fit --write-config`` appends the prediction to SWEEP/predictions.json (law, ratio,
budget, predicted general rise and domain loss, their leave-one-out uncertainty). ``plan
check`` then

1. refuses a run that was not trained from the sweep's config (same config and overrides,
   up to the mixture weights, ``train.steps``, the run directory, checkpoints and exports);
2. finds the prediction for the run's replay ratio and budget (the latest one written);
3. prints predicted against measured for the general-loss rise and the domain loss, and says
   whether each lies within the uncertainty the fit reported;
4. adds the run to the sweep (SWEEP/sweep.json), so the next ``plan fit`` fits it too.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path

import yaml

from jaxcpt.errors import UserError
from jaxcpt.plan.heldout import uncertainty_words
from jaxcpt.plan.sweep import MANIFEST, SweepSpec, finished, load_manifest, set_mixture

PREDICTIONS = "predictions.json"
# Keys a planned run may differ in from the sweep's config without being another experiment.
_FREE_KEYS = ("run_dir", "train.steps", "checkpoint.", "export.")


def _read_predictions(sweep: Path) -> list[dict]:
    path = sweep / PREDICTIONS
    return json.loads(path.read_text()) if path.is_file() else []


def record_prediction(sweep: Path, fit: dict, rec, config_path: Path, steps: int | None) -> dict:
    """Append what ``plan fit --write-config`` predicted for the config it wrote; returns the record."""
    manifest = load_manifest(sweep)
    per_step = {r["tokens_per_step"] for r in manifest["runs"].values()}
    planned_steps = steps if steps is not None else (round(rec.tokens / per_step.pop()) if len(per_step) == 1 else None)
    record = {"law": fit["law"], "law_asked": fit["law_asked"], "fit_json": fit["fit_json"],
              "config": str(Path(config_path).resolve()), "replay": round(rec.replay, 4), "steps": planned_steps,
              "tokens": rec.tokens, "params": rec.params, "allowed_rise": rec.allowed_rise,
              "extrapolated": rec.extrapolated, "base_general_loss": fit["base_general_loss"],
              "predicted": {"general_rise": rec.general_rise, "general_loss": rec.general_loss,
                            "domain_loss": rec.domain_loss},
              "uncertainty": fit["uncertainty"],
              "determination": (fit.get("determination") or {}).get("message"),
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    record["id"] = hashlib.sha1(json.dumps(record, sort_keys=True, default=float).encode()).hexdigest()[:10]
    predictions = _read_predictions(sweep) + [record]
    (sweep / PREDICTIONS).write_text(json.dumps(predictions, indent=1, default=float))
    return record


def _flat(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
    elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        for i, value in enumerate(tree):
            name = value.get("name", i) if isinstance(value, dict) else i
            out.update(_flat(value, f"{prefix}{name}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _run_replay(run_cfg: dict, manifest: dict) -> float:
    weights = {s["name"]: float(s.get("weight", 1.0)) for s in run_cfg["data"]["sources"]}
    general, domain = manifest["general"], manifest["domain"]
    if general not in weights or domain not in weights:
        raise UserError(f"the run has no sources named '{general}' and '{domain}' (it has {sorted(weights)}), so it "
                        "was not trained from this sweep's config")
    total = sum(weights.values())
    if abs(weights[general] + weights[domain] - total) > 1e-6 * max(total, 1.0):
        raise UserError("the run mixes other sources besides the sweep's general and domain; it has no single replay "
                        f"ratio to check ({weights})")
    return weights[general] / total


def check_same_setup(run_dir: Path, manifest: dict, replay: float, steps: int) -> None:
    """A clear error when ``run_dir`` was trained from another config than the sweep's (up to the free keys)."""
    from jaxcpt.config import apply_overrides, read_yaml
    from jaxcpt.train.config import config_as_yaml_dict, load_train_config

    spec = SweepSpec(config=manifest["config"], overrides=manifest["overrides"], ratios=[], steps=[], sizes={},
                     general=manifest["general"], domain=manifest["domain"])
    raw = apply_overrides(read_yaml(spec.config), spec.overrides)
    set_mixture(raw, spec, replay)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(yaml.safe_dump(raw, sort_keys=False))
        f.flush()
        expected = _flat(config_as_yaml_dict(load_train_config(f.name, [f"train.steps={steps}"])))
    actual = _flat(yaml.safe_load((run_dir / "config.yaml").read_text()))
    differ = [k for k in sorted(set(expected) | set(actual))
              if not k.startswith(_FREE_KEYS) and not k.endswith(".weight") and expected.get(k) != actual.get(k)]
    if differ:
        shown = "; ".join(f"{k} is {expected.get(k)!r} in the sweep's config and {actual.get(k)!r} in the run"
                          for k in differ[:4])
        raise UserError(f"'{run_dir}' was not trained from the sweep's config ({manifest['config']} with its "
                        f"overrides): {shown}{' ...' if len(differ) > 4 else ''}. Check the run you meant (train the "
                        "config plan fit --write-config wrote), or sweep that setup")


def check_run(sweep: Path, run_dir: Path, *, add: bool = True, law: str | None = None) -> dict:
    """Compare a finished run with its prediction, print it, and add the run to the sweep."""
    from jaxcpt.plan.sweep import _observation
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.state import resolve_model_config

    sweep, run_dir = Path(sweep), Path(run_dir).resolve()
    manifest = load_manifest(sweep)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"'{run_dir}' is not a run directory (no config.yaml); give the directory `jaxcpt train` "
                        "wrote for the planned config")
    cfg = load_train_config(str(run_dir / "config.yaml"))
    steps = cfg.train.steps
    if not finished(run_dir, steps):
        raise UserError(f"'{run_dir}' has not finished its {steps} steps (summary.json); check it when it has")
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    replay = _run_replay(run_cfg, manifest)
    check_same_setup(run_dir, manifest, replay, steps)
    tokens = steps * cfg.train.batch_size * cfg.data.seq_len
    model_cfg = resolve_model_config(cfg)
    params = model_cfg.num_params()  # N of the laws: the total; an MoE model's active count is recorded beside it
    name = f"checked-s{steps}-r{round(replay, 4):g}"
    entry = {"size": "checked", "steps": steps, "replay": replay, "config": str(run_dir / "config.yaml"),
             "run_dir": str(run_dir), "tokens": tokens, "params": params,
             "active_params": model_cfg.num_active_params(),
             "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len, "added_by": "plan check"}
    observed = _observation(name, entry, manifest["general"], manifest["domain"], run_dir)
    matches = [p for p in _read_predictions(sweep)
               if abs(p["replay"] - replay) < 5e-4 and abs(p["tokens"] - tokens) <= 1e-9 * tokens
               and (law is None or p["law"] == law)]
    prediction = matches[-1] if matches else None
    rise = observed.general_loss - observed.base_general_loss
    lines = [f"run {run_dir}: replay {replay:g}, {steps} steps ({tokens:,} tokens)"
             + (f"; {model_cfg.describe_params()}" if model_cfg.moe is not None else "")]
    result = {"run": str(run_dir), "replay": replay, "steps": steps, "tokens": tokens,
              "measured": {"general_rise": rise, "general_loss": observed.general_loss,
                           "domain_loss": observed.domain_loss, "base_general_loss": observed.base_general_loss},
              "prediction": prediction}
    if prediction is None:
        lines.append(f"no prediction in {sweep / PREDICTIONS} for replay {replay:g} at this budget (plan fit "
                     "--write-config records one); only the measurement is reported")
    else:
        pred, unc = prediction["predicted"], prediction["uncertainty"]
        g_err = rise - pred["general_rise"]
        d_err = observed.domain_loss - pred["domain_loss"]
        lines += [f"planned by {prediction['fit_json']} (law {prediction['law']}, prediction {prediction['id']})",
                  f"  general rise: predicted {pred['general_rise']:+.4f}, measured {rise:+.4f}",
                  f"  domain loss:  predicted {pred['domain_loss']:.4f}, measured {observed.domain_loss:.4f}",
                  "  " + uncertainty_words(g_err, unc.get("general_rise"), "general rise"),
                  "  " + uncertainty_words(d_err, unc.get("domain_loss"), "domain loss")]
        within_tolerance = rise <= prediction["allowed_rise"] + 1e-12
        lines.append(f"  the measured rise is {'within' if within_tolerance else 'OVER'} the tolerance "
                     f"({prediction['allowed_rise']:.4f})")
        result.update(error={"general_rise": g_err, "domain_loss": d_err}, within_tolerance=within_tolerance,
                      within_uncertainty={k: (None if unc.get(k) is None else abs(e) <= unc[k] + 1e-12)
                                          for k, e in (("general_rise", g_err), ("domain_loss", d_err))})
        entry["planned_by"] = prediction["id"]
    if add:
        manifest["runs"][name] = entry
        (sweep / MANIFEST).write_text(json.dumps(manifest, indent=1))
        lines.append(f"added to {sweep} as '{name}': the next `jaxcpt plan fit {sweep}` fits it too "
                     f"({len(manifest['runs'])} runs)")
    print("\n".join(lines), flush=True)
    result["added_as"] = name if add else None
    return result
