"""``jaxcpt upcycle HF_DIR --experts N --top-k K --out DIR``: a dense model as a mixture of experts of the same function.

    jaxcpt upcycle /models/Llama-3.2-1B --experts 8 --top-k 2 --out /models/llama-8x1b   # Mixtral, top-2 of 8
    jaxcpt upcycle /models/Qwen3-0.6B --experts 8 --top-k 2 --split 4 --out /models/q3-moe  # 32 fine experts, top-8

Llama and Mistral become Mixtral, Qwen3 becomes Qwen3-MoE, Qwen2 becomes Qwen2-MoE (see
jaxcpt/adapt/upcycle.py for why not Qwen3-MoE). Every expert is a copy of the dense MLP, so
DIR computes the dense model's function until it is trained (``--noise`` breaks that on
purpose); DIR's ``jaxcpt_adaptation.json`` says what was done and whether the function is
kept, and names the router parameter for ``optim.trainable``. docs/upcycling.md has more.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="dense Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3)")
    parser.add_argument("--out", required=True, help="HF directory to write")
    parser.add_argument("--experts", type=int, required=True, help="copies of the dense MLP (>= 2)")
    parser.add_argument("--top-k", type=int, required=True, help="copies each token uses (1..--experts)")
    parser.add_argument("--split", type=int, default=1,
                        help="granular upcycling: cut each copy into G experts of 1/G of the intermediate size; "
                        "the model gets experts x G experts and top-k x G per token (default 1: whole copies)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="add Gaussian noise of this many times each tensor's std to every expert copy "
                        "(breaks symmetry; the upcycled model no longer computes the dense function exactly)")
    parser.add_argument("--router-std", type=float, default=None,
                        help="std of the router's initial weights (default: the config's initializer_range); one row "
                        "per copy, shared by its --split experts. 0: a zero router (with --split > 1 the function is "
                        "then kept only if top-k breaks ties by whole copies)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the router and the noise")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file to write (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run(args) -> int:
    from jaxcpt.adapt.model_io import check_out
    from jaxcpt.adapt.upcycle import upcycle
    from jaxcpt.hf.convert import parse_size

    check_out(args.out, args.overwrite)
    out, plan = upcycle(args.source, args.out, experts=args.experts, top_k=args.top_k, split=args.split,
                        noise=args.noise, router_std=args.router_std, seed=args.seed,
                        max_shard_bytes=parse_size(args.max_shard_size), overwrite=args.overwrite)
    preserved, why = plan.preservation()
    print(f"wrote {out}: {plan.source_type} -> {plan.target_type}, {plan.num_experts} experts of intermediate size "
          f"{plan.expert_intermediate}, top-{plan.experts_per_token} per token")
    print(f"function at step 0: {'the dense model' if preserved else 'NOT the dense model'} ({why})")
    return 0
