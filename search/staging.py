"""Staged searches: a space builds on earlier searches of the same tracking store.

- ``inherit: [a, b]``: every knob the space neither searches nor fixes takes the value of the best completed trial
  of ``a``, then of ``b`` (a later search wins). The best trial is ranked by its own search's metric, at its best
  epoch, as the report and ``dettune export`` rank it.
- ``warm_start: [a]``: the earlier trials whose searched values lie inside this space, and whose every other knob
  (base config, data, overrides, fixed knobs, epochs) equals this search's, are told to the searcher before its
  first proposal: a trial ASHA stopped as Optuna's PRUNED with its value at each epoch it reached, a completed
  one as COMPLETE with its last epoch's value (what Tune itself tells the searcher). Grid searches skip the grid
  points an earlier search already trained to the full budget.

Reading the store is :func:`stage_from_store` and :func:`check_chain`; the rest is pure logic over the records
read back (:class:`~results.store.TrialRecord`), and :func:`warm_trials` makes the Optuna trials.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from mmconfigs.validate import combinations
from results.store import SearchHandle, TrialRecord, open_search
from spaces.distributions import Choice, Distribution, Grid, QUniform, RandInt
from spaces.errors import NotFound, UserError
from spaces.knobs import param_text
from spaces.schema import Space
from tracking_names import TAG_INHERITED, TAG_WARM_START, check_reachable

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

COMPLETED = "completed"
STOPPED = "stopped"


class StagingError(UserError):
    """An earlier search named by ``inherit`` or ``warm_start`` can't be used; the message says the fix."""


@dataclass(frozen=True, kw_only=True)
class EarlierSearch:
    """A search this space builds on: its space and its trials, as MLflow holds them."""

    name: str
    space: Space
    trials: Sequence[TrialRecord]


@dataclass(frozen=True, kw_only=True)
class Inherited:
    """One knob value taken from an earlier search's best trial."""

    knob: str
    value: Any
    trial: str  # the trial's experiment number, e.g. backbone-vs-map-3
    metric: str
    score: float

    def line(self) -> str:
        """``backbone = r101  from backbone-vs-map-3, val/bbox_mAP 45.2`` (mAPs in percent, as the log)."""
        return f"{self.knob} = {param_text(self.value)}  from {self.trial}, {self.metric} {100 * self.score:.1f}"


@dataclass(frozen=True, kw_only=True)
class WarmPoint:
    """An earlier trial as the searcher is told it."""

    trial: str
    values: dict[str, Any]  # the searched knobs only
    intermediate: dict[int, float]  # this search's metric by epoch
    pruned: bool

    @property
    def value(self) -> float | None:
        """A completed trial's last value; a pruned trial has none (Optuna ranks it by its intermediates)."""
        return None if self.pruned else self.intermediate[max(self.intermediate)]


@dataclass(frozen=True, kw_only=True)
class LeftOut:
    trial: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class WarmStart:
    points: tuple[WarmPoint, ...] = ()
    left_out: tuple[LeftOut, ...] = ()

    def full_budget(self) -> list[dict[str, Any]]:
        """The searched values of the earlier trials that trained every epoch: a grid need not train them again."""
        return [point.values for point in self.points if not point.pruned]


@dataclass(frozen=True, kw_only=True)
class Staging:
    """What a space takes from earlier searches; :attr:`space` has the inherited knobs in ``fixed``."""

    space: Space
    inherited: tuple[Inherited, ...] = ()
    warm: WarmStart = WarmStart()
    pending: tuple[str, ...] = ()  # earlier searches not in the store yet (``validate`` only)

    @property
    def grid(self) -> list[dict[str, Any]] | None:
        """A grid search's points that are left to train, or None when nothing is skipped."""
        if self.space.search.algorithm != "grid" or not self.warm.full_budget():
            return None
        return remaining_grid(combinations(self.space), self.warm)

    def lines(self) -> list[str]:
        """The summary ``dettune validate`` prints."""
        lines = [f"inherited   {item.line()}" for item in self.inherited]
        lines += [f"pending     {name}: not in the tracking store yet; its values come in when it has run "
                  "(chain it: dettune search EARLIER.yaml THIS.yaml)" for name in self.pending]
        if self.space.warm_start:
            lines.append(f"warm start  {_warm_summary(self.warm)}")
            lines += [f"  left out  {item.trial}: {item.reason}" for item in self.warm.left_out]
        grid = self.grid
        if grid is not None:
            total = len(combinations(self.space))
            lines.append(f"grid        {total - len(grid)} of {total} points already trained to the full budget "
                         f"are skipped: {len(grid)} left to train")
        return lines


def _warm_summary(warm: WarmStart) -> str:
    pruned = sum(point.pruned for point in warm.points)
    return (f"{len(warm.points)} earlier trials used ({len(warm.points) - pruned} completed, {pruned} stopped by "
            f"ASHA, told as pruned), {len(warm.left_out)} left out")


# --- reading earlier searches -----------------------------------------------------------------------------

def stage_from_store(space: Space, tracking_uri: str, *, pending_ok: bool = False) -> Staging:
    """Reads the searches ``space`` names in ``inherit`` and ``warm_start`` and stages it on them.

    Args:
        space: The space as written.
        tracking_uri: The tracking store the search writes to: earlier searches are read from the same one.
        pending_ok: A search not in the store yet is pending (``validate`` of a chain not run yet), not an error.

    Raises:
        StagingError: A named search is not in the store (unless ``pending_ok``), has no completed trial to
            inherit, optimises in the other direction, or a grid search has no point left to train.
    """
    names = list(dict.fromkeys([*space.inherit, *space.warm_start]))
    if not names:
        return Staging(space=space)
    client = _open_store(tracking_uri)
    earlier: dict[str, EarlierSearch] = {}
    pending: list[str] = []
    for name in names:
        field = "inherit" if name in space.inherit else "warm_start"
        try:
            earlier[name] = read_earlier(client, name, field, tracking_uri)
        except StagingError:
            if not pending_ok:
                raise
            pending.append(name)
    staging = stage(space, earlier, pending)
    if staging.grid == []:
        raise StagingError(f"warm_start: {', '.join(space.warm_start)} already trained every grid point of "
                           f"{space.name} to the full budget: nothing is left to search; remove warm_start to "
                           "train them again")
    return staging


def check_chain(spaces: Sequence[tuple[str, Space]], tracking_uri: str) -> None:
    """Fails before a chain's first search runs if a space names a search that neither the tracking store nor an
    earlier space of the chain holds.

    Args:
        spaces: Each space of the chain with its file, in the order they run.
        tracking_uri: The store every search of the chain writes to.

    Raises:
        StagingError: One line per unknown name.
    """
    client = _open_store(tracking_uri)
    problems: list[str] = []
    chained: set[str] = set()
    for file, space in spaces:
        for name in dict.fromkeys([*space.inherit, *space.warm_start]):
            if name not in chained and (client is None or client.get_experiment_by_name(name) is None):
                problems.append(f"{file}: {name} is neither in {tracking_uri} nor earlier in the chain: put its "
                                f"space before {file}, fix the name, or pass the --tracking-uri it used")
        chained.add(space.name)
    if problems:
        raise StagingError("\n".join(problems))


def _open_store(tracking_uri: str) -> MlflowClient | None:
    """A client for the store, or None where a local SQLite store does not exist yet (nothing has run there)."""
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        return None
    check_reachable(tracking_uri)
    return MlflowClient(tracking_uri)


def read_earlier(client: MlflowClient | None, name: str, field: str, tracking_uri: str) -> EarlierSearch:
    """Reads an earlier search back from the tracking store.

    Raises:
        StagingError: No search of that name in the store.
    """
    run_first = f"run it first, or both in one chain: dettune search {name}.yaml THIS.yaml"
    if client is None:
        raise StagingError(f"{field}: no search named {name!r}: the tracking store {tracking_uri} does not exist "
                           f"yet: {run_first}, or pass the --tracking-uri it used")
    try:
        handle: SearchHandle = open_search(client, name)
    except NotFound as error:
        raise StagingError(f"{field}: {error}; or {run_first}") from None
    return EarlierSearch(name=name, space=handle.space, trials=handle.trials())


def stage(space: Space, earlier: Mapping[str, EarlierSearch], pending: Iterable[str] = ()) -> Staging:
    """Applies ``inherit`` and collects the ``warm_start`` points of ``space``.

    Args:
        space: The space as written.
        earlier: Every search named by ``inherit`` and ``warm_start`` that the store holds.
        pending: Named searches the store does not hold yet; they contribute nothing.

    Raises:
        StagingError: An inherited search has no completed trial or optimises in the other direction.
    """
    inherited = inherit(space, [earlier[name] for name in space.inherit if name in earlier])
    staged = with_inherited(space, inherited)
    warm = warm_points(staged, [earlier[name] for name in space.warm_start if name in earlier])
    return Staging(space=staged, inherited=tuple(inherited), warm=warm, pending=tuple(pending))


# --- inherit ------------------------------------------------------------------------------------------------

def inherit(space: Space, sources: Sequence[EarlierSearch]) -> list[Inherited]:
    """The knob values ``space`` takes from ``sources``' best trials; a later source wins."""
    own = {*space.space, *space.fixed, "epochs"}
    taken: dict[str, Inherited] = {}
    for source in sources:
        if source.space.mode != space.mode:
            raise StagingError(
                f"inherit: {source.name} {_goal(source.space)} but this space {_goal(space)}: its best trial is "
                f"the wrong one for this search; set mode: {source.space.mode} or inherit from another search")
        best = best_trial(source)
        score = best.score(source.space.metric, source.space.mode)
        assert score is not None  # best_trial ranks only trials with a score
        for knob, value in source.space.values_from_params(best.params).items():
            if knob not in own:
                taken[knob] = Inherited(knob=knob, value=value, trial=best.exp_num, metric=source.space.metric,
                                        score=score)
    return list(taken.values())


def _goal(space: Space) -> str:
    return f"{'maximises' if space.mode == 'max' else 'minimises'} {space.metric}"


def best_trial(source: EarlierSearch) -> TrialRecord:
    """The completed trial with the best score by the search's own metric and mode.

    Raises:
        StagingError: No trial trained its full budget with a score.
    """
    metric, mode = source.space.metric, source.space.mode
    done = [t for t in source.trials if t.status == COMPLETED and t.score(metric, mode) is not None]
    if not done:
        raise StagingError(f"inherit: {source.name} has no completed trial to inherit from (its trials: "
                           f"{_statuses(source.trials)}): finish it with `dettune resume {source.name}`, "
                           "or inherit from another search")
    pick = max if mode == "max" else min
    return pick(done, key=lambda t: t.score(metric, mode) or 0.0)


def _statuses(trials: Sequence[TrialRecord]) -> str:
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"


def with_inherited(space: Space, inherited: Sequence[Inherited]) -> Space:
    """The space with the inherited values added to ``fixed`` (its own searched and fixed knobs are kept)."""
    if not inherited:
        return space
    data = space.to_json()
    data["fixed"] = {**{item.knob: item.value for item in inherited}, **data["fixed"]}
    return Space.from_json(data, f"{space.name} (inherited values)")


# --- warm start -----------------------------------------------------------------------------------------------

def warm_points(space: Space, sources: Sequence[EarlierSearch]) -> WarmStart:
    """Sorts the earlier trials into those the searcher is told and those left out, with the reason."""
    points: list[WarmPoint] = []
    left_out: list[LeftOut] = []
    for source in sources:
        for trial in source.trials:
            point_or_reason = _warm_point(space, source, trial)
            if isinstance(point_or_reason, WarmPoint):
                points.append(point_or_reason)
            else:
                left_out.append(LeftOut(trial=trial.exp_num, reason=point_or_reason))
    return WarmStart(points=tuple(points), left_out=tuple(left_out))


def _warm_point(space: Space, source: EarlierSearch, trial: TrialRecord) -> WarmPoint | str:
    """The trial as a warm-start point, or why it is left out."""
    if trial.status not in (COMPLETED, STOPPED):
        return f"{trial.status}, not completed or stopped by ASHA"
    setting = _setting_differs(space, source.space)
    if setting:
        return setting
    values = source.space.values_from_params(trial.params)
    for knob, dist in space.space.items():
        if knob not in values:
            return f"it has no {knob} (the base config's default), this space searches it"
        if not contains(dist, values[knob]):
            return f"{knob} {param_text(values[knob])} is outside this space's {dist.kind} {dist.args()}"
    shared = space.point_defaults()
    for knob in sorted({*values, *shared} - set(space.space)):
        if knob not in values or knob not in shared or param_text(values[knob]) != param_text(shared[knob]):
            ours = param_text(shared[knob]) if knob in shared else "the base config's default"
            theirs = param_text(values[knob]) if knob in values else "the base config's default"
            return f"{knob} {theirs}, this search has {ours}"
    intermediate = {p.step: p.value for p in trial.history.get(space.metric, ())}
    if not intermediate:
        return f"it reported no {space.metric}"
    return WarmPoint(trial=trial.exp_num, values={k: values[k] for k in space.space}, intermediate=intermediate,
                     pruned=trial.status == STOPPED)


def _setting_differs(space: Space, earlier: Space) -> str | None:
    """What makes every trial of ``earlier`` incomparable to this search, if anything."""
    for what, ours, theirs in (("base config", space.base, earlier.base),
                               ("dataset", space.data.model_dump(), earlier.data.model_dump()),
                               ("overrides", space.overrides, earlier.overrides)):
        if ours != theirs:
            return f"its {what} differs ({json.dumps(theirs)}, this search: {json.dumps(ours)})"
    return None


def contains(dist: Distribution, value: Any) -> bool:
    """Whether ``dist`` can produce ``value``."""
    if isinstance(dist, Choice | Grid):
        return any(param_text(value) == param_text(option) for option in dist.values)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(dist, RandInt):
        return float(value).is_integer() and dist.low <= value < dist.high
    inside = bool(dist.low <= value <= dist.high)  # type: ignore[union-attr]
    if isinstance(dist, QUniform):
        return inside and abs(value / dist.q - round(value / dist.q)) < 1e-9
    return inside


def warm_trials(space: Space, warm: WarmStart) -> list[FrozenTrial]:
    """The warm-start trials as finished Optuna trials, to add to the search's study before its first proposal."""
    import optuna

    from search.optuna_search import WARM_START_ATTR

    distributions = space.optuna_space()
    return [optuna.trial.create_trial(
        state=optuna.trial.TrialState.PRUNED if point.pruned else optuna.trial.TrialState.COMPLETE,
        value=point.value, intermediate_values=point.intermediate, distributions=distributions,
        params=space.encode_optuna(point.values),
        user_attrs={WARM_START_ATTR: point.trial}) for point in warm.points]


def remaining_grid(grid: Sequence[Mapping[str, Any]], warm: WarmStart) -> list[dict[str, Any]]:
    """The grid points no earlier search trained to the full budget."""
    done = {json.dumps(point, sort_keys=True) for point in warm.full_budget()}
    return [dict(point) for point in grid if json.dumps(dict(point), sort_keys=True) not in done]


def tags(staging: Staging) -> dict[str, str]:
    """What the parent run records of the earlier searches (only when the space builds on one)."""
    out: dict[str, str] = {}
    if staging.inherited:
        out[TAG_INHERITED] = "\n".join(item.line() for item in staging.inherited)
    if staging.space.warm_start:
        out[TAG_WARM_START] = f"{', '.join(staging.space.warm_start)}: {_warm_summary(staging.warm)}"
    return out
