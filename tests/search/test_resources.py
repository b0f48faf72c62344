"""Whether one trial fits the cluster, and which device it trains on: the rules alone (no Ray started)."""

from __future__ import annotations

import pytest

from search.resources import ClusterTooSmall, Needs, check_fits
from search.trainable import TrialPlan, assigned_device

TWO_NODES = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}]
CLUSTER = {"CPU": 24.0, "GPU": 6.0}


@pytest.mark.parametrize("needs", [
    Needs(cpus=4, gpus=1, workers=1),
    Needs(cpus=4, gpus=0.25, workers=1),
    Needs(cpus=2, gpus=1, workers=6),  # spread over both nodes
    Needs(cpus=16, gpus=4, workers=1),
])
def test_trials_that_fit(needs: Needs) -> None:
    check_fits(needs, CLUSTER, TWO_NODES)


@pytest.mark.parametrize(("needs", "message"), [
    (Needs(cpus=1, gpus=1, workers=1), "each trial needs 1 GPU, but the Ray cluster has no GPU"),
    (Needs(cpus=1, gpus=1, workers=8), "each trial needs 8 GPU, but the Ray cluster has 6 in all"),
    (Needs(cpus=1, gpus=5, workers=1), "each training process needs 5 GPU on one node, but the largest node has 4"),
    (Needs(cpus=20, gpus=0, workers=1), "each training process needs 20 CPU on one node, but the largest node has 16"),
])
def test_trials_that_cannot_be_placed(needs: Needs, message: str) -> None:
    cluster, nodes = (CLUSTER, TWO_NODES) if "no GPU" not in message else ({"CPU": 24.0}, [{"CPU": 24.0}])
    with pytest.raises(ClusterTooSmall, match=message):
        check_fits(needs, cluster, nodes)


def _plan(gpus: float, workers: int = 1) -> TrialPlan:
    return TrialPlan(space={}, base="b", data_root="d", storage="s", name="n", workers=workers, gpus_per_worker=gpus)


@pytest.mark.parametrize(("gpus", "device"), [(0, "cpu"), (1, "cuda:0"), (0.5, "cuda:0")])
def test_a_trial_trains_on_the_device_ray_assigned(gpus: float, device: str) -> None:
    assert assigned_device(_plan(gpus), cuda_visible=gpus > 0) == device


@pytest.mark.parametrize(("gpus", "cuda_visible", "message"), [
    (0, True, "this CPU trial sees CUDA devices"),  # would train on a GPU that Ray gave another trial
    (1, False, "Ray gave this worker 1 GPU, but torch"),  # would train on the CPU without a word
])
def test_a_device_that_contradicts_ray_is_an_error(gpus: float, cuda_visible: bool, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        assigned_device(_plan(gpus), cuda_visible=cuda_visible)
