"""Harness tasks as a run's downstream evaluation: ``eval.downstream`` and ``jaxcpt evaluate``.

Held-out loss shows forgetting early; papers judge a CPT run by benchmark scores before and
after. ``eval.downstream`` runs lm-eval tasks (built-in ones, or a directory of your own
YAML + data files) at step 0 and every ``every`` steps, on the raw weights and, when kept,
their moving average, and logs one number per task and metric to metrics.jsonl and
TensorBoard::

    eval:
      downstream:
        tasks: [arc_easy, my_domain_qa]
        include_path: /data/eval_tasks       # my_domain_qa.yaml lives here
        limit: 500                           # examples per task (null = all)
        every: 2000

Every host runs every request (the model spans them all); process 0 records the scores.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from jaxcpt.config import ConfigError, field

log = logging.getLogger("jaxcpt.eval")


@dataclasses.dataclass(frozen=True)
class DownstreamConfig:
    tasks: list[str] = field([], help="lm-eval task (or group) names; empty = no downstream evaluation")
    include_path: str = field("", help="a directory of your own lm-eval task YAMLs (and their data), searched first")
    limit: int | None = field(None, help="examples per task (null = all; a small number for frequent in-run checks)")
    num_fewshot: int | None = field(None, help="few-shot examples (null = each task's default)")
    every: int = field(0, help="run every N steps (and always at step 0 and at the end); 0 = only those")
    batch_size: int = field(8, help="rows per scoring batch (each batch shape compiles once)")
    max_length: int | None = field(None, help="longest context, in tokens (null = the model's max_position_embeddings)")
    max_gen_toks: int = field(256, help="tokens to generate at most, for generation tasks")
    seed: int = field(1234, help="seed of the harness's few-shot sampling")

    @property
    def enabled(self) -> bool:
        return bool(self.tasks)

    def due(self, step: int, last_step: int) -> bool:
        if not self.enabled:
            return False
        if step == 0 or step == last_step:
            return True
        return bool(self.every) and step % self.every == 0

    def validate(self) -> None:
        if self.enabled:
            require_harness("eval.downstream")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"eval.downstream.limit must be >= 1 or null, got {self.limit}")
        if self.every < 0 or self.batch_size < 1 or self.max_gen_toks < 1:
            raise ConfigError("eval.downstream.every must be >= 0, batch_size and max_gen_toks >= 1")


def require_harness(what: str) -> None:
    """Stop before any work when lm-eval, an optional dependency, is not installed."""
    import importlib.util

    from jaxcpt.errors import UserError

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"{what} runs EleutherAI's lm-evaluation-harness, which is not installed; "
                        "install it with: pip install 'jaxcpt[eval]'")


def task_manager(include_path: str = ""):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path or None)


def check_tasks(cfg: DownstreamConfig, manager) -> None:
    """Every name in ``cfg.tasks`` is a task or group the harness knows (a ConfigError otherwise)."""
    unknown = [t for t in cfg.tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {unknown}; check the names, or set eval.downstream.include_path "
                          "(jaxcpt evaluate --include-path) to the directory that holds their YAML")


def run_tasks(lm, cfg: DownstreamConfig, manager=None, *, log_samples: bool = False) -> dict:
    """The harness's results dict for ``cfg.tasks`` on ``lm`` (a ``JaxcptLM``)."""
    import lm_eval

    manager = manager or task_manager(cfg.include_path)
    check_tasks(cfg, manager)
    return lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=cfg.limit,
                                   task_manager=manager, log_samples=log_samples, random_seed=cfg.seed,
                                   numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed,
                                   fewshot_random_seed=cfg.seed, bootstrap_iters=0)


def scores(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a results dict: the numbers worth a curve (no stderr, no aliases)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            if "," not in key:  # metrics are 'name,filter' ('acc,none'); 'alias', 'sample_len' ... are not
                continue
            name, filter_name = key.split(",", 1)
            name = name if filter_name == "none" else f"{name}/{filter_name}"
            if name.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            values[name] = float(value)
        if values:
            out[task] = values
    return out
