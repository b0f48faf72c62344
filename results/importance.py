"""Which searched knobs mattered: fANOVA importances over a finished search's scored trials.

fANOVA (Hutter et al., ICML 2014) fits a random forest to (knob values -> score) and splits the score's variance
by knob; Optuna implements it (``FanovaImportanceEvaluator``), fed here with the trials MLflow holds, so a grid or
random search gets the analysis as a TPE search does. Each trial counts with its best epoch's primary metric (the
score every table ranks by); with objectives, importances are for the primary metric only. A forest over a handful
of points says little: the number of trials is stated with every result, and below :data:`MIN_TRIALS` there is none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.trial import create_trial

from results.store import TrialRecord
from spaces.distributions import Choice, Grid
from spaces.schema import Space

MIN_TRIALS = 4
IMPORTANCE_PREFIX = "importance/"
"""The parent run's metrics: ``importance/lr`` = lr's share of the primary metric's variance."""


@dataclass(frozen=True)
class Importances:
    """Each searched knob's share of the metric's variance (summing to 1), largest first, and what it rests on."""

    shares: dict[str, float]
    trials: int
    metric: str

    def line(self) -> str:
        """``val/bbox_mAP by fANOVA over 12 trials: lr 0.71, roi_head 0.21, schedule 0.08``."""
        shares = ", ".join(f"{knob} {share:.2f}" for knob, share in self.shares.items())
        return f"{self.metric} by fANOVA over {self.trials} trials: {shares}"

    def metrics(self) -> dict[str, float]:
        return {IMPORTANCE_PREFIX + knob: share for knob, share in self.shares.items()}


def knob_importances(space: Space, trials: Sequence[TrialRecord]) -> Importances | None:
    """The importances of the space's searched knobs, or None with fewer than two knobs or MIN_TRIALS trials
    holding a score and a value of each knob inside the space."""
    scored = [(values, score) for trial in trials
              if (score := trial.score(space.metric, space.mode)) is not None
              and (values := _searched_values(space, trial)) is not None]
    if len(space.space) < 2 or len(scored) < MIN_TRIALS:
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its "study created" line is noise in a report's output
    study = optuna.create_study(direction="maximize" if space.mode == "max" else "minimize")
    distributions = space.optuna_space()
    study.add_trials([create_trial(params=space.encode_optuna(values), distributions=distributions, value=score)
                      for values, score in scored])
    shares = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), normalize=True)
    return Importances(shares={knob: float(share) for knob, share in shares.items()}, trials=len(scored),
                       metric=space.metric)


def _searched_values(space: Space, trial: TrialRecord) -> dict[str, object] | None:
    """The trial's searched knob values, or None when one is missing or not a value of the space (edited since)."""
    if any(knob not in trial.params for knob in space.space):
        return None
    parsed = space.values_from_params(trial.params)
    values = {knob: parsed[knob] for knob in space.space}
    for knob, dist in space.space.items():
        if isinstance(dist, Choice | Grid) and values[knob] not in dist.values:
            return None
    return values
