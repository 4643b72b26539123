"""Mixture sweep: merge base and CPT model at several coefficients and measure what each keeps and forgets.

Each coefficient's merged model is written as an HF directory (temporary unless kept),
loaded with ``load_hf`` and evaluated on the run's held-out sources exactly as the
training loop evaluates (same eval batches, same ``eval_step``), so coefficient 0 and 1
reproduce the run's own step-0 and final eval losses when base and model are the run's
start and end.

The result (``sweep.json``) is laid out for ``jaxcpt report``::

    {"kind": "jaxcpt.merge_sweep", "version": 1, "method": "linear", "base": ..., "model": ...,
     "run": RUN or null, "roles": {"general": NAME, "domain": NAME}, "tolerance": nats,
     "sources": [names], "tokens": {source: evaluated tokens},
     "rows": [{"coefficient": c, "loss": {source: nats}, "change": {source: loss - loss at c=0},
               "domain_gain": loss_domain(0) - loss_domain(c), "general_rise": loss_general(c) - loss_general(0),
               "within_tolerance": bool, "linear_fallbacks": int, "merged_dir": path or null, ...}],
     "recommended": {"coefficient": c, "domain_gain": .., "general_rise": .., "kept_share": ..} or null,
     "run_eval": {source: {"step0": loss, "last": loss, "last_step": N}} or null}

``change`` uses the run report's convention (negative = learned, positive = forgotten)
against coefficient 0, which is the run's step-0 model when the base is the run's init.
Other measurements plug in through ``extra_evaluators`` (name -> function of the merged
HF directory returning {metric: value}); each row then carries ``row[name]``. That is
where downstream harness scores go once an lm-eval adapter exists.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path
from typing import Callable

from jaxcpt.errors import UserError
from jaxcpt.merge.core import merge_models
from jaxcpt.merge.inputs import ModelInput
from jaxcpt.merge.methods import Linear, Slerp

SWEEP_METHODS = {"linear": Linear, "slerp": Slerp}


def parse_coefficients(text: str) -> list[float]:
    """'0,0.25,1' or '0,0.1,...,1' (an arithmetic progression from the first two values to the last)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        if "..." in parts:
            if parts.index("...") != 2 or len(parts) != 4:
                raise ValueError
            first, second, last = float(parts[0]), float(parts[1]), float(parts[3])
            step = second - first
            if step <= 0 or last < first:
                raise ValueError
            count = int(round((last - first) / step))
            if not math.isclose(first + count * step, last, abs_tol=1e-9):
                raise ValueError
            values = [round(first + k * step, 10) for k in range(count + 1)]
        else:
            values = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"--sweep '{text}' is not a list like '0,0.25,0.5,1' or '0,0.1,...,1'") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise UserError(f"--sweep '{text}': coefficients must lie in [0, 1] (0 = base, 1 = the CPT model)")
    return sorted(set(values) | {0.0})  # 0 is the reference every change is measured against


class HeldOutLoss:
    """Loss per held-out source of an HF directory, computed as the training loop computes its eval."""

    def __init__(self, cfg, *, batch_size: int | None = None, mesh_axes: dict | None = None):
        import jax

        from jaxcpt.data.pipeline import build_eval_batches
        from jaxcpt.sharding.mesh import build_mesh
        from jaxcpt.sharding.rules import logical_to_spec, make_rules
        from jaxcpt.train.evaluate import global_batch

        self.cfg = cfg
        self.mesh = build_mesh(mesh_axes)
        self.rules = make_rules()
        batch_size = batch_size or cfg.train.batch_size
        batch_devices = math.prod(self.mesh.shape[a] for a in _axes(logical_to_spec(("batch",), self.rules, dict(self.mesh.shape))))
        if batch_size % (batch_devices * jax.process_count()):
            raise UserError(f"eval batch size {batch_size} is not a multiple of the {batch_devices} devices the batch is "
                            "split over; pass --batch-size or --mesh")
        self.batches = build_eval_batches(_data_config(cfg), batch_size=batch_size // jax.process_count(),
                                          seq_len=cfg.data.seq_len)
        if not self.batches:
            raise UserError("the config's data sources have no held-out split (eval_documents or eval_fraction); "
                            "the sweep has nothing to evaluate on")
        self.sources = list(self.batches)
        batch_sharding = jax.sharding.NamedSharding(self.mesh, logical_to_spec(("batch", "length"), self.rules, dict(self.mesh.shape)))
        source_sharding = jax.sharding.NamedSharding(self.mesh, logical_to_spec(("batch",), self.rules, dict(self.mesh.shape)))
        self._to_global = functools.partial(global_batch, sharding=batch_sharding, source_sharding=source_sharding)
        self._eval_fn = None

    def __call__(self, directory: Path) -> dict[str, dict]:
        """{source: {'loss', 'perplexity', 'tokens'}} of the HF model in ``directory``."""
        import jax

        from jaxcpt.hf.convert import load_hf
        from jaxcpt.model.persist import params_of
        from jaxcpt.train.config import NUMERICS_FIELDS
        from jaxcpt.train.evaluate import evaluate
        from jaxcpt.train.state import graphdef_of
        from jaxcpt.train.step import eval_step

        numerics = {name: getattr(self.cfg.model, name) for name in NUMERICS_FIELDS}
        dtype, param_dtype = numerics.pop("dtype"), numerics.pop("param_dtype")
        model = load_hf(directory, mesh=self.mesh, dtype=dtype, param_dtype=param_dtype, rules=self.rules, **numerics)
        with jax.set_mesh(self.mesh):
            if self._eval_fn is None:  # one graph for every coefficient: compiled once
                graphdef = graphdef_of(model.config, self.rules)
                self._eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef, chunk_size=self.cfg.train.loss_chunk_size))
            return evaluate(self._eval_fn, params_of(model), self.batches, self._to_global)


def _axes(spec) -> list[str]:
    out = []
    for entry in spec:
        out.extend([entry] if isinstance(entry, str) else list(entry or ()))
    return out


def _data_config(cfg):
    """The data config as the training loop reads it (an HF init path doubles as the tokenizer)."""
    import dataclasses

    if not cfg.data.tokenizer and cfg.init.source == "hf":
        return dataclasses.replace(cfg.data, tokenizer=cfg.init.path)
    return cfg.data


def check_roles(sources: list[str], general: str, domain: str) -> None:
    missing = [f"'{name}' (--{role})" for role, name in (("general", general), ("domain", domain)) if name not in sources]
    if missing:
        raise UserError(f"the held-out sources are {', '.join(sources)}; there is no source {' or '.join(missing)}. "
                        "Name the general (replayed, must not be forgotten) source with --general and the domain "
                        "(new) source with --domain")
    if general == domain:
        raise UserError(f"--general and --domain are both '{general}'; name two different sources")


def recommend(rows: list[dict], tolerance: float) -> dict | None:
    """The row that keeps the most domain gain among those whose general rise is within ``tolerance``.

    Ties go to the smaller coefficient (closer to the base). None when no row qualifies.
    """
    allowed = [r for r in rows if r["within_tolerance"]]
    if not allowed:
        return None
    return max(allowed, key=lambda r: (r["domain_gain"], -r["coefficient"]))


def build_rows(results: dict[float, dict[str, float]], general: str, domain: str, tolerance: float) -> list[dict]:
    """Rows of the sweep from {coefficient: {source: loss}}; coefficient 0 is the reference."""
    reference = results[0.0]
    rows = []
    for c in sorted(results):
        loss = results[c]
        rise = loss[general] - reference[general]
        rows.append({"coefficient": c, "loss": dict(loss), "change": {s: loss[s] - reference[s] for s in loss},
                     "domain_gain": reference[domain] - loss[domain], "general_rise": rise,
                     "within_tolerance": rise <= tolerance})
    return rows


def run_sweep(base: ModelInput, model: ModelInput, method: str, coefficients: list[float], evaluator: HeldOutLoss,
              out_dir: Path, *, general: str = "general", domain: str = "domain", tolerance: float = 0.05,
              keep: bool = False, dtype: str | None = None, run_dir: str | None = None,
              extra_evaluators: dict[str, Callable[[Path], dict]] | None = None, log=print) -> dict:
    """Evaluate the merge at each coefficient; write OUT/sweep.json and OUT/sweep.png; return the JSON dict."""
    if tolerance < 0:
        raise UserError(f"--tolerance {tolerance}: the allowed rise of the general loss must be >= 0 nats")
    check_roles(evaluator.sources, general, domain)
    out_dir.mkdir(parents=True, exist_ok=True)
    losses: dict[float, dict[str, float]] = {}
    extras: dict[float, dict] = {}
    fallbacks: dict[float, int] = {}
    tokens: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix=".merge-sweep-", dir=out_dir) as scratch:
        for c in coefficients:
            target = out_dir / f"t_{c:g}" if keep else Path(scratch) / f"t_{c:g}"
            merged = merge_models(base, [model], SWEEP_METHODS[method](t=c), target, dtype=dtype, overwrite=True)
            results = evaluator(target)
            losses[c] = {name: r["loss"] for name, r in results.items()}
            tokens = {name: r["tokens"] for name, r in results.items()}
            fallbacks[c] = merged.linear_fallbacks
            extras[c] = {name: fn(target) for name, fn in (extra_evaluators or {}).items()}
            log(f"t={c:g}: " + "  ".join(f"{name} {loss:.4f}" for name, loss in losses[c].items()))
    rows = build_rows(losses, general, domain, tolerance)
    for row in rows:
        c = row["coefficient"]
        row["linear_fallbacks"] = fallbacks[c]
        row["merged_dir"] = str(out_dir / f"t_{c:g}") if keep else None
        row.update(extras[c])
    best = recommend(rows, tolerance)
    full_gain = next((r["domain_gain"] for r in rows if r["coefficient"] == 1.0), None)
    result = {
        "kind": "jaxcpt.merge_sweep", "version": 1, "method": method, "base": str(base.path), "model": str(model.path),
        "run": run_dir, "roles": {"general": general, "domain": domain}, "tolerance": tolerance,
        "sources": list(losses[0.0]), "tokens": tokens, "rows": rows,
        "recommended": None if best is None else {
            "coefficient": best["coefficient"], "domain_gain": best["domain_gain"], "general_rise": best["general_rise"],
            "kept_share": best["domain_gain"] / full_gain if full_gain and full_gain > 0 else None},
        "run_eval": _run_eval(run_dir) if run_dir else None,
    }
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2))
    plot(result, out_dir / "sweep.png")
    return result


def _run_eval(run_dir: str) -> dict | None:
    """The run's own step-0 and last eval loss per source (from metrics.jsonl), for comparison."""
    from jaxcpt.report.forgetting import summarize

    try:
        summary = summarize(run_dir)
    except UserError:
        return None
    return {name: {"step0": s["start"], "last": s["last"], "last_step": s["last_step"]} for name, s in summary.items()}


def format_table(result: dict) -> str:
    general, domain = result["roles"]["general"], result["roles"]["domain"]
    sources = [domain, general] + [s for s in result["sources"] if s not in (general, domain)]
    lines = [f"merge sweep ({result['method']}): t=0 is {result['base']}, t=1 is {result['model']}",
             f"{'t':>5} " + " ".join(f"{s[:12]:>12} {'chg':>8}" for s in sources) + f"  within {result['tolerance']:g}"]
    for row in result["rows"]:
        cells = " ".join(f"{row['loss'][s]:>12.4f} {row['change'][s]:>+8.4f}" for s in sources)
        lines.append(f"{row['coefficient']:>5g} {cells}  {'yes' if row['within_tolerance'] else 'no'}")
    lines.append(f"chg = loss - loss at t=0 (nats/token): negative = learned, positive = forgotten; "
                 f"tolerance = allowed rise of '{general}'")
    run_eval, by_t = result.get("run_eval"), {r["coefficient"]: r for r in result["rows"]}
    if run_eval and 1.0 in by_t and all(s in run_eval for s in result["sources"]):
        gaps = [abs(by_t[t]["loss"][s] - run_eval[s][key]) for t, key in ((0.0, "step0"), (1.0, "last")) for s in result["sources"]]
        last_step = run_eval[result["sources"][0]]["last_step"]
        lines.append(f"the run's own eval (step 0 and step {last_step}) differs from t=0 and t=1 by at most {max(gaps):.2e} "
                     "nats (zero when base and model are where the run started and ended)")
    best = result["recommended"]
    if best is None:
        lines.append(f"no coefficient keeps '{general}' within {result['tolerance']:g} nats of the base")
    else:
        kept = f" ({100 * best['kept_share']:.0f}% of the gain at t=1)" if best["kept_share"] is not None else ""
        lines.append(f"recommended: t={best['coefficient']:g}: '{domain}' loss {-best['domain_gain']:+.4f}{kept}, "
                     f"'{general}' loss {best['general_rise']:+.4f} (tolerance {result['tolerance']:g})")
    return "\n".join(lines)


def plot(result: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    general, domain = result["roles"]["general"], result["roles"]["domain"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    xs, ys = [r["general_rise"] for r in rows], [r["domain_gain"] for r in rows]
    ax.plot(xs, ys, "-o", markersize=4, label=f"{result['method']} merge")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r['coefficient']:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axvline(result["tolerance"], linestyle="--", color="gray", label=f"tolerance {result['tolerance']:g}")
    if result["recommended"] is not None:
        best = result["recommended"]
        ax.plot([best["general_rise"]], [best["domain_gain"]], "*", markersize=14, color="C3",
                label=f"recommended t={best['coefficient']:g}")
    ax.set_xlabel(f"rise of '{general}' loss over the base (nats/token)")
    ax.set_ylabel(f"drop of '{domain}' loss below the base (nats/token)")
    ax.set_title("Merge sweep: domain gain against forgetting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(out_png))
    plt.close(fig)
