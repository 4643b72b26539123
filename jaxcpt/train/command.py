"""``jaxcpt train --config C.yaml [section.key=value ...]``: train, or resume the run in run_dir."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (see configs/); omitted = all defaults")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.schedule.peak_lr=1e-4")


def run(args) -> int:
    import logging

    from jaxcpt.train.config import load_train_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_train_config(args.config, args.overrides)  # config errors surface before jax starts work
    from jaxcpt.train.loop import NonFiniteLossError, train

    try:
        train(cfg)
    except NonFiniteLossError as e:
        import sys

        print(f"jaxcpt train: {e}", file=sys.stderr)
        return 3
    return 0
