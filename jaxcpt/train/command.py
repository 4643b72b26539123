"""``jaxcpt train --config C.yaml [section.key=value ...]``: train, or resume the run in run_dir.

``--check`` resolves everything a run needs (config, mesh on the devices there are, model
source or checkpoint, tokenizer against the model, every data path, the layout), prints
it and exits: 0 when the run could start, 2 with the reason when it could not. It writes
nothing, so the launch scripts run it before a job spends its allocation.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (see configs/); omitted = all defaults")
    parser.add_argument("--check", action="store_true",
                        help="resolve and print the config, mesh, model, tokenizer, data and layout, then exit without training")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.schedule.peak_lr=1e-4")


def run(args) -> int:
    import logging

    from jaxcpt.train.config import load_train_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_train_config(args.config, args.overrides)  # config errors surface before jax starts work
    if args.check:
        from jaxcpt.sharding.distributed import is_writer
        from jaxcpt.train.setup import set_up

        setup = set_up(cfg, check=True)
        if is_writer():
            print(setup.describe())
            print("check passed: the run can start")
        return 0
    from jaxcpt.train.loop import NonFiniteLossError, train

    from jaxcpt.exit_codes import EXIT_STOPPED_EARLY

    try:
        summary = train(cfg)
    except NonFiniteLossError as e:
        import sys

        print(f"jaxcpt train: {e}", file=sys.stderr)
        return 3
    # stopped by a signal after saving: its own code, so a launcher can tell it from a finished run and rerun it
    return EXIT_STOPPED_EARLY if summary["stopped_by_signal"] else 0
