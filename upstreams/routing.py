"""Which deployment a call tries first, and after it fails, which next.

- `priority`: the lowest `priority` first; deployments of equal priority share calls by weight.
- `weighted`: every deployment in a weighted random order (weight 3 is first three times as
  often as weight 1).
- `least_busy`: the deployment with the fewest calls running in this process first (ties by
  priority). Per process: balancing needs no shared state on the call's path, and each worker
  sees a fair share of the traffic.

Deployments whose circuit breaker is open are not tried (`upstreams.health`).
"""

from __future__ import annotations

import random
from collections import Counter

from streaming.catalog import Deployment, ModelRoute

_running: Counter[str] = Counter()
_rng = random.Random()  # one per process: seeding a new one per call costs a read of os.urandom


def _weighted_order(deployments: list[Deployment], rng: random.Random) -> list[Deployment]:
    """A random order where each is drawn first with probability weight / total (without replacement)."""
    # Efraimidis-Spirakis: sort by u^(1/w) descending.
    return sorted(deployments, key=lambda deployment: rng.random() ** (1.0 / deployment.weight), reverse=True)


def attempt_order(route: ModelRoute, *, rng: random.Random | None = None) -> list[Deployment]:
    """The route's deployments in the order its policy tries them."""
    rng = rng or _rng
    deployments = [deployment for deployment in route.deployments if deployment.provider.is_configured]
    if route.routing == "weighted":
        return _weighted_order(deployments, rng)
    if route.routing == "least_busy":
        return sorted(deployments, key=lambda deployment: (_running[deployment.name], deployment.priority))
    ordered: list[Deployment] = []
    for priority in sorted({deployment.priority for deployment in deployments}):
        ordered += _weighted_order([deployment for deployment in deployments if deployment.priority == priority], rng)
    return ordered


def running(deployment: Deployment) -> int:
    return _running[deployment.name]


def call_started(deployment: Deployment) -> None:
    """Count a call as running on `deployment` (for `least_busy`) until `call_ended`."""
    _running[deployment.name] += 1


def call_ended(deployment: Deployment) -> None:
    _running[deployment.name] -= 1
    if _running[deployment.name] <= 0:
        del _running[deployment.name]
