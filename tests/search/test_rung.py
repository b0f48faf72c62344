"""What ASHA compares: the rung score's order, and a real search whose trials tie at the first rung."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import write_space
from mlflow.tracking import MlflowClient

from cocodata.dataset import Dataset
from search.driver import SearchOptions, run_search
from search.rung import RUNG_SCORE, RecheckedASHA, rung_score
from tracking_names import TAG_ROLE, TAG_STATUS


def _row(strict: float, loose: float, loss: float) -> dict[str, float]:
    return {"val/bbox_mAP": strict, "val/bbox_mAP_50": loose, "train/loss": loss}


def test_rung_score_orders_by_metric_then_the_other_map_then_lower_loss() -> None:
    # each row beats the next: on the metric by 0.01 AP (a tenth of the step mmdet rounds to),
    # whatever its secondaries; then on mAP_50 alone; then on the loss alone
    ranked = [_row(0.0012, 0.0, 9.0), _row(0.0011, 0.9, 0.1), _row(0.0010, 1.0, 0.0), _row(0.0, 0.3, 2.0),
              _row(0.0, 0.2, 1.5), _row(0.0, 0.2, 1.6), _row(0.0, 0.0, 3.0)]
    scores = [rung_score(r, metric="val/bbox_mAP", mode="max") for r in ranked]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    # at an early rung's mAP, losses 1e-6 apart still order (a double holds ~1e-19 there)
    assert (rung_score(_row(0.00102, 0.0101, 3.520057), metric="val/bbox_mAP", mode="max")
            > rung_score(_row(0.00102, 0.0101, 3.520058), metric="val/bbox_mAP", mode="max"))
    # the score reads as the metric
    assert all(math.isclose(s, r["val/bbox_mAP"], abs_tol=2e-6) for s, r in zip(scores, ranked, strict=True))
    # with mAP_50 as the metric, the strict mAP breaks its ties
    assert (rung_score(_row(0.2, 0.5, 1.0), metric="val/bbox_mAP_50", mode="max")
            > rung_score(_row(0.1, 0.5, 0.5), metric="val/bbox_mAP_50", mode="max"))
    # minimising, a better tie-breaker lowers the score, as a better metric does (ASHA negates the whole score)
    tied = [rung_score(r, metric="val/bbox_mAP", mode="min") for r in ranked[3:]]
    assert tied == sorted(tied) and len(set(tied)) == len(tied)


def test_a_promotion_on_a_partial_rung_is_taken_back_when_later_arrivals_outrank_it() -> None:
    """Pure decision logic (no Ray run): factor 3, rungs at epochs 1 and 3 of 6."""
    asha = RecheckedASHA(time_attr="epoch", metric="s", mode="max", max_t=6, grace_period=1, reduction_factor=3)

    def report(trial: str, epoch: int, score: float) -> str:
        return asha.on_trial_result(None, SimpleNamespace(trial_id=trial), {"epoch": epoch, "s": score})  # type: ignore[arg-type]

    assert report("a", 1, 0.5) == "CONTINUE"  # the first arrival: nothing to compare with
    assert report("b", 1, 0.1) == "STOP"  # below a's 0.5
    assert report("c", 1, 0.6) == "CONTINUE"  # the 2/3 quantile of {0.1, 0.5} is 0.37
    # a's epoch 2: judged again against {0.1, 0.6}, quantile 0.43 -- still above it
    assert report("a", 2, 0.7) == "CONTINUE"
    assert report("d", 1, 0.9) == "CONTINUE"  # quantile of {0.1, 0.5, 0.6} is 0.53
    # with d in, a's 0.5 at epoch 1 is below the quantile of {0.1, 0.6, 0.9} (0.7): a stops at its next epoch,
    # whatever it scores now; c (0.6 against {0.1, 0.5, 0.9}, quantile 0.63) stops too, d goes on
    assert report("a", 3, 0.99) == "STOP"
    assert report("c", 2, 0.99) == "STOP"
    assert report("d", 2, 0.0) == "CONTINUE"
    # minimising: the lower score is the better one
    low = RecheckedASHA(time_attr="epoch", metric="s", mode="min", max_t=6, grace_period=1, reduction_factor=3)
    assert low.on_trial_result(None, SimpleNamespace(trial_id="x"), {"epoch": 1, "s": 1.0}) == "CONTINUE"  # type: ignore[arg-type]
    assert low.on_trial_result(None, SimpleNamespace(trial_id="y"), {"epoch": 1, "s": 2.0}) == "STOP"  # type: ignore[arg-type]
    # the last epoch ends the trial
    assert report("d", 6, 0.0) == "STOP"


def test_tune_stops_a_trial_promoted_before_its_rung_filled(tmp_path: Path, ray_local: None) -> None:
    """A real Tune run of scripted trials (no training), 3 at once: the weak trial reaches the rung first and goes
    on (nothing to compare with); once the strong ones have recorded better epoch-1 scores it stops after epoch 2,
    where Ray's AsyncHyperBandScheduler lets it finish. The strong ones finish."""
    from ray import tune

    def scripted_trial(config: dict[str, Any]) -> None:  # defined here: Ray's workers cannot import test modules
        """Reports a fixed score for 3 epochs; flag files order the arrivals: the weak trial reaches epoch 1 first
        and reports epoch 2 only after both strong ones have recorded their epoch 1."""
        folder, name = Path(config["folder"]), config["name"]

        def wait_for(*flags: str) -> None:
            while not all((folder / flag).exists() for flag in flags):
                time.sleep(0.1)
            time.sleep(3)  # the driver has taken the other trials' results by then

        for epoch in (1, 2, 3):
            if name == "weak" and epoch == 2:
                wait_for("strong-a", "strong-b")
            if name != "weak" and epoch == 1:
                wait_for("weak")
            tune.report({"epoch": epoch, "score": config["score"]})
            if epoch == 1:
                (folder / name).touch()

    scores = {"weak": 0.1, "strong-a": 0.5, "strong-b": 0.6}
    asha = RecheckedASHA(time_attr="epoch", metric="score", mode="max", max_t=3, grace_period=1, reduction_factor=3)
    tuner = tune.Tuner(
        tune.with_resources(scripted_trial, {"cpu": 0.5}),
        param_space={"name": tune.grid_search(list(scores)), "folder": str(tmp_path),
                     "score": tune.sample_from(lambda spec: scores[spec.config.name])},
        tune_config=tune.TuneConfig(scheduler=asha, max_concurrent_trials=3),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="recheck", verbose=0))
    results = tuner.fit()
    last_epoch = {result.config["name"]: result.metrics["epoch"] for result in results}
    assert last_epoch == {"weak": 2, "strong-a": 3, "strong-b": 3}


def _arrival_rule_rank(k: int, factor: int) -> int:
    """How high the k-th trial to reach a rung must rank among the first k to go on (1 = best).

    Ray compares it with the ``1 - 1/factor`` quantile (linear interpolation) of the k - 1 scores recorded before it
    and stops it only when it is strictly below: with distinct scores it must beat the ``floor((k-2)(1-1/factor))+1``
    lowest of them, so at most ``k - 1 - floor((k-2)(1-1/factor)) - 1`` earlier ones may rank above it.
    """
    if k == 1:
        return 1  # an empty rung has no cutoff
    return k - 1 - math.floor((k - 2) * (1 - 1 / factor))


def _below_two_thirds_quantile(value: float, others: list[float]) -> bool:
    """Below the linearly interpolated 2/3 quantile of ``others`` (factor 3's cutoff), by the standard library."""
    cutoff = others[0] if len(others) == 1 else statistics.quantiles(others, n=3, method="inclusive")[1]
    return bool(others) and value < cutoff


@pytest.mark.slow
def test_trials_tied_at_the_first_rung_are_cut_to_a_third(tmp_path: Path, synth: Dataset, ray_local: None) -> None:
    """Trials that barely learn in one epoch (lr near 0, one seed: nearly the same model) tie on the mAP that
    mmdet rounds; ASHA, ranking them by the rung score, carries about a third past the rung, not all of them, and
    a trial promoted before the rung filled stops after its next epoch if the scores recorded since outrank it."""
    trials, factor = 9, 3
    space = write_space(tmp_path / "space.yaml", synth, name="ties", metric="val/bbox_mAP",
                        budget={"epochs": 3, "trials": trials, "max_concurrent": 2},
                        search={"algorithm": "random", "seed": 0},
                        scheduler={"type": "asha", "grace_epochs": 1, "reduction_factor": factor},
                        space={"lr": {"loguniform": [1.0e-6, 1.0e-5]}})
    outcome = run_search(SearchOptions(space_file=space, storage=tmp_path / "runs"))
    client = MlflowClient(outcome.tracking_uri)
    experiment = client.get_experiment_by_name(outcome.name)
    assert experiment is not None
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get(TAG_ROLE) == "trial"]
    assert len(runs) == trials

    rung: list[dict[str, Any]] = []
    for run in runs:
        scores = {m.step: m for m in client.get_metric_history(run.info.run_id, RUNG_SCORE)}
        first_map = next(m for m in client.get_metric_history(run.info.run_id, "val/bbox_mAP") if m.step == 1)
        rung.append({"score": scores[1].value, "arrived": scores[1].timestamp, "map": first_map.value,
                     "went_on": 2 in scores, "judged_again": scores[2].timestamp if 2 in scores else None,
                     "finished": 3 in scores, "status": run.data.tags[TAG_STATUS]})

    # the ties: as mmdet rounds it, every trial has the same epoch-1 mAP (ASHA on it would carry them all)
    assert len({round(t["map"], 3) for t in rung}) == 1, [t["map"] for t in rung]
    # the rung score tells every trial apart; the driver logs results in the order ASHA saw them
    assert len({t["score"] for t in rung}) == trials and len({t["arrived"] for t in rung}) == trials
    rung.sort(key=lambda t: t["arrived"])

    allowed = []
    for k, trial in enumerate(rung, start=1):
        rank = 1 + sum(earlier["score"] > trial["score"] for earlier in rung[:k])
        allowed.append(rank <= _arrival_rule_rank(k, factor))
        assert trial["status"] == ("completed" if trial["finished"] else "stopped")
        if trial["went_on"]:
            assert allowed[-1], f"arrival {k} went on ranking {rank} of {k} by rung score"
    went_on = sum(t["went_on"] for t in rung)
    overhang = sum(allowed) - math.ceil(trials / factor)  # promoted early: judged against a part of the rung
    assert went_on <= math.ceil(trials / factor) + overhang < trials

    # after epoch 2, each promoted trial was judged again against every epoch-1 score recorded by then
    for trial in (t for t in rung if t["went_on"]):
        others = [t["score"] for t in rung if t is not trial and t["arrived"] < trial["judged_again"]]
        assert all(t["arrived"] != trial["judged_again"] for t in rung)
        assert trial["finished"] == (not _below_two_thirds_quantile(trial["score"], others)), (trial, others)
