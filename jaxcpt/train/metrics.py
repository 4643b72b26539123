"""What a run reports: FLOPs and MFU, metrics.jsonl + TensorBoard, and the progress line."""

from __future__ import annotations

import json
import math
import time

import jax
from etils import epath

from jaxcpt.errors import UserError
from jaxcpt.model import expert_lora
from jaxcpt.model.config import ModelConfig

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched against jax's device_kind.
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "H100": 989e12,  # SXM; PCIe parts are slower, so MFU there reads low
    "H200": 989e12,
    "A100": 312e12,
}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of ``device`` (default: the first), or None where unknown (CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return None
    kind = device.device_kind
    for name in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # longest match first ('TPU v5 lite' before 'TPU v5')
        if name.lower() in kind.lower():
            return PEAK_BF16_FLOPS[name]
    return None


def flops_per_token(cfg: ModelConfig, seq_len: int, frozen_projections: bool = False) -> float:
    """Training FLOPs per token: 6 x matmul weights + attention scores and values.

    Matmul weights are the projections of every layer and the output projection, with its
    vocabulary padding (those columns are computed, then masked); the input embedding is a
    lookup, and norms and biases are not matmuls. Attention adds 6 x 2 x L x H x D x T per
    token (QK^T and PV, forward and backward), counted for the full T x T square, not halved
    for causality nor cut by sliding windows: the convention of the PaLM paper's MFU, which
    most stacks report.

    An MoE model counts its active parameters: the router and top_k experts per token, not all experts. A
    hybrid's Gated DeltaNet layers count their own projections and the chunked delta rule
    (``LinearAttentionConfig.mixer_flops_per_token``, x3 for the backward) in place of attention.

    ``frozen_projections`` (a LoRA run training its adapters only): the layers' projections get
    no weight gradient, so they count 4x (forward and input gradient), the adapters 6x.
    """
    e, f, d, h, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_size, cfg.num_heads, cfg.num_kv_heads
    q_heads = 2 * h if cfg.attn_output_gate else h  # Qwen3.5's full layers project a gate beside each query
    attention_projections = e * d * (q_heads + 2 * k) + h * d * e  # q, k, v, o
    per_layer = attention_projections + 3 * e * f  # and gate, up, down
    if cfg.moe is not None:  # active parameters: the router and the top_k experts each token runs through
        per_layer = attention_projections + cfg.moe.params_per_layer(e)[1]
        per_layer += 3 * e * f if cfg.moe.beside_mlp else 0  # Gemma 4: the dense MLP runs beside the experts
    projections, head = cfg.num_layers * per_layer, e * cfg.padded_vocab_size
    # LoRA on experts: a token runs through its top_k experts' adapters only (jaxcpt.model.expert_lora)
    adapters = cfg.num_adapter_params() - expert_lora.num_params(cfg) + expert_lora.num_params(cfg, active=True)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len
    if cfg.linear_layers:  # Qwen3.5: a Gated DeltaNet layer has its mixer's projections and delta rule instead
        lin, linear = cfg.linear_attention, len(cfg.linear_layers)
        projections += linear * (lin.matmul_params(e) - attention_projections)
        attention = (12 * len(cfg.attention_layers) * cfg.num_heads * cfg.head_size * seq_len
                     + 3 * linear * lin.mixer_flops_per_token(cfg.delta_rule_chunk_size))
    if cfg.mla is not None:  # DeepSeek-V3: the layers' active weights (jaxcpt.model.mla), q.k and p.v widths apart
        projections = cfg.num_active_params() - e * cfg.padded_vocab_size * (1 if cfg.tie_word_embeddings else 2) - e
        attention = 6 * cfg.num_layers * cfg.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) * seq_len
    if frozen_projections:
        return 4 * projections + 6 * (head + adapters) + attention
    return 6 * (projections + head + adapters) + attention


class MetricsWriter:
    """Appends one JSON object per record to RUN/metrics.jsonl and mirrors scalars to TensorBoard.

    Only the process that writes shared files (process 0) should create one.
    """

    def __init__(self, run_dir: epath.Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step, kind = record["step"], record["kind"]
            for key, value in _flatten(record).items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def read_metrics_file(path: epath.Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a torn last line (with a warning naming it).

    A node that crashes or a disk that fills mid-write leaves the last line cut short; it
    holds a record of a step the resume replays anyway, so it is dropped. A damaged line
    that is not the last is not a torn write: that is an error naming the file and line.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if any(rest.strip() for rest in lines[number:]):
                raise UserError(f"{path} line {number} is not JSON ({e}); only a torn last line is skipped. Remove "
                                "or repair that line (the records are one JSON object per line)") from e
            message = (f"{path} line {number}: a torn last record ({len(line)} characters, not JSON: {e}), left by "
                       "a write that did not finish (a node crash or a full disk); skipped")
            print(f"warning: {message}", flush=True)
    return records


def write_metrics_file(path: epath.Path, records: list[dict]) -> None:
    """Replace ``path`` whole with ``records`` (a crash leaves the old file or the new one, never a mix)."""
    from jaxcpt.train.storage import write_atomically

    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))


def truncate_metrics(run_dir: epath.Path, after_step: int) -> None:
    """Drop records past ``after_step`` (a resume replays those steps; keep each step once)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    records = read_metrics_file(path)
    write_metrics_file(path, [record for record in records if record["step"] <= after_step])


def set_aside_metrics(run_dir: epath.Path, checkpoint_dir: epath.Path) -> epath.Path | None:
    """A fresh start in a run directory that already holds metrics: move them aside, never delete them.

    They are either the records of an attempt that crashed before its first checkpoint, or a
    finished run's whose checkpoints this launch does not see (a typo in checkpoint.directory):
    the second must not lose its history. Returns where they went (None when there were none).
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists() or not path.read_text().strip():
        return None
    aside = run_dir / f"metrics.before-fresh-start-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    path.rename(aside)
    last = max((r.get("step", 0) for r in read_metrics_file(aside)), default=0)
    print(f"warning: {path} held records up to step {last}, but {checkpoint_dir} has no checkpoint, so this run starts "
          f"fresh; the old records are kept in {aside}. If you meant to resume that run, stop this one and set "
          "checkpoint.directory to where its checkpoints are (see RUN/config.yaml of that run)", flush=True)
    return aside


def read_metrics(run_dir) -> list[dict]:
    return read_metrics_file(epath.Path(run_dir) / "metrics.jsonl")


class Progress:
    """A concise line per log interval: step, loss, lr, tokens/s, MFU and ETA."""

    def __init__(self, total_steps: int, start_step: int):
        self.total = total_steps
        self.start_step = start_step
        self.start = time.monotonic()

    def line(self, step: int, loss: float, lr: float, tokens_per_s: float, mfu: float | None) -> str:
        done = step - self.start_step
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        mfu_text = f" | MFU {100 * mfu:4.1f}%" if mfu is not None else ""
        return (f"step {step:>{len(str(self.total))}}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{_si(tokens_per_s)} tok/s{mfu_text} | ETA {_duration(eta)}")


def _si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
