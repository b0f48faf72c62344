"""The search-space file: what to search, on which data, with how much compute.

An example, with every section (optional ones are marked)::

    name: backbone-vs-map
    base: mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py
    data: {root: data/trash, train: train.json, val: val.json, images: images}  # images: default "images"
    metric: val/bbox_mAP            # optional, default val/bbox_mAP; one of METRICS
    mode: max                       # optional: max (default) | min
    hypothesis: "..."               # optional free text
    method: "..."                   # optional free text
    budget: {epochs: 12, trials: 16, gpus_per_trial: 1, cpus_per_worker: 2, max_concurrent: 4, max_retries: 2}
    # budget.hours: 8                # optional: the search ends after 8 h (README "A time budget")
    objectives: [{metric: inference/fps, mode: max}]               # optional: more objectives than metric
    constraints: {inference/fps: {min: 10}, model/params_M: {max: 60}}  # optional hard limits
    search: {algorithm: tpe, seed: 0}                   # optional: tpe (default) | nsga2 | random | grid
    scheduler: {type: asha, grace_epochs: 1, reduction_factor: 3}  # optional, or {type: none}
    space:
      backbone: {choice: [r50, r101, swin-t]}
      lr: {loguniform: [1.0e-4, 2.0e-2]}
    fixed: {batch_size: 2, preset: tiny}                           # optional
    overrides: {model.rpn_head.anchor_generator.scales: [8]}       # optional raw config edits
    pretrained: {r50: /path/to/r50.pth}                            # optional local ImageNet checkpoints
    inherit: [backbone-vs-map]      # optional: knobs neither searched nor fixed take these searches' best values
    warm_start: [backbone-vs-map]   # optional: earlier trials inside this space are told to the searcher first

:func:`load_space` reads such a file and checks it whole: YAML syntax, field types, unknown fields and the
rules below all end up as :class:`~spaces.errors.Problem` entries of a single
:class:`~spaces.errors.SpaceError`. Files on disk (the base config, the data) are checked elsewhere.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from spaces.distributions import (
    Choice,
    Distribution,
    Grid,
    LogUniform,
    QUniform,
    RandInt,
    Uniform,
    parse_distribution,
)
from spaces.errors import MISSING, Problem, Problems, SpaceError
from spaces.knobs import KNOBS, param_text
from spaces.objectives import COST_METRICS

METRICS = (
    "val/bbox_mAP",
    "val/bbox_mAP_50",
    "val/bbox_mAP_75",
    "val/bbox_mAP_s",
    "val/bbox_mAP_m",
    "val/bbox_mAP_l",
)
"""The metric names the trainer logs; ``metric`` must be one of them."""

TRIAL_METRICS = (*METRICS, *COST_METRICS)
"""What every trial reports: objectives and constraints may use any of them."""

AFTER_SEARCH_METRICS = {"lb/public_mAP": "`dettune lb` records it after the search"}
"""Metrics dettune records that no trial reports, so no objective or limit can use them."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""What a space ``name`` looks like (it names MLflow experiments and output folders)."""

TOP_LEVEL = "(top level)"
"""The field path of the document itself."""

_BASE_EXAMPLE = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"


class _Section(BaseModel):
    """Base for every model of the file: unknown fields are errors, no type coercion, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class OnBadBoxes(_Section):
    """``on_bad: {boxes: clip}``: skip bad items, but clip a box that reaches past its image instead of dropping it."""

    boxes: Literal["clip"] = Field(description="clip: boxes outside the image are clipped to it")


class DataSpec(_Section):
    """A COCO-format dataset: annotation files and the image folder, relative to ``root``."""

    root: str = Field(description="dataset folder")
    train: str = Field(description="training annotations (COCO json), relative to root")
    val: str = Field(description="validation annotations (COCO json), relative to root")
    images: str = Field(default="images", description="image folder, relative to root")
    on_bad: Literal["refuse", "skip"] | OnBadBoxes = Field(
        default="refuse", description="bad images and boxes: refuse (stop the search), skip (train on a cleaned "
        "copy of the annotations), or {boxes: clip} (skip, but clip boxes outside their image)")

    @property
    def skips_bad(self) -> bool:
        return self.on_bad != "refuse"

    @property
    def clips_boxes(self) -> bool:
        return isinstance(self.on_bad, OnBadBoxes)


class Budget(_Section):
    """How much each trial trains and how many trials run, on which resources."""

    epochs: int = Field(ge=1, description="training epochs of every trial")
    trials: int = Field(ge=1, description="number of trials (Ray Tune num_samples)")
    gpus_per_trial: int | float = Field(
        default=0, ge=0, description="GPUs per trial; 0 trains on CPU workers, a fraction shares one GPU"
    )
    workers_per_trial: int = Field(
        default=1, ge=1, description="training processes per trial; default max(gpus_per_trial, 1)"
    )
    cpus_per_worker: int = Field(default=1, ge=1, description="CPUs per training process")
    max_concurrent: int = Field(default=1, ge=1, description="trials running at the same time")
    max_retries: int = Field(default=2, ge=0, description="retries of a trial whose process died")
    hours: float | None = Field(
        default=None, gt=0, allow_inf_nan=False,
        description="wall-clock hours the search may run; it ends then, each running trial at its next epoch",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_workers(cls, data: Any) -> Any:
        """Defaults ``workers_per_trial`` to one worker per GPU, and one on CPU."""
        if isinstance(data, dict) and data.get("workers_per_trial") is None:
            gpus = data.get("gpus_per_trial", 0)
            if isinstance(gpus, int) and not isinstance(gpus, bool):
                data = {**data, "workers_per_trial": max(gpus, 1)}
        return data


class SearchSpec(_Section):
    """The search algorithm: Optuna TPE, random sampling, or Ray Tune's grid search."""

    algorithm: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    seed: int = 0

    @property
    def uses_optuna(self) -> bool:
        """Whether an Optuna sampler proposes the trials (its choices come back encoded)."""
        return self.algorithm in ("tpe", "nsga2")


class Objective(_Section):
    """One more objective beside the primary ``metric``."""

    metric: str = Field(description="a metric every trial reports, e.g. inference/fps")
    mode: Literal["max", "min"] = Field(description="max or min")


class Limit(_Section):
    """A hard limit on one metric: a trial outside it is never the best."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Limit:
        if self.min is None and self.max is None:
            raise ValueError("a limit needs min or max, e.g. {min: 10}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min <= max must hold, but got (min={self.min:g}, max={self.max:g})")
        return self

    def text(self) -> str:
        """``>= 10``, ``<= 60`` or ``>= 10 and <= 60``."""
        bounds = [f"{sign} {bound:g}" for sign, bound in ((">=", self.min), ("<=", self.max)) if bound is not None]
        return " and ".join(bounds)


class SchedulerSpec(_Section):
    """Early stopping of weak trials: ASHA, or none (every trial trains all ``budget.epochs``)."""

    type: Literal["asha", "none"] = "asha"
    grace_epochs: int = Field(default=1, ge=1, description="epochs a trial trains before ASHA may stop it")
    reduction_factor: int = Field(default=3, ge=2, description="ASHA keeps 1 / factor of trials per rung")


def _one_or_many(value: Any) -> Any:
    """Accepts ``inherit: name`` as ``inherit: [name]``."""
    return [value] if isinstance(value, str) else value


SearchNames = Annotated[list[str], BeforeValidator(_one_or_many)]
"""Earlier searches by name: one name or a list (``inherit``, ``warm_start``)."""

DistributionField = Annotated[
    Distribution,
    PlainValidator(parse_distribution),
    PlainSerializer(lambda dist: dist.to_json(), return_type=dict),
]
"""A distribution in a model field: parsed from and dumped to its one-key mapping."""


class Space(_Section):
    """A whole search-space file; build it with :func:`load_space` or :meth:`from_json` to check its rules."""

    name: str = Field(pattern=NAME_PATTERN.pattern, description="name of the search, e.g. backbone-vs-map")
    base: str = Field(min_length=1, description=f"MMDetection base config, e.g. {_BASE_EXAMPLE}")
    data: DataSpec = Field(description="dataset: {root, train, val, images}")
    metric: str = "val/bbox_mAP"
    mode: Literal["max", "min"] = "max"
    objectives: list[Objective] = Field(default_factory=list)
    constraints: dict[str, Limit] = Field(default_factory=dict)
    hypothesis: str | None = None
    method: str | None = None
    budget: Budget = Field(description="{epochs, trials, gpus_per_trial, ...}")
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    space: dict[str, DistributionField] = Field(
        description="knob -> distribution, e.g. lr: {loguniform: [1.0e-4, 1.0e-2]}"
    )
    fixed: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)
    pretrained: dict[str, str] = Field(default_factory=dict)
    inherit: SearchNames = Field(
        default_factory=list,
        description="earlier searches whose best trial gives every knob this space neither searches nor fixes; "
        "with several, a later one wins",
    )
    warm_start: SearchNames = Field(
        default_factory=list, description="earlier searches whose trials inside this space the searcher is told first"
    )

    def to_json(self) -> dict[str, Any]:
        """Returns the space as plain JSON data; :meth:`from_json` reads it back equal."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: Any, file: str = "<json>") -> Space:
        """Builds a space from :meth:`to_json` data (or any mapping of the YAML fields), checking every rule.

        Raises:
            SpaceError: With every problem found; ``file`` names the source in the messages.
        """
        return validate_space(data, file)

    def directions(self) -> list[tuple[str, str]]:
        """Every objective as (metric, mode), the primary ``metric`` first."""
        return [(self.metric, self.mode), *((o.metric, o.mode) for o in self.objectives)]

    def tune_param_space(self) -> dict[str, Any]:
        """Returns the searched knobs as Ray Tune search-space objects (fixed knobs are not included).

        With ``search.algorithm: grid`` a ``choice`` becomes a grid search too, so every value is tried.
        """
        grid = self.search.algorithm == "grid"
        return {
            name: Grid(values=dist.values).to_tune() if grid and isinstance(dist, Choice) else dist.to_tune()
            for name, dist in self.space.items()
        }

    def optuna_space(self) -> dict[str, Any]:
        """Returns the searched knobs as Optuna distributions; decode samples with :meth:`decode_optuna`."""
        return {name: dist.to_optuna() for name, dist in self.space.items()}

    def point(self, sampled: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's full knob values: the fixed knobs plus the sampled ones, as the searcher gave them.

        Only Optuna (``tpe``, ``nsga2``) encodes choices (``"[800, 800]"``); Tune's grid and random samplers give
        the values themselves, which must not be decoded.
        """
        values = self.decode_optuna(dict(sampled)) if self.search.uses_optuna else dict(sampled)
        return {**self.point_defaults(), **values}

    def decode_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        """Returns Optuna-sampled ``params`` with encoded choices turned back into their real values."""
        return {
            name: self.space[name].decode_optuna(value) if name in self.space else value
            for name, value in params.items()
        }

    def encode_optuna(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The inverse of :meth:`decode_optuna`: searched knobs' values as Optuna stores them."""
        return {name: _optuna_value(self.space[name], value) for name, value in values.items() if name in self.space}

    def values_from_params(self, params: Mapping[str, str]) -> dict[str, Any]:
        """A trial's knob values, typed again: MLflow keeps params as text (``scale`` ``1024x1024``).

        Fixed knobs come from the space as written; searched ones are matched against their distribution.
        """
        values: dict[str, Any] = self.point_defaults()
        for knob, dist in self.space.items():
            if knob in params:
                values[knob] = _param_value(dist, params[knob])
        return values

    def grid_size(self) -> int | None:
        """Returns the number of grid points if every searched knob is a choice or grid, else None."""
        sizes = [len(dist.values) for dist in self.space.values() if isinstance(dist, Choice | Grid)]
        return math.prod(sizes) if len(sizes) == len(self.space) else None

    def point_defaults(self) -> dict[str, Any]:
        """Returns the knob values every trial shares: the fixed knobs and ``epochs``."""
        return {**copy.deepcopy(self.fixed), "epochs": self.budget.epochs}


# ---------------------------------------------------------------------------------------------------------
# Loading: YAML -> plain data -> typed sections -> rules, every problem collected.


def load_space(path: str | Path) -> Space:
    """Reads and checks a search-space YAML file.

    Args:
        path: The file.

    Returns:
        The space.

    Raises:
        SpaceError: With every problem: unreadable file, YAML syntax, wrong types, unknown fields and broken
            rules, each with its dotted field path.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise SpaceError([Problem(file, TOP_LEVEL, MISSING, f"can't read the file: {error}")]) from None
    data, duplicates = _parse_yaml(text, file)
    try:
        space = validate_space(data, file)
    except SpaceError as error:
        raise SpaceError([*duplicates, *error.problems]) from None
    if duplicates:
        raise SpaceError(duplicates)
    return space


def validate_space(data: Any, file: str = "<dict>") -> Space:
    """Checks plain data (parsed YAML or :meth:`Space.to_json` output) and builds the space.

    Raises:
        SpaceError: With every problem found.
    """
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        rule = f"must be a mapping of fields (name, base, data, budget, space, ...), but got {got}"
        raise SpaceError([Problem(file, TOP_LEVEL, data, rule)])
    problems = Problems(file)
    values = _validate_sections(data, problems)
    for check in _RULES:
        check(values, problems)
    if problems.items:
        raise SpaceError(problems.items)
    return Space.model_validate(values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that records duplicate mapping keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, Any]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                self.duplicates.append((key_node.start_mark.line + 1, key))
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, file: str) -> tuple[Any, list[Problem]]:
    """Parses YAML; returns the data and a problem per duplicate key, with its line number.

    Raises:
        SpaceError: For a syntax error, with its line number.
    """
    loader = _UniqueKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        raise SpaceError([_yaml_problem(error, text, file)]) from None
    finally:
        loader.dispose()  # type: ignore[no-untyped-call]
    problems = [
        Problem(file, f"line {line}", key, "duplicate key: YAML keeps only the last one, remove the others")
        for line, key in loader.duplicates
    ]
    return data, problems


def _yaml_problem(error: yaml.YAMLError, text: str, file: str) -> Problem:
    """Describes a YAML syntax error at its line."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:
        return Problem(file, TOP_LEVEL, MISSING, f"invalid YAML: {error}")
    lines = text.splitlines()
    source = lines[mark.line] if mark.line < len(lines) else ""
    parts = (getattr(error, "problem", None), getattr(error, "context", None))
    what = "; ".join(str(part) for part in parts if part)
    return Problem(file, f"line {mark.line + 1}", source, f"invalid YAML: {what} (column {mark.column + 1})")


def _adapters() -> dict[str, TypeAdapter[Any]]:
    """Returns a validator per top-level field, so each section is checked on its own."""
    if not _ADAPTERS:
        for name, info in Space.model_fields.items():
            annotation: Any = Annotated[info.annotation, *info.metadata] if info.metadata else info.annotation
            _ADAPTERS[name] = TypeAdapter(annotation)
    return _ADAPTERS


_ADAPTERS: dict[str, TypeAdapter[Any]] = {}


def _validate_sections(data: dict[Any, Any], problems: Problems) -> dict[str, Any]:
    """Validates every top-level field separately; returns the valid ones (defaults filled in).

    Validating section by section (and mapping sections such as ``space`` item by item) lets the rules run on
    everything that is valid even when something else is broken, so a single pass reports every problem.
    """
    fields = Space.model_fields
    for key in data:
        if key not in fields:
            problems.add(str(key), data[key], f"unknown field{_did_you_mean(str(key), fields)}")
    values: dict[str, Any] = {}
    for name, info in fields.items():
        if name in data:
            valid = _validate_section(name, data[name], problems)
            if valid is not _INVALID:
                values[name] = valid
        elif info.is_required():
            problems.add(name, MISSING, f"required field is missing: {info.description}")
        else:
            values[name] = info.get_default(call_default_factory=True)
    return values


_INVALID = object()


def _validate_section(name: str, raw: Any, problems: Problems) -> Any:
    """Validates one top-level field, adding its problems; returns ``_INVALID`` if it is broken.

    A broken section still gives its valid parts to the rules: a mapping section (``space``, ``fixed``, ...)
    its valid items, a model section (``budget``, ...) a dict of its valid fields and defaults.
    """
    adapter = _adapters()[name]
    try:
        return adapter.validate_python(raw, strict=True)
    except ValidationError as error:
        errors = error.errors()
    for item in errors:
        _add_pydantic_problem((name, *item["loc"]), item, problems)
    annotation = Space.model_fields[name].annotation
    if not isinstance(raw, dict):
        return _INVALID
    if get_origin(annotation) is dict:
        valid: dict[str, Any] = {}
        for key, value in raw.items():
            with contextlib.suppress(ValidationError):
                valid.update(adapter.validate_python({key: value}, strict=True))
        return valid
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        broken = {str(item["loc"][0]) for item in errors if item["loc"]}
        return {
            field: raw[field] if field in raw else info.get_default(call_default_factory=True)
            for field, info in annotation.model_fields.items()
            if field not in broken and (field in raw or not info.is_required())
        }
    return _INVALID


_FIXES = {
    "name": "letters, digits, '_', '.' and '-', starting with a letter or digit (it names the MLflow "
    "experiment and the output folder)",
    "base": f"name an MMDetection config, e.g. {_BASE_EXAMPLE}",
    "budget.epochs": "each trial trains at least one epoch",
    "budget.trials": "the search runs at least one trial",
    "budget.gpus_per_trial": "use 0 to train on CPU workers",
    "budget.workers_per_trial": "a trial needs at least one training process",
    "budget.cpus_per_worker": "a training process needs at least one CPU",
    "budget.max_concurrent": "at least one trial must be allowed to run",
    "budget.max_retries": "use 0 to never retry a failed trial",
    "budget.hours": "give the hours the search may run as a positive number, e.g. 1.5, or leave hours out "
    "for no time limit",
    "scheduler.grace_epochs": "ASHA's first rung is after at least one epoch",
    "scheduler.reduction_factor": "ASHA keeps 1 / reduction_factor of the trials at each rung (3 is usual)",
}
"""How to fix a broken constraint, by field path."""

_CONSTRAINTS = ("greater_than_equal", "greater_than", "finite_number", "float_parsing", "float_type",
                "string_pattern_mismatch", "string_too_short")
"""The pydantic error types of the ``Field`` constraints that :data:`_FIXES` explains."""


def _add_pydantic_problem(loc: tuple[Any, ...], item: Any, problems: Problems) -> None:
    """Adds one pydantic error as a problem at its dotted field path, with the fix where one is known."""
    field = ".".join(str(part) for part in loc)
    kind, value, ctx = item["type"], item.get("input"), item.get("ctx", {})
    if kind == "missing":
        section = _section_model(loc[:-1])
        info = section.model_fields.get(str(loc[-1])) if section else None
        value, rule = MISSING, "required field is missing" + (f": {info.description}" if info else "")
    elif kind == "extra_forbidden":
        section = _section_model(loc[:-1])
        rule = "unknown field" + (_did_you_mean(str(loc[-1]), section.model_fields) if section else "")
    elif kind == "value_error":
        rule = str(ctx["error"])
    elif kind == "greater_than_equal":
        rule = f"must be >= {ctx['ge']}"
    elif kind == "greater_than":
        rule = f"must be > {ctx['gt']:g}"
    elif kind == "string_pattern_mismatch":
        rule = f"must match {ctx['pattern']}"
    else:
        rule = item["msg"]
    fix = _FIXES.get(field) if kind in _CONSTRAINTS else None
    problems.add(field, value, f"{rule}: {fix}" if fix else rule)


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """Returns the model that the field path ``loc`` points at (e.g. ``("budget",)`` -> Budget)."""
    model: type[BaseModel] = Space
    for part in loc:
        info = model.model_fields.get(str(part))
        annotation = info.annotation if info else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(word: str, options: Any) -> str:
    """Returns ``"; did you mean 'x'?"`` for the closest option, or ``""``."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# ---------------------------------------------------------------------------------------------------------
# Rules. Each takes the valid sections (a broken or missing section is absent) and adds its problems.


def _get(v: dict[str, Any], section: str, field: str) -> Any:
    """Returns a valid field of a section (a model, or a dict of the valid fields of a broken one) or None."""
    part = v.get(section)
    return part.get(field) if isinstance(part, dict) else getattr(part, field, None)


def _check_scheduler(v: dict[str, Any], out: Problems) -> None:
    grace, epochs = _get(v, "scheduler", "grace_epochs"), _get(v, "budget", "epochs")
    if _get(v, "scheduler", "type") == "asha" and None not in (grace, epochs) and not grace < epochs:
        out.add(
            "scheduler.grace_epochs",
            grace,
            "grace_epochs < budget.epochs must hold for asha, "
            f"but got (grace_epochs={grace}, epochs={epochs}): "
            "lower grace_epochs, raise budget.epochs or use scheduler: {type: none}",
        )


def _check_metric(v: dict[str, Any], out: Problems) -> None:
    if "metric" in v and v["metric"] not in METRICS:
        hint = _did_you_mean(v["metric"], METRICS)
        out.add("metric", v["metric"], f"must be one of {', '.join(METRICS)}{hint}")


def _metric_rule(metric: str) -> str | None:
    """Why an objective or a limit cannot use ``metric``, with the fix; None if it can."""
    if metric in TRIAL_METRICS:
        return None
    if metric in AFTER_SEARCH_METRICS:
        return f"no trial reports {metric} ({AFTER_SEARCH_METRICS[metric]}): use one of {', '.join(TRIAL_METRICS)}"
    return f"must be one of {', '.join(TRIAL_METRICS)}{_did_you_mean(metric, TRIAL_METRICS)}"


def _check_objectives(v: dict[str, Any], out: Problems) -> None:
    seen = {v.get("metric")}
    for index, objective in enumerate(v.get("objectives", [])):
        field = f"objectives.{index}.metric"
        rule = _metric_rule(objective.metric)
        if rule:
            out.add(field, objective.metric, rule)
        elif objective.metric in seen:
            out.add(field, objective.metric, f"{objective.metric} is already an objective (the primary one is "
                    "`metric`): list each metric once")
        seen.add(objective.metric)
    if v.get("objectives") and v.get("warm_start"):
        out.add("warm_start", v["warm_start"], "earlier trials are told to the searcher with the primary metric "
                "only, but objectives need every objective's value: remove warm_start or objectives")
    if v.get("objectives") and _get(v, "search", "algorithm") == "grid":
        out.add("search.algorithm", "grid", "grid tries every point whatever the objectives, so there is nothing to "
                "steer: use tpe or nsga2, or remove objectives (constraints work with grid)")


def _check_constraints(v: dict[str, Any], out: Problems) -> None:
    for metric in v.get("constraints", {}):
        rule = _metric_rule(metric)
        if rule:
            out.add(f"constraints.{metric}", v["constraints"][metric].model_dump(exclude_none=True), rule)


def _check_knob_names(v: dict[str, Any], out: Problems) -> None:
    for section in ("space", "fixed"):
        for name, value in v.get(section, {}).items():
            shown = value.to_json() if section == "space" else value
            if name == "epochs":
                rule = f"epochs comes from budget.epochs: remove it from {section}"
                out.add(f"{section}.epochs", shown, rule)
            elif name not in KNOBS:
                out.add(
                    f"{section}.{name}",
                    shown,
                    f"{name!r} is not a knob{_did_you_mean(name, KNOBS)} (knobs: {', '.join(KNOBS)})",
                )


def _check_overlap(v: dict[str, Any], out: Problems) -> None:
    for name in v.get("fixed", {}):
        if name in v.get("space", {}):
            out.add(
                f"fixed.{name}",
                v["fixed"][name],
                f"{name} is both searched (space.{name}) and fixed: remove it from one of them",
            )


def _searchable(name: str) -> bool:
    """Whether the value rules of knob ``name`` apply (its name problems are reported elsewhere)."""
    return name in KNOBS and name != "epochs"


def _check_fixed_values(v: dict[str, Any], out: Problems) -> None:
    for name, value in v.get("fixed", {}).items():
        rule = KNOBS[name].check(value) if _searchable(name) else None
        if rule:
            out.add(f"fixed.{name}", value, rule)


def _probe_points(dist: Distribution) -> list[tuple[str, float]]:
    """Returns values a numeric distribution can sample, labelled, for checking them against a knob's rule.

    The bounds, plus an interior value that isn't a whole number unless every sample is one.
    """
    if isinstance(dist, RandInt):
        return [("low", dist.low), ("high - 1", dist.high - 1)]
    if isinstance(dist, QUniform):
        return [("low", dist.low), ("high", dist.high), ("sample", dist.low + dist.q)]
    if isinstance(dist, LogUniform):
        inner = math.exp(math.log(dist.low) + 0.382 * (math.log(dist.high) - math.log(dist.low)))
        return [("low", dist.low), ("high", dist.high), ("sample", inner)]
    assert isinstance(dist, Uniform)
    return [("low", dist.low), ("high", dist.high), ("sample", dist.low + 0.382 * (dist.high - dist.low))]


def _check_distribution_values(v: dict[str, Any], out: Problems) -> None:
    for name, dist in v.get("space", {}).items():
        if not _searchable(name):
            continue
        knob = KNOBS[name]
        if isinstance(dist, Choice | Grid):
            for value in dist.values:
                rule = knob.check(value)
                if rule:
                    out.add(f"space.{name}", value, f"every {dist.kind} value {rule}")
        elif knob.categorical:
            rule = f"{name} is categorical: search it with choice or grid, not {dist.kind}"
            out.add(f"space.{name}", dist.to_json(), rule)
        else:
            _check_numeric_range(name, dist, out)


def _check_numeric_range(name: str, dist: Distribution, out: Problems) -> None:
    for label, point in _probe_points(dist):
        rule = KNOBS[name].check(point)
        if rule:
            fix = "; use randint" if label == "sample" else ""
            text = f"{dist.kind} {label} {point:g} breaks the {name} rule: {rule}{fix}"
            out.add(f"space.{name}", dist.to_json(), text)
            return


def _check_algorithm(v: dict[str, Any], out: Problems) -> None:
    algorithm = _get(v, "search", "algorithm")
    if algorithm is None:
        return
    for name, dist in v.get("space", {}).items():
        if algorithm == "grid" and not isinstance(dist, Choice | Grid):
            out.add(
                f"space.{name}",
                dist.to_json(),
                f"search.algorithm grid needs every searched knob to be grid or choice, but {name} is "
                f"{dist.kind}: list its values, or use algorithm tpe or random",
            )
        elif algorithm != "grid" and isinstance(dist, Grid):
            out.add(
                f"space.{name}",
                dist.to_json(),
                f"grid only works with search.algorithm grid, but the algorithm is {algorithm}: "
                "use choice, or set search: {algorithm: grid}",
            )


def _check_gpus(v: dict[str, Any], out: Problems) -> None:
    gpus, workers = _get(v, "budget", "gpus_per_trial"), _get(v, "budget", "workers_per_trial")
    if gpus is None or workers is None or gpus == 0:
        return
    if gpus < 1 and workers > 1:
        out.add("budget.gpus_per_trial", gpus,
                f"a fraction of a GPU is shared by single-worker trials, but workers_per_trial is {workers}: "
                f"use workers_per_trial: 1, or {workers} GPUs (one per worker)")
    elif gpus > 1 and gpus != int(gpus):
        out.add("budget.gpus_per_trial", gpus,
                "above one GPU a trial takes whole GPUs: use a whole number, or a fraction below 1 to share a GPU")
    elif gpus >= 1 and gpus % workers:
        out.add("budget.workers_per_trial", workers,
                f"{workers} workers cannot share gpus_per_trial {gpus:g} evenly: each worker needs the same whole "
                f"number of GPUs; use workers_per_trial dividing {gpus:g}, or a multiple of {workers} GPUs")


def _check_amp(v: dict[str, Any], out: Problems) -> None:
    if _get(v, "budget", "gpus_per_trial") != 0:
        return
    fixed, dist = v.get("fixed", {}).get("amp"), v.get("space", {}).get("amp")
    rule = "mixed precision (mmengine's AmpOptimWrapper) trains on GPUs only: use fp32, or budget.gpus_per_trial > 0"
    if fixed in _MIXED:
        out.add("fixed.amp", fixed, rule)
    if isinstance(dist, Choice | Grid) and set(dist.values) & set(_MIXED):
        out.add("space.amp", dist.to_json(), rule)


_MIXED = ("fp16", "bf16")


def _check_pretrained(v: dict[str, Any], out: Problems) -> None:
    for backbone, path in v.get("pretrained", {}).items():
        rule = KNOBS["backbone"].check(backbone)
        if rule:
            out.add(f"pretrained.{backbone}", path, f"keys are backbone names: {backbone!r} {rule}")


def _check_earlier_searches(v: dict[str, Any], out: Problems) -> None:
    for section in ("inherit", "warm_start"):
        names = v.get(section, [])
        for name in names:
            if not NAME_PATTERN.match(name):
                out.add(section, name, f"must name an earlier search: {_FIXES['name']}")
            elif name == v.get("name"):
                out.add(section, name, "a search can't build on itself: name an earlier search")
        for name in {n for n in names if names.count(n) > 1}:
            out.add(section, name, "named twice: list each earlier search once")
    if v.get("warm_start") and _get(v, "search", "algorithm") == "random":
        out.add("warm_start", v["warm_start"], "random sampling can't use earlier trials: use search: "
                "{algorithm: tpe} (told the earlier trials) or grid (skips points already trained), or remove it")


_RULES: tuple[Callable[[dict[str, Any], Problems], None], ...] = (
    _check_metric,
    _check_objectives,
    _check_constraints,
    _check_scheduler,
    _check_knob_names,
    _check_overlap,
    _check_fixed_values,
    _check_distribution_values,
    _check_algorithm,
    _check_pretrained,
    _check_earlier_searches,
    _check_gpus,
    _check_amp,
)


def _optuna_value(dist: Distribution, value: Any) -> Any:
    return dist.encode_optuna(value) if isinstance(dist, Choice | Grid) else value


def _param_value(dist: Distribution, text: str) -> Any:
    if isinstance(dist, Choice | Grid):
        return next((value for value in dist.values if param_text(value) == text), text)
    return int(float(text)) if isinstance(dist, RandInt) else float(text)
