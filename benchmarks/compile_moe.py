"""Compile an MoE train step for a TPU or GPU topology and record its memory plan *and its collectives*.

`jaxcpt compile` reports memory; for expert parallelism what matters as much is what the step moves
between chips (the expert weights, or the tokens), so this also reads the compiled HLO's collectives
(jaxcpt/aot/collectives.py) into the JSON. Qwen3-30B-A3B at seq 4096 on v5p-64 (docs/moe.md):

    python benchmarks/compile_moe.py --topology v5p-64 \\
        --json benchmarks/results/compile_qwen3-30b-a3b-v5p64.json \\
        "mesh={expert: 8, fsdp: 4}" model.dtype=bfloat16 model.remat=full data.seq_len=4096 \\
        train.batch_size=32 train.loss_chunk_size=1024

(--config defaults to configs/tiny.yaml and --model-config to benchmarks/architectures/qwen3-30b-a3b.config.json;
run it with PYTHONPATH pointing at another checkout to record that code's program.) A 30B compile takes
~10 minutes and a few GiB of host memory on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only; never start a local TPU runtime
ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--model-config", default=str(ROOT / "benchmarks" / "architectures" / "qwen3-30b-a3b.config.json"))
    parser.add_argument("--topology", required=True, help="one topology: v5p-64, h100-8 ...")
    parser.add_argument("--json", default=None, help="write the report (with collectives) here")
    parser.add_argument("--hlo", default=None, help="also write the compiled HLO text here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from jaxcpt.aot import memory
    from jaxcpt.aot.command import report_payload, resolve_model
    from jaxcpt.aot.compiler import compile_train_step
    from jaxcpt.aot.topology import compiler_versions, parse_topologies
    from jaxcpt.train.config import load_train_config

    # this checkout's HLO reader, whichever checkout compiles (another one may predate it)
    import importlib.util

    spec = importlib.util.spec_from_file_location("collectives", ROOT / "jaxcpt" / "aot" / "collectives.py")
    reader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reader)

    # compile_train_step keeps only XLA's memory plan; catch the compiled program on its way there
    captured = {}
    from_compiled = memory.MemoryReport.from_compiled.__func__

    def keep_text(cls, compiled, *rest):
        captured["hlo"] = compiled.as_text()
        return from_compiled(cls, compiled, *rest)

    memory.MemoryReport.from_compiled = classmethod(keep_text)

    cfg = load_train_config(args.config, args.overrides)
    (topology,) = parse_topologies(args.topology)
    model_cfg, source = resolve_model(cfg, args.model_config, None)
    compilers = compiler_versions([topology])
    result = compile_train_step(cfg, model_cfg, topology)
    print(result.describe())
    print(result.memory.format())
    entry = result.as_dict()
    if "hlo" in captured:
        summary = reader.summarize(reader.collectives(captured["hlo"]))
        print(reader.format_summary(summary))
        entry["collectives"] = summary
        if args.hlo:
            Path(args.hlo).write_text(captured["hlo"])
    if args.json:
        config = os.path.relpath(args.config, ROOT) if Path(args.config).is_absolute() else args.config
        payload = report_payload(config, args.overrides, os.path.relpath(source, ROOT) if Path(source).exists()
                                 else source, compilers, [entry])
        import jaxcpt

        payload["jaxcpt_source"] = str(Path(jaxcpt.__file__).resolve().parents[1])  # the checkout that compiled
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if result.memory.fits else 1


if __name__ == "__main__":
    sys.exit(main())
