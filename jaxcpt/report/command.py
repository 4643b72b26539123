"""``jaxcpt report RUN [RUN_B]``: the forgetting report of a run, or two runs compared."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="one run directory, or two to compare (A = without replay, B = with)")
    parser.add_argument("--out", default=None, help="PNG for the comparison plot (default: RUN_B/compare_eval_loss.png)")


def run(args) -> int:
    from etils import epath

    from jaxcpt.errors import UserError
    from jaxcpt.report.forgetting import compare, plot, write_report

    for run_dir in args.runs:
        if not (epath.Path(run_dir) / "metrics.jsonl").exists():
            raise UserError(f"'{run_dir}' has no metrics.jsonl; pass a jaxcpt run directory")
    if len(args.runs) == 1:
        print(write_report(args.runs[0]))
        print(f"plot: {epath.Path(args.runs[0]) / 'eval_loss.png'}")
        return 0
    if len(args.runs) != 2:
        raise UserError("report takes one run directory, or two to compare")
    table, _ = compare(*args.runs)
    out = args.out or str(epath.Path(args.runs[1]) / "compare_eval_loss.png")
    plot(list(args.runs), out)
    print(table)
    print(f"plot: {out}")
    return 0
