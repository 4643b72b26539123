"""``jaxcpt compile --config C.yaml --topology v5p-64 [KEY=VALUE ...]``: will this run fit on that TPU slice?

Compiles exactly the train step the run would execute, for the named TPU topology, on
any host (libtpu from ``pip install 'jaxcpt[tpu-compile]'`` is the compiler; no TPU is
needed), and prints per-chip memory against the chip's HBM, the layout and the compile
time. Exit status: 0 when the step fits every topology given, 1 when it does not (with
what to change), 2 for a config or install error.

The model's shapes come from ``init.path``'s config.json as in a run; where that
directory is not on this host, ``--model-config FILE`` names a config.json, or
``--architecture NAME`` one of the public architectures in jaxcpt.aot.architectures
(found automatically when ``init.path`` ends in its name, e.g. /mnt/models/Llama-3.1-8B).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (see configs/); omitted = all defaults")
    parser.add_argument("--topology", required=True,
                        help="TPU slice(s), comma-separated: v5p-64, v4-32, v5litepod-16 (= v5e-16), v6e-8, "
                             "2xv5p-64 (two slices), v5p:4x4x12 (explicit chip shape); or NVIDIA GPU nodes: "
                             "h100-8, h200-8, b200-8, 2xh100-8 (two nodes), h100-1 (docs/gpu.md)")
    parser.add_argument("--num-slices", type=int, default=None, help="slices of each topology (overrides an Nx prefix)")
    parser.add_argument("--model-config", default=None,
                        help="an HF config.json (or a directory holding one) giving the architecture")
    parser.add_argument("--architecture", default=None,
                        help="a named public architecture instead: Llama-3.1-8B, Llama-3.2-1B, Qwen2.5-7B")
    parser.add_argument("--explore", action="store_true",
                        help="also compile the step under every remat policy and print memory against recomputation "
                             "(docs/accelerators.md), and, when it does not fit, each suggested change")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the reports as JSON")
    parser.add_argument("--no-layout", action="store_true", help="do not print the parameter/activation layout")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.batch_size=512")


def resolve_model(cfg, model_config: str | None, architecture: str | None):
    """(ModelConfig, where its architecture came from): numerics always from the config's ``model``."""
    from jaxcpt.aot.architectures import architecture as named, find_architecture
    from jaxcpt.errors import UserError
    from jaxcpt.train.config import NUMERICS_FIELDS
    from jaxcpt.train.state import resolve_model_config

    numerics = {name: getattr(cfg.model, name) for name in NUMERICS_FIELDS}
    if model_config:
        from jaxcpt.hf.convert import read_hf_config

        path = Path(model_config)
        if path.is_file():
            path = path.parent if path.name == "config.json" else _single_config_dir(path)
        return dataclasses.replace(read_hf_config(path), **numerics), f"{model_config}"
    if architecture:
        return dataclasses.replace(named(architecture), **numerics), f"architecture {architecture}"
    if cfg.init.source == "scratch":
        return cfg.model, "the config's model section (init.source=scratch)"
    if cfg.init.source == "hf" and not (Path(cfg.init.path or "") / "config.json").is_file():
        found = find_architecture(cfg.init.path)
        if found is None:
            raise UserError(f"init.path '{cfg.init.path}' has no config.json on this host; name the architecture with "
                            "--model-config path/to/config.json or --architecture (Llama-3.1-8B, Llama-3.2-1B, "
                            "Qwen2.5-7B)")
        return (dataclasses.replace(named(found), **numerics),
                f"architecture {found} (init.path {cfg.init.path} is not on this host)")
    return resolve_model_config(cfg), f"init.path {cfg.init.path}"


def _single_config_dir(path: Path) -> Path:
    """read_hf_config reads DIR/config.json; a differently named file is copied into a temporary DIR."""
    import tempfile

    directory = Path(tempfile.mkdtemp(prefix="jaxcpt-model-config-"))
    (directory / "config.json").write_text(path.read_text())
    return directory


def run(args) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # this host only compiles; never start a local TPU runtime
    from jaxcpt.aot.topology import compiler_versions, parse_topologies
    from jaxcpt.train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    topologies = parse_topologies(args.topology, args.num_slices)
    model_cfg, source = resolve_model(cfg, args.model_config, args.architecture)
    compilers = compiler_versions(topologies)  # {"libtpu": ...} and/or the CUDA plugin's packages
    print(f"jaxcpt compile: {args.config or '(defaults)'} {' '.join(args.overrides)}".rstrip())
    print(f"model shapes from {source}; " + ", ".join(f"{k} {v}" for k, v in compilers.items()), flush=True)

    reports, all_fit = [], True
    for topology in topologies:
        result, fits = _compile_and_report(cfg, model_cfg, topology, args, show_layout=not args.no_layout)
        all_fit &= fits
        if args.explore:
            result["remat"] = _explore_remat(args, topology)
        reports.append(result)
    if len(topologies) > 1:
        print("\n" + _table(reports))
    if args.json:
        _write_json(Path(args.json), args, source, compilers, reports)
    return 0 if all_fit else 1


def _compile_and_report(cfg, model_cfg, topology, args, show_layout: bool):
    from jaxcpt.aot.compiler import compile_train_step

    print(f"\n== {topology.name}", flush=True)
    result = compile_train_step(cfg, model_cfg, topology)
    print(result.describe())
    if show_layout:
        print(result.program.layout)
    print(result.memory.format())
    entry = result.as_dict()
    if not result.memory.fits:
        entry["levers"] = _advise(cfg, result, args)
    return entry, result.memory.fits


def _explore_remat(args, topology) -> list[dict]:
    """Every remat policy compiled for ``topology``, printed as a table; the rows as dicts."""
    from jaxcpt.aot.explore import explore_remat, format_table
    from jaxcpt.errors import UserError
    from jaxcpt.train.config import load_train_config

    print(f"\n== remat policies on {topology.name} (compiling each; --explore)", flush=True)

    def one(row):
        print(f"  {row.policy:<20} {row.total_bytes / 2**30:8.2f} GiB per chip"
              f"{' (refused)' if row.refused else ''}, {'fits' if row.fits else 'does not fit'}, "
              f"reruns {row.recompute_fraction:.1%} of the step's FLOPs", flush=True)

    def load(extra):
        return load_train_config(args.config, [*args.overrides, *extra])

    try:
        rows = explore_remat(load, lambda c: resolve_model(c, args.model_config, args.architecture)[0], topology,
                             on_row=one)
    except UserError as e:
        print(f"  cannot compile every policy: {e}")
        return []
    print(format_table(rows, topology.generation.hbm_bytes))
    return [{**dataclasses.asdict(row), "recompute_fraction": row.recompute_fraction} for row in rows]


def _advise(cfg, result, args) -> list[dict]:
    from jaxcpt.aot.compiler import compile_train_step, logits_chunk_bytes
    from jaxcpt.aot.memory import levers
    from jaxcpt.errors import UserError
    from jaxcpt.sharding.rules import logical_to_spec
    from jaxcpt.train.config import load_train_config

    program = result.program
    spec = logical_to_spec(("batch",), program.rules, dict(program.mesh.shape))
    axes = spec[0] if len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    ways = math.prod(program.mesh.shape[a] for a in axes)
    found = levers(result.memory, remat=program.model_cfg.remat, grad_accum_steps=cfg.optim.grad_accum_steps,
                   micro_batch=program.micro_batch, batch_ways=ways, loss_chunk_size=cfg.train.loss_chunk_size,
                   seq_len=program.seq_len, logits_chunk_bytes=logits_chunk_bytes(result, cfg.train.loss_chunk_size),
                   mesh_shape=dict(program.mesh.shape), sharded_state_bytes=result.sharded_state_bytes)
    print(f"does not fit: {result.memory.total / 2**30:.2f} GiB per chip needed, {result.memory.hbm / 2**30:.0f} GiB "
          "available. What would lower it:")
    out = []
    for lever in found:
        line = f"  - {' '.join(lever.overrides) or '(no override)'}: {lever.why}"
        entry = {"overrides": list(lever.overrides), "why": lever.why}
        if args.explore and lever.overrides:
            try:
                trial_cfg = load_train_config(args.config, [*args.overrides, *lever.overrides])
                trial_model, _ = resolve_model(trial_cfg, args.model_config, args.architecture)
                trial = compile_train_step(trial_cfg, trial_model, result.topology)
                entry["total_bytes"] = trial.memory.total
                line += (f"\n      compiled: {trial.memory.total / 2**30:.2f} GiB per chip "
                         f"({'fits' if trial.memory.fits else 'still does not fit'})")
            except UserError as e:
                line += f"\n      cannot compile: {e}"
        print(line, flush=True)
        out.append(entry)
    if not args.explore:
        print("  (--explore compiles each of these and prints its exact memory)")
    return out


def _table(reports: list[dict]) -> str:
    header = f"{'topology':<14} {'chips':>6} {'mesh':<24} {'state':>10} {'temps':>10} {'total':>10} {'HBM':>7}  fits  compile"
    lines = ["per chip, GiB:", header]
    for r in reports:
        m = r["memory"]
        mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
        lines.append(f"{r['topology']:<14} {r['chips']:>6} {mesh:<24} {m['state_bytes'] / 2**30:>10.2f} "
                     f"{m['temporaries_bytes'] / 2**30:>10.2f} {m['total_bytes'] / 2**30:>10.2f} "
                     f"{m['hbm_bytes'] / 2**30:>7.0f}  {'yes' if m['fits'] else 'NO ':<4}  {r['compile_s']:.0f} s")
    return "\n".join(lines)


def git_commit() -> str | None:
    """The commit of the jaxcpt checkout this runs from, None outside git; '+dirty' when the code or configs
    differ from it (recorded results and docs do not change what compiles)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                "jaxcpt", "configs"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def _write_json(path: Path, args, source: str, compilers: dict, reports: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = report_payload(args.config, args.overrides, source, compilers, reports)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


def report_payload(config: str | None, overrides: list[str], source: str, compilers: dict, reports: list[dict]) -> dict:
    """The JSON `jaxcpt compile --json` writes (and benchmarks/compile_configs.py records): the reports with
    the code's git commit, the versions and the machine."""
    import platform

    import jax

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"benchmark": "compile", "config": config, "overrides": list(overrides), "architecture": source,
            "git_commit": git_commit(), "jax": jax.__version__, **compilers,
            "machine": {"host": platform.node(), "cpu": cpu, "cpu_count": os.cpu_count(), "loadavg": os.getloadavg()},
            "reports": reports}
