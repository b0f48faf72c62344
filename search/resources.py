"""Whether one trial fits the Ray cluster at all, checked before the search starts.

Ray keeps a trial that asks for more than any node has PENDING forever, without an error: a space that needs GPUs
on a cluster without them would wait silently instead of failing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ray

from search.trainable import TrialPlan
from spaces.errors import UserError


class ClusterTooSmall(UserError):
    """One trial needs more CPUs or GPUs than the cluster (or any one of its nodes) has."""


@dataclass(frozen=True)
class Needs:
    """What one training process of a trial asks Ray for; the trial asks it ``workers`` times."""

    cpus: float
    gpus: float
    workers: int


def needs_of(plan: TrialPlan) -> Needs:
    return Needs(cpus=plan.cpus_per_worker, gpus=plan.gpus_per_worker, workers=plan.workers)


def check_fits(needs: Needs, cluster: Mapping[str, float], nodes: Iterable[Mapping[str, float]]) -> None:
    """Raises ClusterTooSmall unless each worker fits on some node and the whole trial fits in the cluster.

    Args:
        needs: one trial's request.
        cluster: the cluster's total resources (``ray.cluster_resources()``).
        nodes: each live node's total resources.
    """
    largest = {name: max((node.get(name, 0.0) for node in nodes), default=0.0) for name in ("CPU", "GPU")}
    for name, per_worker in (("GPU", needs.gpus), ("CPU", needs.cpus)):
        if per_worker == 0:
            continue
        per_trial, total = per_worker * needs.workers, cluster.get(name, 0.0)
        fix = _FIXES[name]
        if total == 0:
            raise ClusterTooSmall(f"each trial needs {per_trial:g} {name}, but the Ray cluster has no {name}: {fix}")
        if per_trial > total:
            raise ClusterTooSmall(f"each trial needs {per_trial:g} {name}, but the Ray cluster has {total:g} in all: "
                                  f"{fix}")
        if per_worker > largest[name]:
            raise ClusterTooSmall(f"each training process needs {per_worker:g} {name} on one node, but the largest "
                                  f"node has {largest[name]:g}: {fix}")


_FIXES = {
    "GPU": "lower budget.gpus_per_trial (0 trains on CPU workers) or add GPU nodes to the cluster",
    "CPU": "lower budget.cpus_per_worker or budget.workers_per_trial, or add CPUs to the cluster",
}


def check_cluster(plan: TrialPlan) -> None:
    """:func:`check_fits` against the connected Ray cluster's live nodes."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    check_fits(needs_of(plan), ray.cluster_resources(), nodes)
