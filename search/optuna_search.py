"""The Optuna searchers: TPE (Bergstra et al., NeurIPS 2011) or NSGA-II (Deb et al., IEEE TEVC 2002), over the
primary metric alone or over several objectives, within hard limits.

Ray Tune's ``OptunaSearch`` takes a list of metrics and modes and tells Optuna the trial's *last* result. A
trial reports its costs at some epochs only (FPS after the first and the last) and ASHA may stop it in between,
so this searcher folds every result into the trial's values (:func:`spaces.objectives.fold_row`: val scores of
its best epoch by the primary metric, costs as last measured) and tells Optuna those. ASHA keeps pruning on the
primary metric alone; Optuna only hears of a trial when it ends.

With limits, each finished trial gets one constraint value per limit (<= 0 where met) through
``Trial.set_constraint``, which Optuna's constrained TPE and NSGA-II read (infeasible trials rank after feasible
ones); Optuna 5 deprecates the samplers' ``constraints_func`` for it.
"""

from __future__ import annotations

from typing import Any

from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.storages import BaseStorage
from ray.tune.search.optuna import OptunaSearch

from spaces.objectives import fold_row, limit_violations
from spaces.schema import Space


def make_sampler(space: Space) -> BaseSampler:
    """The space's Optuna sampler."""
    seed = space.search.seed
    if space.search.algorithm == "nsga2":
        # Optuna's default population (50) would leave a search of a few dozen trials random throughout:
        # a quarter of the budget per generation lets it evolve a few times.
        return NSGAIISampler(population_size=max(2, min(50, space.budget.trials // 4)), seed=seed)
    return TPESampler(seed=seed)


class ObjectiveSearch(OptunaSearch):  # type: ignore[misc]
    """``OptunaSearch`` that tells Optuna each trial's values over all its results, and its limit violations."""

    def __init__(self, space: Space, *, storage: BaseStorage | None = None) -> None:
        """Args:
            space: The search's space: its knobs, objectives, limits and algorithm.
            storage: An Optuna study named after the search that already holds earlier (warm-start) trials.
        """
        directions = space.directions()
        metrics = [metric for metric, _ in directions]
        modes = [mode for _, mode in directions]
        single = len(directions) == 1
        super().__init__(space=space.optuna_space(), metric=metrics[0] if single else metrics,
                         mode=modes[0] if single else modes, sampler=make_sampler(space), storage=storage,
                         study_name=space.name if storage else None)
        self._primary, self._primary_mode = space.metric, space.mode
        self._constraints = dict(space.constraints)
        self._values: dict[str, dict[str, float]] = {}  # saved with the searcher: OptunaSearch pickles __dict__

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        row = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._values[trial_id] = fold_row(self._values.get(trial_id, {}), row, primary=self._primary,
                                          mode=self._primary_mode)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        values = self._values.pop(trial_id, {})
        if result and values:
            result = {**result, **values}
        if trial_id in self._ot_trials:
            for key, violation in limit_violations(values, self._constraints).items():
                self._ot_trials[trial_id].set_constraint(key, violation)
        super().on_trial_complete(trial_id, result=result, error=error)
