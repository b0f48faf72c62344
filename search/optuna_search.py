"""dettune's searcher: a Ray Tune ``Searcher`` over an Optuna study, through Optuna's public ask/tell interface.

TPE (Bergstra et al., NeurIPS 2011) or NSGA-II (Deb et al., IEEE TEVC 2002), over the primary metric alone or over
several objectives, within hard limits.

A trial reports its costs at some epochs only (FPS after the first and the last) and ASHA may stop it in between,
so the searcher folds every result into the trial's values (:func:`spaces.objectives.fold_row`: val scores of its
best epoch by the primary metric, costs as last measured) and tells Optuna those when the trial ends. With one
objective, each epoch's primary value is also reported to the trial (its intermediate values, by epoch), as the
warm-start trials carry them. ASHA prunes on the primary metric alone, which is also the only metric Tune is told
the searcher needs in every result.

With limits, each finished trial gets one constraint value per limit (<= 0 where met) through
``Trial.set_constraint``, which Optuna's constrained TPE and NSGA-II read (infeasible trials rank after feasible
ones).

Tune saves the searcher with its experiment and restores it on ``dettune resume``: the study (Optuna documents
pickling an in-memory study to resume it), the trials asked and not yet told, and their values so far.

The in-memory study decides; a :class:`StudyMirror` copies each finished trial into an Optuna RDB storage, where
``optuna-dashboard`` opens it. The copy is a view: a driver killed after a trial was copied but before Tune saved
the searcher tells that trial again on resume, and the mirror skips what it already holds. Copies go out on a thread
of their own (a storage commit per trial: 30-70 ms on SQLite, which Tune's loop waited for), and every copy handed
over is made before Tune saves the searcher; a copy lost with a killed driver is made when the searcher is restored.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import optuna
from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, Trial, TrialState
from ray.tune.search import Searcher

from search.tracking import TrackingSettings
from spaces.objectives import fold_row, limit_violations
from spaces.schema import Space
from tracking_names.storage import Storage
from trainers.metrics import EPOCH

TRIAL_ATTR = "dettune.trial"
"""The Tune trial id each study trial carries (a user attribute): the trial's MLflow run has the same tag."""
WARM_START_ATTR = "dettune.warm_start"
"""The earlier search's trial a warm-start trial was made from (search/staging.py)."""


def make_sampler(space: Space) -> BaseSampler:
    """The space's Optuna sampler."""
    seed = space.search.seed
    if space.search.algorithm == "nsga2":
        # Optuna's default population (50) would leave a search of a few dozen trials random throughout:
        # a quarter of the budget per generation lets it evolve a few times.
        return NSGAIISampler(population_size=max(2, min(50, space.budget.trials // 4)), seed=seed)
    return TPESampler(seed=seed, n_startup_trials=tpe_startup_trials(space.budget.trials))


def tpe_startup_trials(trials: int) -> int:
    """Random trials before TPE models: a fifth of the budget, 2 to Optuna's default 10.

    Optuna's 10 would leave most of a search of a few dozen trials random: in the anytime race's replay
    (bench/race_replay.py, README) 5 of 26 found a better detector than 10 by the budget's end on both grids.
    """
    return max(2, min(10, trials // 5))


def new_study(space: Space, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """An empty study for the space: one direction per objective, the space's sampler, named after the search."""
    directions: list[StudyDirection] = [StudyDirection.MAXIMIZE if mode == "max" else StudyDirection.MINIMIZE
                                        for _, mode in space.directions()]
    return optuna.create_study(storage=storage, study_name=space.name, directions=directions,
                               sampler=make_sampler(space))


class StudyMirror:
    """The search's finished trials, copied into an Optuna storage under the search's name, each once.

    Where is read from the search's saved tracking settings each time the driver (re)starts, so a resumed search
    given another ``--study-storage`` copies there: Tune restores this object from its snapshot, not from them.
    """

    def __init__(self, settings_file: Path | Storage, space: Space, *, fresh: bool) -> None:
        """Args:
            settings_file: The search's ``search.json`` (:class:`~search.tracking.TrackingSettings`).
            space: The search's space (its name and directions name the study).
            fresh: A new search: a study left under its name by an earlier search of that name is deleted.
        """
        self._settings_file = settings_file
        self._template = new_study(space)  # the name and directions, without a storage
        self._study: optuna.Study | None = None
        self._held: set[tuple[str, Any]] | None = None
        self._copier: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        if fresh:
            self._delete_stale()

    @property
    def uri(self) -> str:
        """The Optuna storage URL (credentials, if any, are in PGUSER/PGPASSWORD)."""
        return TrackingSettings.load(self._settings_file).effective_study_uri(self._settings_file.parent.parent)

    def add(self, trials: Iterable[FrozenTrial]) -> None:
        """Hands the finished ones of ``trials`` to the copying thread, which copies those the storage lacks.

        A copy that failed is raised here, in the caller, once it is known (or in :meth:`wait_copied`).
        """
        finished = [t for t in trials if t.state.is_finished()]
        if finished:
            if self._copier is None:
                self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dettune-study-copy")
            self._pending.append(self._copier.submit(self._copy_missing, finished))
        self._collect(wait=False)

    def wait_copied(self) -> None:
        """Waits until every copy handed over so far is made; raises the first that failed."""
        self._collect(wait=True)

    def _collect(self, *, wait: bool) -> None:
        running: list[Future[None]] = []
        for copy in self._pending:
            if wait or copy.done():
                copy.result()
            else:
                running.append(copy)
        self._pending = running

    def _copy_missing(self, finished: list[FrozenTrial]) -> None:
        study, held = self._opened()  # only the copying thread touches the storage after __init__
        new = [t for t in finished if _identity(t) not in held]
        study.add_trials(new)
        held.update(_identity(t) for t in new)

    def _opened(self) -> tuple[optuna.Study, set[tuple[str, Any]]]:
        """The study, and what it holds: read once per driver (this copy is its only writer)."""
        if self._study is None or self._held is None:
            self._study = optuna.create_study(storage=self.uri, study_name=self._template.study_name,
                                              directions=self._template.directions, load_if_exists=True)
            self._held = {_identity(t) for t in self._study.get_trials(deepcopy=False)}
        return self._study, self._held

    def _delete_stale(self) -> None:
        uri = self.uri
        names = {summary.study_name for summary in optuna.get_all_study_summaries(uri)}
        if self._template.study_name in names:
            optuna.delete_study(study_name=self._template.study_name, storage=uri)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher (after wait_copied): the storage is read again, the thread made again.
        return {**self.__dict__, "_study": None, "_held": None, "_copier": None, "_pending": []}


def _identity(trial: FrozenTrial) -> tuple[str, Any]:
    if TRIAL_ATTR in trial.user_attrs:
        return TRIAL_ATTR, trial.user_attrs[TRIAL_ATTR]
    return WARM_START_ATTR, trial.user_attrs.get(WARM_START_ATTR, trial.number)


class ObjectiveSearch(Searcher):  # type: ignore[misc]
    """Asks the study for each trial's point and tells it each trial's values over all its results."""

    def __init__(self, space: Space, *, study: optuna.Study | None = None, mirror: StudyMirror | None = None
                 ) -> None:
        """Args:
            space: The search's space: its knobs, objectives, limits and algorithm.
            study: The study to ask and tell (made by :func:`new_study`), possibly holding earlier (warm-start)
                trials or living in an Optuna storage; by default a new in-memory one.
            mirror: Where the study's finished trials are copied as they finish (warm-start trials at once).
        """
        super().__init__(metric=space.metric, mode=space.mode)
        self._distributions = space.optuna_space()
        self._objectives = [metric for metric, _ in space.directions()]
        self._constraints = dict(space.constraints)
        self._study = study if study is not None else new_study(space)
        self._asked: dict[str, Trial] = {}
        self._values: dict[str, dict[str, float]] = {}
        self._mirror = mirror
        self._copy(self._study.get_trials(deepcopy=False))

    @property
    def study(self) -> optuna.Study:
        """The Optuna study: every trial asked so far, and what it was told."""
        return self._study

    def suggest(self, trial_id: str) -> dict[str, Any]:
        trial = self._study.ask(self._distributions)
        trial.set_user_attr(TRIAL_ATTR, trial_id)
        self._asked[trial_id] = trial
        return dict(trial.params)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._fold(trial_id, result)
        primary = result.get(self.metric)
        if len(self._objectives) == 1 and trial_id in self._asked and primary is not None and EPOCH in result:
            self._asked[trial_id].report(primary, step=int(result[EPOCH]))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Tells Optuna how the trial ended: FAIL on error, COMPLETE with its values, PRUNED without them.

        ASHA's stop comes here with the result it stopped on, which ``on_trial_result`` never saw.
        """
        if result:
            self._fold(trial_id, result)
        values = self._values.pop(trial_id, {})
        trial = self._asked.pop(trial_id, None)
        if trial is None:  # told already (Tune reports some ends twice)
            return
        self._copy([self._tell(trial, values, error=error)])

    def _tell(self, trial: Trial, values: dict[str, float], *, error: bool) -> FrozenTrial:
        if error:
            return self._study.tell(trial, state=TrialState.FAIL)
        if any(metric not in values for metric in self._objectives):
            return self._study.tell(trial, state=TrialState.PRUNED)
        for key, violation in limit_violations(values, self._constraints).items():
            trial.set_constraint(key, violation)
        # A NaN value makes the trial FAIL, with Optuna's warning.
        return self._study.tell(trial, [values[metric] for metric in self._objectives])

    def _copy(self, trials: Iterable[FrozenTrial]) -> None:
        if self._mirror is not None:
            self._mirror.add(trials)

    def _fold(self, trial_id: str, result: dict[str, Any]) -> None:
        row = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._values[trial_id] = fold_row(self._values.get(trial_id, {}), row, primary=self.metric, mode=self.mode)

    def save(self, checkpoint_path: str) -> None:
        if self._mirror is not None:
            self._mirror.wait_copied()  # what Tune saves as told is in the copy too
        with open(checkpoint_path, "wb") as out:
            pickle.dump({"study": self._study, "asked": self._asked, "values": self._values, "mirror": self._mirror},
                        out)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as saved:
            state = pickle.load(saved)
        self._study, self._asked, self._values = state["study"], state["asked"], state["values"]
        self._mirror = state["mirror"]
        self._copy(self._study.get_trials(deepcopy=False))  # those a killed driver told but had not copied
