"""Compile a run's train step for a TPU topology: the same ``TrainProgram`` training builds.

``compile_train_step(cfg, model_cfg, topology)`` builds the mesh from the topology's devices
and ``jaxcpt.train.setup.build_program`` on it (every sharding, remat policy, attention
kernel, loss chunking and accumulation the run uses), lowers and compiles the step with
the TPU compiler, and returns XLA's memory plan with the sharding's prediction.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
from jax.sharding import Mesh

from jaxcpt.aot.memory import MemoryReport, per_device_bytes, replicated_bytes
from jaxcpt.aot.topology import Topology
from jaxcpt.model.config import ModelConfig
from jaxcpt.sharding.mesh import build_mesh, describe_mesh
from jaxcpt.sharding.rules import check_rules, make_rules
from jaxcpt.sharding import layout as layout_lib
from jaxcpt.train.config import TrainConfig
from jaxcpt.train.setup import TrainProgram, build_program



@dataclasses.dataclass
class CompileResult:
    topology: Topology
    mesh: Mesh
    hosts: int
    program: TrainProgram
    memory: MemoryReport
    pallas_kernels: int  # Pallas TPU kernel calls in the lowered step (splash attention: forward, dq, dkv)
    sharded_state_bytes: int  # per chip, the part of params + optimizer state that is split over devices
    lower_s: float
    compile_s: float

    def describe(self) -> str:
        m = self.program.model_cfg
        attention = f"{m.attention}" + (f" ({self.pallas_kernels} {self.topology.kernel_label} calls lowered)"
                                        if self.pallas_kernels else "")
        return "\n".join([
            f"topology     {self.topology.describe(self.hosts)}",
            f"mesh         {describe_mesh(self.mesh)}",
            f"batch        {self.program.batch_size} rows x {self.program.seq_len} tokens, micro-batches of "
            f"{self.program.micro_batch} rows",
            f"model        {m.num_layers} layers, width {m.hidden_size}, {m.describe_params(1e9, 'B', digits=2)}, "
            f"compute {m.dtype}, remat {m.remat}, attention {attention}",
            f"compile      lowered in {self.lower_s:.1f} s, compiled in {self.compile_s:.1f} s",
        ])

    def as_dict(self) -> dict:
        return {"topology": self.topology.name, "topology_name": self.topology.topology_name,
                "num_slices": self.topology.num_slices, "chips": self.topology.num_chips, "hosts": self.hosts,
                "mesh": dict(self.mesh.shape), "batch_size": self.program.batch_size,
                "seq_len": self.program.seq_len, "micro_batch": self.program.micro_batch,
                "remat": self.program.model_cfg.remat, "attention": self.program.model_cfg.attention,
                "pallas_kernel_calls": self.pallas_kernels, "memory": self.memory.as_dict(),
                "lower_s": self.lower_s, "compile_s": self.compile_s}


def compile_train_step(cfg: TrainConfig, model_cfg: ModelConfig, topology: Topology) -> CompileResult:
    devices = topology.devices()  # TPU (libtpu) or GPU (jax's CUDA plugin), compile-only
    mesh = build_mesh(cfg.mesh, devices=devices)
    rules = make_rules(cfg.sharding_rules)
    check_rules(rules, mesh)
    hosts = len({d.process_index for d in devices})
    # build_program checks the split against this process's host count (1 here); the pod's counts.
    layout_lib.check_batch_split(cfg.train.batch_size, cfg.optim.grad_accum_steps, mesh, rules, hosts)
    program = build_program(cfg, model_cfg, mesh, rules, max(1, len(cfg.data.sources)))
    start = time.perf_counter()
    # traced under the topology's mesh: the model reads the platform (splash, no CPU matmul trick) from it;
    # the topology answers the kernels' tracing-time checks (cuDNN version, compute capability) for its target
    with topology.lowering_checks():
        lowered = program.lower_train_step()
    lower_s = time.perf_counter() - start
    pallas = lowered.as_text().count(topology.kernel_call)
    state, batch = program.abstract_state(), program.abstract_batch()
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
        memory = MemoryReport.from_compiled(compiled, state, batch, topology.hbm_bytes)
        # cuDNN attention on a multi-GPU mesh is a custom_partitioning call until GSPMD partitions it
        pallas = max(pallas, compiled.as_text().count(topology.kernel_call))
    except jax.errors.JaxRuntimeError as e:  # far too large: XLA:TPU stops at its own HBM check
        memory = MemoryReport.from_refusal(str(e), state, batch, topology.hbm_bytes)
        if memory is None:
            raise
    compile_s = time.perf_counter() - start
    state_only = {"params": state["params"], "opt_state": state["opt_state"]}
    sharded = per_device_bytes(state_only) - replicated_bytes(state_only)
    return CompileResult(topology, mesh, hosts, program, memory, pallas, sharded, lower_s, compile_s)


def logits_chunk_bytes(result: CompileResult, loss_chunk_size: int) -> int:
    """Per-chip bytes of one loss chunk's float32 logits, from the layout's per-device shape."""
    p = result.program
    rows = layout_lib.activation_rows(p.model_cfg, p.micro_batch, p.seq_len, loss_chunk_size, p.mesh, p.rules)
    logits = next(r for r in rows if r.name.startswith("logits"))
    return 4 * math.prod(logits.per_device)
