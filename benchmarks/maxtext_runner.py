"""MaxText's own training loop on jaxcpt's benchmark shape, one step at a time, for interleaving.

MaxText (``pip install maxtext``, Python >= 3.12) runs in its own virtual environment, so it
runs as a child process: its ``maxtext.trainers.pre_train.train`` with synthetic data and the
benchmark's shape as config overrides. The child is stopped (SIGSTOP) between steps and
continued (SIGCONT) for one step at a time, so its steps interleave with the other
frameworks' in the same minutes of machine load; a step's time is from SIGCONT to MaxText's
next ``completed step`` line. MaxText logs each step once the next one is dispatched, so a
measured interval covers one step of compute, shifted by the dispatch.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time

STEP_LINE = re.compile(r"completed step: (\d+), seconds: ([\d.]+).*?loss: ([\d.]+)")


class MaxTextRunner:
    def __init__(self, python: str, cfg, args, timeout_s: float = 3600.0):
        import tempfile

        base = subprocess.check_output(
            [python, "-c", "import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))"],
            text=True).strip()
        version = subprocess.check_output([python, "-c", "import maxtext.version as v, jax; print(v.__version__, jax.__version__)"],
                                          text=True).split()
        self.timeout_s = timeout_s
        self.workdir = tempfile.mkdtemp(prefix="maxtext-bench-")
        remat = {"none": "minimal_with_context", "minimal": "minimal", "full": "full"}[args.remat]
        self.overrides = [
            "run_name=bench", f"base_output_directory={self.workdir}", "hardware=cpu", "dataset_type=synthetic",
            "skip_jax_distributed_system=true",  # one process: no XPK-style CPU cluster to join
            f"steps={args.warmup + args.steps + 3}", f"per_device_batch_size={args.batch}",
            f"max_target_length={args.seq_len}", f"base_emb_dim={cfg.hidden_size}",
            f"base_num_query_heads={cfg.num_heads}", f"base_num_kv_heads={cfg.num_kv_heads}",
            f"base_mlp_dim={cfg.intermediate_size}", f"base_num_decoder_layers={cfg.num_layers}",
            f"head_dim={cfg.head_size}", f"vocab_size={cfg.vocab_size}", "decoder_block=llama2",
            f"dtype={cfg.dtype}", "weight_dtype=float32", "attention=dot_product", f"remat_policy={remat}",
            "enable_checkpointing=false", "enable_tensorboard=false", "opt_type=adamw", "adam_b1=0.9", "adam_b2=0.95",
            "adam_weight_decay=0.1", "learning_rate=1e-4", "log_period=1000000",
        ]
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # MaxText's venv, not this checkout's packages
        self.proc = subprocess.Popen([python, "-u", "-m", "maxtext.trainers.pre_train.train", base, *self.overrides],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=self.workdir, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.own_seconds: list[float] = []
        self.info = {"maxtext": version[0], "jax": version[1], "python": python, "remat_policy": remat,
                     "attention": "dot_product", "overrides": self.overrides,
                     "how": "MaxText's train loop in a child process, SIGSTOPped between steps",
                     "timing": "mean"}
        self._next_step()  # step 0 includes compilation; then wait stopped
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def _read(self):
        for line in self.proc.stdout:
            self.log.append(line)
            match = STEP_LINE.search(line)
            if match:
                self.lines.put((int(match.group(1)), float(match.group(2)), float(match.group(3))))
        self.lines.put(None)

    def _next_step(self) -> float:
        try:
            item = self.lines.get(timeout=self.timeout_s)
        except queue.Empty:
            raise RuntimeError("MaxText printed no step within the timeout") from None
        if item is None:
            tail = "".join(self.log[-30:])
            raise RuntimeError(f"MaxText exited (status {self.proc.wait()}) before the step; its last output:\n{tail}")
        step, seconds, loss = item
        self.own_seconds.append(seconds)
        return loss

    def step(self) -> float:
        os.killpg(self.proc.pid, signal.SIGCONT)
        try:
            return self._next_step()
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGSTOP)

    def close(self) -> dict:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        time.sleep(0.1)
        return {"maxtext_own_step_seconds": self.own_seconds[1:]}
