"""The refine stages' search box: around the best ``top_q`` of the previous stage's trials, moved past
the old box's edge when the best trial sits on it (the rule `cnnlab report` advises by), and never outside
an option's valid range."""

from __future__ import annotations

import math
from typing import Any

from cnnlab.core.validation import Range
from cnnlab.sweep.report import EDGE, clip_interval

PAD = 0.25  # each side of the top trials' span, as a fraction of that span


def refined_space(space: dict[str, Any], trials: list[tuple[dict[str, Any], float]], top_q: float, maximize: bool,
                  ranges: dict[str, Range | None]) -> dict[str, Any]:
    """A new space from ``space`` (Optuna distributions) and the finished trials as (params, value)."""
    import optuna

    ranked = sorted(trials, key=lambda t: t[1], reverse=maximize)
    top = ranked[:max(2, math.ceil(top_q * len(ranked)))] if len(ranked) > 1 else ranked
    best = top[0][0]
    new = {}
    for key, dist in space.items():
        values = [params[key] for params, _ in top if key in params]
        if not values:
            new[key] = dist
        elif isinstance(dist, optuna.distributions.CategoricalDistribution):
            new[key] = optuna.distributions.CategoricalDistribution([c for c in dist.choices if c in values])
        else:
            low, high = _box(dist.low, dist.high, dist.log, values, best[key], ranges.get(key))
            if isinstance(dist, optuna.distributions.IntDistribution):
                low, high = math.floor(low), math.ceil(high)
                new[key] = optuna.distributions.IntDistribution(low, max(high, low + 1), log=dist.log)
            else:
                new[key] = optuna.distributions.FloatDistribution(low, high, log=dist.log)
    return new


def _box(low: float, high: float, log: bool, values: list[float], best: float, valid: Range | None) -> tuple[float, float]:
    to, back = (math.log, math.exp) if log else (float, float)
    lo_old, hi_old = to(low), to(high)
    points = [to(v) for v in values]
    span = max(max(points) - min(points), 0.1 * (hi_old - lo_old))
    lo, hi = min(points) - PAD * span, max(points) + PAD * span
    where = (to(best) - lo_old) / (hi_old - lo_old)
    if where < EDGE:  # the best is on the lower edge: the optimum may lie beyond it, so the box moves past it
        lo = min(lo, to(best) - span)
    elif where > 1 - EDGE:
        hi = max(hi, to(best) + span)
    lo, hi = clip_interval(back(lo), back(hi), best, valid)
    if not lo < hi:
        lo, hi = min(lo, best), max(hi, best) * (1 + 1e-6) + 1e-12
    return lo, hi


def syntax(dist: Any) -> str:
    """A distribution in the sweep grammar, as the user would type it."""
    import optuna

    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return ",".join(str(c) for c in dist.choices)
    text = f"interval({dist.low:.6g}, {dist.high:.6g})"
    if isinstance(dist, optuna.distributions.IntDistribution):
        return f"tag(log, int, {text})" if dist.log else f"tag(int, {text})"
    return f"tag(log, {text})" if dist.log else text


def inside(space: dict[str, Any], params: dict[str, Any]) -> bool:
    """Whether ``params`` lie in ``space`` (a trial of an earlier stage the new study can be told of)."""
    for key, dist in space.items():
        if key not in params:
            return False
        try:
            if not dist._contains(dist.to_internal_repr(params[key])):
                return False
        except (ValueError, TypeError):
            return False
    return set(params) <= set(space)
