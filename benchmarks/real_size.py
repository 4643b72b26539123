"""Host memory, time and checkpoint bytes of a release-shaped run on this CPU host, phase by phase.

    python benchmarks/real_size.py --shape qwen2.5-0.5b          # full training of a 494M model
    python benchmarks/real_size.py --shape llama3.2-1b-lora      # LoRA on a frozen bf16 1.2B base
    python benchmarks/real_size.py --shape small                 # ~28M parameters, same structure as qwen2.5-0.5b

From a release-shaped HF directory (random bf16 weights written by transformers'
``save_pretrained``, a tokenizer built here beside them: byte-level BPE for the Qwen shapes,
sentencepiece for the Llama ones), it runs what a user runs, each command in its own process:

1. ``train``: ``jaxcpt train`` from the HF directory (batch 2 x 128), a checkpoint at step 2 written
   while step 3 runs, then SIGKILL (kill -9) once step 3 is done and the checkpoint is on disk;
2. ``resume``: the same command, which resumes from step 2 and saves step 4;
3. ``export``: ``jaxcpt export-hf`` of the run (LoRA: merged);
4. ``reload``: ``AutoModelForCausalLM.from_pretrained`` of the export and one forward pass.

Each process runs under this script's ``--child`` mode, which marks phases (start-up, HF import,
state init, first step with its compile, later steps, checkpoint save, restore, export write ...)
by wrapping the functions that do them, and resets the kernel's peak-RSS mark (``VmHWM``,
reset through ``/proc/self/clear_refs``) at each boundary: a phase's peak is exact, spikes
included, and the process's peak is the largest of its phases'. Checkpoint saves run as in a real
run: on CPU jaxcpt waits for the write (the save's phase holds Orbax's host copy of the state);
where a save is asynchronous (older code) the copy shows in the step that follows it.

The JSON in benchmarks/results/ names the git commit, the CPU and its load, and holds per phase
the peak RSS and seconds; per checkpoint item its bytes against the train state's bytes; the
export's bytes; and the bound of docs/real-size.md with the margin of each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GiB = 2**30

# Shapes: a transformers config (family, fields) and how the run trains it.
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_theta=1000000.0, tie_word_embeddings=True)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
LORA = ["model.param_dtype=bfloat16", "model.lora={rank: 16, alpha: 32}"]
SHAPES = {
    "qwen2.5-0.5b": dict(family="qwen2", config=QWEN_05B, tokenizer="bpe", train=[]),
    "llama3.2-1b-lora": dict(family="llama", config=LLAMA_1B, tokenizer="sentencepiece", train=LORA),
    # The same structures and vocabularies at 43M / 37M parameters, for the slow test and development:
    # the vocabulary table is most of the model, as import and export are where it matters.
    "small": dict(family="qwen2", config=dict(QWEN_05B, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                              num_attention_heads=4, num_key_value_heads=2),
                  tokenizer="bpe", train=[]),
    "small-lora": dict(family="llama", config=dict(LLAMA_1B, hidden_size=256, intermediate_size=1024,
                                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                                   head_dim=64),
                       tokenizer="sentencepiece", train=LORA),
}
TOKENIZER_IDS = {"bpe": dict(bos_token_id=None, eos_token_id=400, pad_token_id=400),  # tests/tokenizer_fixtures.py
                 "sentencepiece": dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)}
STEPS, KILL_AFTER = 4, 2
BESIDE_WRITE = "step beside ckpt write"  # the step after a save: where an asynchronous save's copy meets a step


# -- the stated bound (docs/real-size.md) ----------------------------------------------------
def rss_bound(state_bytes: int, param_bytes: int, baseline: int) -> int:
    """The most host memory any phase of the run may hold.

    ``baseline``: the process with jax, transformers and jaxcpt imported and nothing made.
    The train state lives in host memory on CPU (``state_bytes``: parameters, optimizer state,
    EMA); a step adds the gradients and a parameter-sized working set (``param_bytes`` each);
    an asynchronous checkpoint save stages one copy of the state in host memory until it is
    written; the rest (512 MiB) is what does not scale with the model: the data pipeline and
    tokenizer, XLA's compiler, and the bounded slice (one layer's tensor or one vocabulary
    block) import and export hold.
    """
    return baseline + 2 * state_bytes + 2 * param_bytes + 512 * 2**20


# -- child mode: one jaxcpt command with its phases marked ------------------------------------
class Phases:
    """Peak RSS (VmHWM, reset at each boundary) and seconds per phase, appended to a JSONL file."""

    def __init__(self, out: str):
        self.out = open(out, "a")
        self.name, self.t0, self.extra, self.start_rss = "startup", time.time(), {}, 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def mark(self, name: str, **extra) -> None:
        """End the current phase (record it) and start ``name``."""
        now = time.time()
        record = {"phase": self.name, "peak_rss": self._status("VmHWM"), "start_rss": self.start_rss,
                  "end_rss": self._status("VmRSS"), "seconds": round(now - self.t0, 3), **self.extra}
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the next phase's peak starts here
        self.name, self.t0, self.extra, self.start_rss = name, time.time(), extra, self._status("VmRSS")

    def around(self, name: str, fn, after: str):
        def wrapped(*args, **kwargs):
            self.mark(name)
            result = fn(*args, **kwargs)
            self.mark(after)
            return result
        return wrapped


def _state_bytes(state) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(state)))


def child(phases_file: str, kill_after: int, argv: list[str]) -> int:
    phases = Phases(phases_file)
    import jax

    from jaxcpt import cli
    from jaxcpt.hf import convert, peft_export
    from jaxcpt import open_model as open_model_lib
    from jaxcpt.train import loop, setup, state as train_state

    phases.mark("imports done")
    # train / resume
    loop.set_up = phases.around("setup", loop.set_up, "start")
    train_state.initial_params = phases.around("hf import", train_state.initial_params, "start")
    fresh_state = train_state.fresh_state

    def fresh(*args, **kwargs):
        phases.mark("state init")
        out = jax.block_until_ready(fresh_state(*args, **kwargs))
        phases.extra["state_bytes"] = _state_bytes(out)
        phases.extra["param_bytes"] = _state_bytes(out["params"])
        phases.mark("start")
        return out

    train_state.fresh_state = fresh
    restore_newest = loop.Checkpointer.restore_newest

    def restore(self, abstract, *args):
        phases.mark("restore")
        out = restore_newest(self, abstract, *args)
        jax.block_until_ready(out.state)
        phases.extra["state_bytes"] = _state_bytes(out.state)
        phases.extra["param_bytes"] = _state_bytes(out.state["params"])
        phases.mark("start")
        return out

    loop.Checkpointer.restore_newest = restore
    loop.run_eval = phases.around("eval", loop.run_eval, "loop")
    build_program = setup.build_program

    def program(*args, **kwargs):
        built = build_program(*args, **kwargs)
        step_fn, calls = built.train_step, [0]

        def step(state, batch):  # blocking, so a step's memory and time stay in its phase
            beside = saved and calls[0] == kill_after  # the async write of the step-`kill_after` save
            phases.mark("first step (compile)" if calls[0] == 0 else BESIDE_WRITE if beside else "steps")
            calls[0] += 1
            out = jax.block_until_ready(step_fn(state, batch))
            if saved and calls[0] == kill_after + 1:  # the step after the checkpoint ran beside its write
                saved[0].ckpt.wait()
                phases.mark("killed")
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9: nothing below runs, no cleanup
            return out

        built.train_step = step
        return built

    setup.build_program = program
    save, saved = loop.save, []

    def saving(run, step, force=False):
        if not force and not run.ckpt.should_save(step):
            return save(run, step, force)
        phases.mark("checkpoint save")
        save(run, step, force=True)  # on CPU the save waits for its write (jaxcpt/checkpoint.py); older code: asynchronous
        if step == kill_after:
            saved.append(run)
        phases.mark("loop")

    loop.save = saving
    loop.finish = phases.around("finish (final save)", loop.finish, "close")
    # export-hf
    open_model_lib.open_model = phases.around("load checkpoint", open_model_lib.open_model, "export")
    convert.save_hf = phases.around("export write", convert.save_hf, "exit")
    peft_export.save_peft_adapter = phases.around("export write", peft_export.save_peft_adapter, "exit")
    try:
        return cli.main(argv)
    finally:
        phases.mark("end")


def reload_child(phases_file: str, export: str) -> int:
    """transformers' own load of the export, and one forward pass that must give finite logits."""
    phases = Phases(phases_file)
    import torch
    from transformers import AutoModelForCausalLM

    phases.mark("from_pretrained")
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.bfloat16).eval()
    phases.mark("forward")
    with torch.no_grad():
        logits = model(torch.arange(16).reshape(1, 16) + 3).logits
    phases.mark("end")
    if not torch.isfinite(logits.float()).all():
        print("reloaded export gives non-finite logits", file=sys.stderr)
        return 1
    return 0


# -- the driver -------------------------------------------------------------------------------
def make_hf_dir(shape: dict, directory: Path, texts_dir: Path) -> None:
    """A random bf16 model written by transformers, with its tokenizer beside it."""
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from test_data_fixtures import make_texts, write_jsonl
    from tokenizer_fixtures import llama_style_tokenizer_dir, qwen_style_tokenizer_dir

    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[shape["family"]]
    config = config_class(**shape["config"], **TOKENIZER_IDS[shape["tokenizer"]], dtype="bfloat16")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: a float32 1B model would need 5 GB here
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    del model
    tokenizer = llama_style_tokenizer_dir() if shape["tokenizer"] == "sentencepiece" else qwen_style_tokenizer_dir()
    for file in Path(tokenizer).iterdir():
        shutil.copy(file, directory / file.name)
        (directory.parent / "tokenizer").mkdir(exist_ok=True)
        shutil.copy(file, directory.parent / "tokenizer" / file.name)
    texts_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(str(texts_dir / "domain.jsonl"), make_texts(400, seed=7, min_words=40, max_words=200))


def _du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _run_child(args: list[str], phases_file: Path, log: Path, env: dict) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "a") as out:
        rc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env).returncode
    return rc, time.time() - t0


def _read_phases(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "")
    meminfo = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()}
    return {"cpu_model": model, "cpu_count": os.cpu_count(), "load_average": os.getloadavg(),
            "mem_total": meminfo["MemTotal"], "mem_available_at_start": meminfo["MemAvailable"]}


def _commit(code: Path) -> str | None:
    """The checkout's full commit hash, with '-dirty' when it has uncommitted changes to tracked files."""
    head = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (head + ("-dirty" if dirty else "")) or None


def results_name(shape: str, commit: str | None, other_code: bool, label: str = "") -> str:
    """``real_size_SHAPE.json`` for this checkout (what docs/real-size.md quotes, re-measured on main
    after each merge); ``real_size_SHAPE_COMMIT.json`` for another checkout (``--code``, a comparison)."""
    suffix = [label] if label else [(commit or "unknown")[:7]] if other_code else []
    return "_".join(["real_size", shape, *suffix]) + ".json"


def _baseline(env: dict) -> int:
    """RSS of a process that imported what every phase imports, and did nothing else."""
    code = ("import jax, jax.numpy as jnp, transformers, orbax.checkpoint, jaxcpt.cli, jaxcpt.train.loop; "
            "jnp.zeros(1).block_until_ready(); "
            "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:')][0])")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              check=True).stdout.split()[-1])


def benchmark(shape_name: str, work: Path, separate_tokenizer: bool, extra: list[str], code: Path = REPO) -> dict:
    shape = SHAPES[shape_name]
    work.mkdir(parents=True, exist_ok=True)
    hf, run, export, texts = work / "hf", work / "run", work / "export", work / "texts"
    for path in (run, export):
        shutil.rmtree(path, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop or this host has
    result = {"shape": shape_name, "commit": _commit(code), "code": str(code), "machine": _machine(), "steps": STEPS,
              "batch": "2 x 128", "separate_tokenizer": separate_tokenizer, "overrides": extra}
    t0 = time.time()
    if not (hf / "config.json").is_file():  # in a child: torch stays out of this process's memory
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make-child", shape_name, str(hf), str(texts)],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    result["make_hf_seconds"] = round(time.time() - t0, 1)
    result["hf_bytes"] = _du(hf)
    tokenizer = [f"data.tokenizer={work / 'tokenizer'}"] if separate_tokenizer else []
    overrides = [f"run_dir={run}", "init.source=hf", f"init.path={hf}", "model.dtype=float32",
                 f"data.sources=[{{name: domain, paths: [{texts / 'domain.jsonl'}], weight: 1.0, eval_documents: 4}}]",
                 "data.seq_len=128", "data.eval_rows=2", "data.shuffle_buffer=16", "train.batch_size=2",
                 f"train.steps={STEPS}", "train.log_every=1", "train.loss_chunk_size=128", "eval.every=0",
                 f"checkpoint.every_steps={KILL_AFTER}", "export.final=false", "optim.schedule.warmup_steps=1",
                 "mesh={data: 1}", *tokenizer, *shape["train"], *extra]
    if code == REPO:  # the release vocabulary with a test-sized tokenizer: its spare rows are meant (older code lacks the key)
        overrides.append("data.tokenizer_min_vocab_fraction=0")
    phases_file, log = work / "phases.jsonl", work / "log.txt"
    phases_file.unlink(missing_ok=True)
    log.unlink(missing_ok=True)
    result["baseline_rss"] = _baseline(env)
    commands = [
        ("train", ["--child", str(phases_file), "--kill-after", str(KILL_AFTER), "--", "train", *overrides]),
        ("resume", ["--child", str(phases_file), "--", "train", *overrides]),
        ("export", ["--child", str(phases_file), "--", "export-hf", str(run), "--out", str(export)]),
        ("reload", ["--reload-child", str(phases_file), str(export)]),
    ]
    result["processes"] = []
    for name, args in commands:
        before = len(_read_phases(phases_file))
        rc, seconds = _run_child(args, phases_file, log, env)
        expected_rc = -signal.SIGKILL if name == "train" else 0
        phases = _read_phases(phases_file)[before:]
        result["processes"].append({"process": name, "rc": rc, "seconds": round(seconds, 1), "phases": phases,
                                    "peak_rss": max((p["peak_rss"] for p in phases), default=None)})
        if rc != expected_rc:
            result["error"] = f"{name} exited {rc} (expected {expected_rc}); see {log}"
            break
        if name == "train":
            step_dir = run / "checkpoints" / str(KILL_AFTER)
            result["checkpoint_items"] = {p.name: _du(p) for p in sorted(step_dir.iterdir()) if p.is_dir()}
    state_bytes = max((p.get("state_bytes", 0) for proc in result["processes"] for p in proc["phases"]), default=0)
    param_bytes = max((p.get("param_bytes", 0) for proc in result["processes"] for p in proc["phases"]), default=0)
    result.update(state_bytes=state_bytes, param_bytes=param_bytes,
                  rss_bound=rss_bound(state_bytes, param_bytes, result["baseline_rss"]))
    items = result.get("checkpoint_items", {})
    result["checkpoint_non_state_bytes"] = sum(v for k, v in items.items() if k != "state")
    result["export_bytes"] = _du(export) if export.exists() else None
    result["export_weight_bytes"] = sum(_du(p) for p in export.glob("*.safetensors")) if export.exists() else None
    result["total_seconds"] = round(time.time() - t0, 1)
    return result


def table(result: dict) -> str:
    bound = result["rss_bound"]
    lines = [f"real-size benchmark: {result['shape']} at {result['commit']} on {result['machine']['cpu_model']} "
             f"(load {result['machine']['load_average'][0]:.1f})",
             f"train state {result['state_bytes'] / GiB:.2f} GiB (params {result['param_bytes'] / GiB:.2f} GiB); "
             f"baseline RSS {result['baseline_rss'] / GiB:.2f} GiB; bound {bound / GiB:.2f} GiB",
             f"{'process':8} {'phase':24} {'peak RSS GiB':>12} {'seconds':>8}"]
    for proc in result["processes"]:
        for p in proc["phases"]:
            lines.append(f"{proc['process']:8} {p['phase']:24} {p['peak_rss'] / GiB:12.2f} {p['seconds']:8.1f}")
        lines.append(f"{proc['process']:8} {'(process peak, rc ' + str(proc['rc']) + ')':24} "
                     f"{(proc['peak_rss'] or 0) / GiB:12.2f} {proc['seconds']:8.1f}")
    lines.append("checkpoint items (step %d): " % KILL_AFTER + ", ".join(
        f"{k} {v / 2**20:.1f} MiB ({100 * v / max(result['state_bytes'], 1):.1f}% of the state)"
        for k, v in result.get("checkpoint_items", {}).items()))
    if result.get("export_bytes") is not None:
        lines.append(f"export {result['export_bytes'] / 2**20:.1f} MiB ({result['export_weight_bytes'] / 2**20:.1f} "
                     "MiB of safetensors)")
    if result.get("error"):
        lines.append("ERROR: " + result["error"])
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        rest = sys.argv[2:]
        kill_after = -1
        phases_file = rest.pop(0)
        if rest[0] == "--kill-after":
            kill_after = int(rest[1])
            rest = rest[2:]
        return child(phases_file, kill_after, rest[1:])  # rest[0] == '--'
    if len(sys.argv) > 1 and sys.argv[1] == "--make-child":
        make_hf_dir(SHAPES[sys.argv[2]], Path(sys.argv[3]), Path(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--reload-child":
        return reload_child(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--work", default=None, help="working directory (default: /tmp/jaxcpt-real-size-SHAPE); "
                                                     "the HF directory made there is reused")
    parser.add_argument("--separate-tokenizer", action="store_true",
                        help="set data.tokenizer to a tokenizer-only copy instead of reading it from the HF directory")
    parser.add_argument("--label", default="", help="suffix of the results file name (default: none for this "
                                                    "checkout, the commit for --code)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="results directory")
    parser.add_argument("--keep", action="store_true", help="keep the run and export directories")
    parser.add_argument("--code", default=str(REPO), help="the jaxcpt checkout to measure (e.g. another commit's "
                                                          "worktree, for a comparison); default: this one")
    parser.add_argument("overrides", nargs="*", help="extra jaxcpt train overrides")
    args = parser.parse_args()
    work = Path(args.work or f"/tmp/jaxcpt-real-size-{args.shape}")
    result = benchmark(args.shape, work, args.separate_tokenizer, args.overrides, Path(args.code).resolve())
    print(table(result))
    out = Path(args.out) / results_name(args.shape, result["commit"], Path(args.code).resolve() != REPO, args.label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        for path in (work / "run", work / "export"):
            shutil.rmtree(path, ignore_errors=True)
    return 1 if result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
