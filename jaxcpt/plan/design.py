"""``plan sweep --ratios auto``: spend proxy runs where they change the answer.

A coarse first pass (``COARSE``: no replay, then 0.1, 0.25, 0.5) shows roughly how the general
loss falls with replay. The monotone interpolation of that pass (``jaxcpt.plan.monotone``, no
form assumed) gives the ratio where the general-loss rise meets the tolerance, and the second
pass adds ``count`` ratios there: that ratio itself and the middles of the gaps next to it
(``heldout.suggest_ratios``). Ratios far from where the tolerance binds move the recommendation
little; these decide it, and they leave each law enough interior runs for a leave-one-out error
(3 coarse + 3 refined interior ratios: CMR's 3 parameters + 1 with room to spare).
"""

from __future__ import annotations

from jaxcpt.plan.heldout import at_target, suggest_ratios
from jaxcpt.plan.laws import Observation, Tolerance

COARSE = (0.0, 0.1, 0.25, 0.5)


def refine_ratios(observations: list[Observation], tokens: float, params: float, tolerance: Tolerance,
                  count: int = 3) -> tuple[list[float], str]:
    """(ratios to add, why in a sentence) from the coarse runs at the target budget."""
    from jaxcpt.plan.monotone import InterpolationFit

    runs = at_target(observations, tokens, params)
    swept = sorted({o.replay for o in runs})
    rec = InterpolationFit(runs).recommend(tokens, params, tolerance)
    if rec.replay is None:
        # Even the most replay swept forgets too much: the tolerance binds above it.
        target = min(0.95, max(swept) + 0.5 * (1.0 - max(swept)))
        why = (f"no swept ratio keeps the rise within {tolerance} (the least forgetting, at replay {max(swept):g}, rises "
               f"{min(o.general_loss - o.base_general_loss for o in runs):+.4f}); looking above it, near {target:.2f}")
    else:
        target = rec.replay
        why = (f"the coarse runs, joined monotonically, meet the tolerance ({tolerance}) near replay {target:.3f}; "
               "adding ratios around it")
    added = suggest_ratios(swept, target, count)
    return added, why
