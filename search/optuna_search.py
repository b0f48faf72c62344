"""The Optuna searchers: TPE (Bergstra et al., NeurIPS 2011) or NSGA-II (Deb et al., IEEE TEVC 2002), over the
primary metric alone or over several objectives, within hard limits.

Ray Tune's ``OptunaSearch`` takes a list of metrics and modes and tells Optuna the trial's *last* result. A
trial reports its costs at some epochs only (FPS after the first and the last) and ASHA may stop it in between,
so this searcher folds every result into the trial's values (:func:`spaces.objectives.fold_row`: val scores of
its best epoch by the primary metric, costs as last measured) and tells Optuna those. ASHA keeps pruning on the
primary metric alone; Optuna only hears of a trial when it ends.

With limits, each finished trial carries its violations as a user attribute (<= 0 where met), which the
sampler's ``constraints_func`` reads (Optuna's constrained TPE and NSGA-II: infeasible trials rank last).
"""

from __future__ import annotations

from typing import Any

from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial
from ray.tune.search.optuna import OptunaSearch

from spaces.objectives import fold_row, violations
from spaces.schema import Space

VIOLATIONS_ATTR = "dettune.violations"


def recorded_violations(trial: FrozenTrial) -> list[float]:
    """Optuna's ``constraints_func``: the violations :class:`ObjectiveSearch` stored on the trial."""
    return list(trial.user_attrs[VIOLATIONS_ATTR])


def make_sampler(space: Space) -> BaseSampler:
    """The space's Optuna sampler, with the limits as its constraints."""
    constraints = recorded_violations if space.constraints else None
    seed = space.search.seed
    if space.search.algorithm == "nsga2":
        # Optuna's default population (50) would leave a search of a few dozen trials random throughout:
        # a quarter of the budget per generation lets it evolve a few times.
        population = max(2, min(50, space.budget.trials // 4))
        return NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints)
    return TPESampler(seed=seed, constraints_func=constraints)


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
        if self._constraints and trial_id in self._ot_trials:  # Optuna reads them for pruned trials too
            self._ot_trials[trial_id].set_user_attr(VIOLATIONS_ATTR, violations(values, self._constraints))
        super().on_trial_complete(trial_id, result=result, error=error)
