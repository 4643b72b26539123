"""Every law refitted to a sweep recorded in a benchmark's JSON: leave-one-out error, recommendation, prediction.

    python benchmarks/plan_refit.py benchmarks/results/plan_demo.json --tolerance 0.15

Trains nothing: the runs' final and step-0 losses are read from the JSON (its ``sweep`` list,
``cpt_tokens``, ``model_params``), so a sweep recorded before the planner had leave-one-out
errors and ``--law auto`` can be judged by them, next to the run the JSON measured at its
recommendation. Prints a table and writes RESULTS_laws.json beside the input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_throughput import machine_info  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="a benchmark JSON with a recorded sweep (benchmarks/results/plan_demo.json)")
    parser.add_argument("--tolerance", default="0.15")
    args = parser.parse_args()

    from jaxcpt.plan.assess import AUTO_LAWS, assess, choose, laws_table
    from jaxcpt.plan.laws import Observation, Tolerance

    recorded = json.loads(Path(args.results).read_text())
    tokens, params = recorded["cpt_tokens"], recorded["model_params"]
    observations = [Observation(run=r["run"], replay=r["replay"], tokens=tokens, params=params,
                                general_loss=r["general_loss"], domain_loss=r["domain_loss"],
                                base_general_loss=r["base_general_loss"], base_domain_loss=r["base_domain_loss"])
                    for r in recorded["sweep"]]
    assessments = [assess(law, observations, tokens=tokens, params=params, tolerance=Tolerance.parse(args.tolerance),
                          base_general=None, samples=200) for law in AUTO_LAWS]
    chosen, why = choose(assessments)
    print(laws_table(assessments, chosen))
    print(f"--law auto: {why}")
    measured = recorded.get("measured")
    out = {"what": "every law refitted to the sweep recorded in " + str(Path(args.results).name) + "; nothing trained",
           "source": str(Path(args.results).name), "tolerance": args.tolerance, "chosen": chosen.law,
           "chosen_because": why, "laws": [a.summary() for a in assessments],
           "measured_at_the_recorded_recommendation": {"replay": recorded.get("recommended_replay"), **(measured or {})},
           "machine": machine_info()}
    if measured:
        for a in assessments:
            if a.rec is not None and a.rec.replay is not None and abs(a.rec.replay - out[
                    "measured_at_the_recorded_recommendation"]["replay"]) < 5e-4:
                error = measured["general_rise"] - a.rec.general_rise
                bound = a.bound("general_error")
                print(f"{a.law}: measured rise {measured['general_rise']:+.4f} at {a.rec.replay:.3f}, predicted "
                      f"{a.rec.general_rise:+.4f}" + ("" if bound is None else f" +/- {bound:.4f}")
                      + f": error {error:+.4f}" + ("" if bound is None else
                                                   f", {'within' if abs(error) <= bound else 'OUTSIDE'} it"))
    path = Path(args.results).with_name(Path(args.results).stem + "_laws.json")
    path.write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
