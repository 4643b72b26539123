"""The ``jaxcpt`` command: subcommands only, each implemented in the module named below.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their command runs, so ``jaxcpt --help`` stays fast and a command
never pays for another's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("jaxcpt.train.command", "train (or resume) a run from a YAML config with dotted overrides"),
    "import-hf": ("jaxcpt.hf.command_import", "convert a Hugging Face checkpoint directory into a jaxcpt checkpoint"),
    "export-hf": ("jaxcpt.hf.command_export", "write a jaxcpt checkpoint as a Hugging Face directory transformers can load"),
    "tokenize": ("jaxcpt.data.command", "pre-tokenize a source into shards once, for reuse across runs"),
    "plot-schedule": ("jaxcpt.optim.command", "draw a config's learning-rate schedule to a PNG and print its phase boundaries"),
    "compile": ("jaxcpt.aot.command", "compile a config's train step for a TPU topology on this host: per-chip memory, fit, layout"),
    "train-tokenizer": ("jaxcpt.adapt.command_train_tokenizer",
                        "train a tokenizer on configured data sources (sentencepiece or byte-level BPE)"),
    "extend-vocab": ("jaxcpt.adapt.command_extend_vocab",
                     "add new tokens to a model's tokenizer and embeddings (old ids and encodings kept)"),
    "expand-depth": ("jaxcpt.adapt.command_expand_depth",
                     "insert identity-initialised copies of decoder blocks (LLaMA-Pro block expansion)"),
    "upcycle": ("jaxcpt.adapt.command_upcycle",
                "turn a dense Llama/Mistral/Qwen2/Qwen3 model into an MoE model (Mixtral/Qwen-MoE) of the same function"),
    "plan": ("jaxcpt.plan.command", "plan a CPT run: token budget per source, proxy sweeps, mixture-law fits of the replay ratio"),
    "merge": ("jaxcpt.merge.command", "merge a base model with CPT models (linear, SLERP, task arithmetic), or sweep the mixture on held-out data"),
    "evaluate": ("jaxcpt.eval.command", "run lm-eval harness tasks (built-in or your own YAML) on a run, checkpoint or HF directory"),
    "long-context-tasks": ("jaxcpt.eval.long_context", "write passkey and multi-needle retrieval tasks of chosen lengths and depths as lm-eval tasks"),
    "report": ("jaxcpt.report.command", "print the forgetting report of one run, or compare two runs"),
    "demo": ("jaxcpt.demo", "the built-in continual-pretraining demo: pretrain, continue with and without replay, compare"),
    "decontaminate": ("jaxcpt.data.decontaminate", "n-gram overlap of the training sources with held-out and eval.downstream sets"),
    "config-reference": ("jaxcpt.config_reference", "print the reference of every config key, generated from the dataclasses"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxcpt", description="Continual pretraining of LLMs in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _skip_tpu_runtime_off_tpu() -> None:
    """With libtpu installed (jaxcpt[tpu-compile], the test extra) on a host without TPU chips or a
    GPU plugin, jax would start the TPU runtime at every command, which prints a screen of failed
    TPU metadata lookups before falling back to the CPU. Ask for the CPU directly; ``jaxcpt
    compile`` still reaches libtpu (``get_topology_desc`` loads it on its own). An explicit
    JAX_PLATFORMS always wins. Must run before jax is imported.
    """
    import importlib.util
    import os

    from jaxcpt.aot.gpu import gpus_attached
    from jaxcpt.aot.topology import tpu_chips_attached

    if "JAX_PLATFORMS" in os.environ or tpu_chips_attached():
        return
    gpu_plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm6_plugin", "jax_rocm7_plugin")
    gpu_plugin = any(importlib.util.find_spec(name) for name in gpu_plugins)
    # A GPU plugin without a GPU (jaxcpt[gpu-compile] on a CPU host) fails its CUDA/cuDNN checks at start-up
    # and prints a traceback before the CPU fallback, as libtpu does: the same answer for both.
    if (gpu_plugin and gpus_attached()) or (importlib.util.find_spec("libtpu") is None and not gpu_plugin):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            import difflib

            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            print(f"jaxcpt: unknown command '{argv[0]}'{hint}", file=sys.stderr)
            parser.print_help(sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    _skip_tpu_runtime_off_tpu()
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"jaxcpt {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return _run_command(name, module, args)


def _run_command(name: str, module, args) -> int:
    """``module.run(args)``, its errors printed as one line (UserError) or a traceback; on several hosts a
    failure on this one stops every host (``jaxcpt.sharding.failures``) and this never returns."""
    from jaxcpt.errors import UserError
    from jaxcpt.exit_codes import EXIT_OK, EXIT_STOPPED_EARLY, EXIT_USER_ERROR
    from jaxcpt.sharding import failures

    error: BaseException | None = None
    try:
        code = int(module.run(args) or 0)
    except UserError as e:
        print(f"jaxcpt {name}: error: {e}", file=sys.stderr)
        error, code = e, EXIT_USER_ERROR
    except BaseException as e:  # noqa: BLE001 - on one host Python's own report; on several, every host stops
        if not failures.watching() or (isinstance(e, SystemExit) and not e.code):
            raise
        failures.wait_if_stopping()  # a collective broken by another host's exit: that host's error is the news
        import traceback

        traceback.print_exc()
        error, code = e, (e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else failures.exit_code_for(e))
    if code not in (EXIT_OK, EXIT_STOPPED_EARLY):
        failures.fail_everywhere(error or f"jaxcpt {name} exited with code {code}", code)
    return code


if __name__ == "__main__":
    sys.exit(main())
