"""Search-space files: a valid one loads and round-trips; every broken rule is reported, all at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from bad_spaces import BAD_FIELDS, BAD_OBJECTIVES, VALID, edited, valid
from optuna.distributions import CategoricalDistribution, FloatDistribution
from ray.tune.search.sample import Categorical, Float

from spaces.distributions import Choice, LogUniform
from spaces.errors import MISSING, Problem, SpaceError
from spaces.schema import METRICS, Space, load_space


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems(tmp_path: Path, data: Any) -> list[Problem]:
    with pytest.raises(SpaceError) as caught:
        load_space(write(tmp_path, data))
    return caught.value.problems


def only_problem(tmp_path: Path, data: Any) -> Problem:
    found = problems(tmp_path, data)
    assert len(found) == 1, found
    return found[0]


def test_valid_file_loads(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, VALID))
    assert space.name == "backbone-vs-map"
    assert space.data.images == "images"
    assert (space.metric, space.mode) == ("val/bbox_mAP", "max")
    assert space.budget.workers_per_trial == 1
    assert space.space["lr"] == LogUniform(low=1e-4, high=2e-2)
    assert space.space["scale"] == Choice(values=[[800, 800], [512, 512]])
    assert space.point_defaults() == {"preset": "tiny", "schedule": "step", "epochs": 12}
    assert space.grid_size() is None


def test_defaults(tmp_path: Path) -> None:
    data = valid()
    for optional in ("metric", "hypothesis", "search", "scheduler", "fixed", "overrides", "pretrained"):
        del data[optional]
    data["budget"] = {"epochs": 3, "trials": 2, "gpus_per_trial": 4}
    space = load_space(write(tmp_path, data))
    assert space.metric == METRICS[0]
    assert (space.search.algorithm, space.search.seed) == ("tpe", 0)
    scheduler = space.scheduler
    assert (scheduler.type, scheduler.grace_epochs, scheduler.reduction_factor) == ("asha", 1, 3)
    assert space.budget.workers_per_trial == 4  # one per GPU
    assert (space.budget.cpus_per_worker, space.budget.max_concurrent, space.budget.max_retries) == (1, 1, 2)
    assert (space.fixed, space.overrides, space.pretrained, space.hypothesis) == ({}, {}, {}, None)


def test_a_fraction_of_a_gpu_is_for_single_worker_trials(tmp_path: Path) -> None:
    data = valid()
    data["budget"] = {**data["budget"], "gpus_per_trial": 0.25}
    space = load_space(write(tmp_path, data))
    assert (space.budget.gpus_per_trial, space.budget.workers_per_trial) == (0.25, 1)
    assert Space.from_json(space.to_json()).budget.gpus_per_trial == 0.25

    data["budget"]["workers_per_trial"] = 2
    problem = only_problem(tmp_path, data)
    assert (problem.field, problem.value) == ("budget.gpus_per_trial", 0.25)
    assert "single-worker trials, but workers_per_trial is 2" in problem.rule


def test_mixed_precision_needs_gpus(tmp_path: Path) -> None:
    data = valid()
    data["budget"] = {**data["budget"], "gpus_per_trial": 0}
    data["space"] = {**data["space"], "amp": {"choice": ["fp32", "bf16"]}}
    problem = only_problem(tmp_path, data)
    assert problem.field == "space.amp" and "trains on GPUs only" in problem.rule
    data["budget"]["gpus_per_trial"] = 1
    assert load_space(write(tmp_path, data)).space["amp"] == Choice(values=["fp32", "bf16"])


def test_json_round_trip(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, VALID))
    data = json.loads(json.dumps(space.to_json()))
    assert data["space"]["lr"] == {"loguniform": [1e-4, 2e-2]}
    assert Space.from_json(data) == space
    assert load_space(write(tmp_path, yaml.safe_dump(data))) == space


def test_from_json_checks_rules() -> None:
    data = valid()
    data["budget"]["epochs"] = 0
    with pytest.raises(SpaceError) as caught:
        Space.from_json(data)
    assert [(p.file, p.field) for p in caught.value.problems] == [("<json>", "budget.epochs")]


def test_tune_param_space(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, VALID))
    tune_space = space.tune_param_space()
    assert set(tune_space) == {"backbone", "lr", "scale"}  # fixed knobs are not searched
    assert isinstance(tune_space["scale"], Categorical)
    assert tune_space["scale"].categories == [[800, 800], [512, 512]]
    assert isinstance(tune_space["lr"], Float)


def test_optuna_space_and_decoding(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, VALID))
    optuna_space = space.optuna_space()
    assert optuna_space["lr"] == FloatDistribution(1e-4, 2e-2, log=True)
    assert optuna_space["scale"] == CategoricalDistribution(["[800, 800]", "[512, 512]"])
    sampled = {"backbone": "r101", "lr": 1e-3, "scale": "[512, 512]"}
    assert space.decode_optuna(sampled) == {"backbone": "r101", "lr": 1e-3, "scale": [512, 512]}


def test_grid_search(tmp_path: Path) -> None:
    data = edited("search.algorithm", "grid")
    data["space"] = {
        "backbone": {"grid": ["r50", "r101"]},
        "scale": {"choice": [[800, 800], [512, 512], [640, 640]]},
    }
    space = load_space(write(tmp_path, data))
    assert space.grid_size() == 6
    tune_space = space.tune_param_space()
    assert tune_space["backbone"] == {"grid_search": ["r50", "r101"]}
    assert tune_space["scale"] == {"grid_search": [[800, 800], [512, 512], [640, 640]]}  # choice -> grid


SHOWN = {"every choice value must be one of": "r999", "between 32 and 4096 pixels": [800, 8000]}


@pytest.mark.parametrize(("path", "value", "field", "fragment"), BAD_FIELDS)
def test_bad_field(tmp_path: Path, path: str, value: Any, field: str, fragment: str) -> None:
    problem = only_problem(tmp_path, edited(path, value))
    assert problem.field == field
    assert fragment in problem.rule
    assert problem.value == SHOWN.get(fragment, value)
    assert str(problem).startswith(f"{tmp_path / 'space.yaml'}: {field} = ")


def test_grid_algorithm_needs_categorical_knobs(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, edited("search.algorithm", "grid"))
    assert problem.field == "space.lr"
    assert problem.value == {"loguniform": [1e-4, 2e-2]}
    assert "needs every searched knob to be grid or choice, but lr is loguniform" in problem.rule


def test_no_grace_rule_without_asha(tmp_path: Path) -> None:
    data = edited("scheduler", {"type": "none", "grace_epochs": 12})
    assert load_space(write(tmp_path, data)).scheduler.type == "none"


def test_three_mistakes_reported_at_once(tmp_path: Path) -> None:
    data = valid()
    data["budget"]["epochs"] = 0
    data["space"]["backbone"] = {"choice": ["r50", "resnet50"]}
    data["metric"] = "mAP"
    found = problems(tmp_path, data)
    assert sorted(p.field for p in found) == ["budget.epochs", "metric", "space.backbone"]


def test_broken_sections_do_not_hide_rules(tmp_path: Path) -> None:
    data = valid()
    data["budget"]["max_retries"] = "two"  # a type error in budget ...
    data["budget"]["epochs"] = 1  # ... leaves its valid fields to the grace_epochs rule
    data["space"]["scale"] = {"unifrm": [1, 2]}  # a broken distribution ...
    data["space"]["backbone"] = {"choice": ["r999"]}  # ... leaves the others to the knob rules
    found = problems(tmp_path, data)
    assert sorted(p.field for p in found) == [
        "budget.max_retries",
        "scheduler.grace_epochs",
        "space.backbone",
        "space.scale",
    ]
    assert "did you mean 'uniform'?" in next(p.rule for p in found if p.field == "space.scale")


def test_yaml_syntax_error_has_the_line(tmp_path: Path) -> None:
    text = VALID.replace("lr: {loguniform: [1.0e-4, 2.0e-2]}", "lr: {loguniform: [1.0e-4, 2.0e-2]]")
    problem = only_problem(tmp_path, text)
    assert problem.field == "line 11"
    assert problem.value == "  lr: {loguniform: [1.0e-4, 2.0e-2]]"
    assert problem.rule.startswith("invalid YAML: expected ',' or '}'")


def test_duplicate_yaml_keys(tmp_path: Path) -> None:
    problem = only_problem(tmp_path, VALID + "name: other\n")
    assert (problem.field, problem.value) == ("line 16", "name")
    assert "duplicate key" in problem.rule


def test_duplicate_yaml_keys_and_other_problems(tmp_path: Path) -> None:
    found = problems(tmp_path, VALID.replace("metric: val/bbox_mAP", "metric: mAP") + "name: other\n")
    assert [p.field for p in found] == ["line 16", "metric"]


@pytest.mark.parametrize(("text", "got"), [("", "an empty file"), ("- a\n- b\n", "list"), ("3\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str, got: str) -> None:
    problem = only_problem(tmp_path, text)
    assert problem.field == "(top level)"
    assert problem.rule.endswith(f"but got {got}")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="can't read the file"):
        load_space(tmp_path / "nope.yaml")


def test_error_lists_every_problem_one_per_line() -> None:
    first = Problem("a.yaml", "budget.epochs", 0, "must be >= 1")
    error = SpaceError([first, Problem("b.yaml", "name", MISSING, "?")])
    assert str(error) == "a.yaml: budget.epochs = 0: must be >= 1\nb.yaml: name = <missing>: ?"


TRADE_OFF = {"objectives": [{"metric": "inference/fps", "mode": "max"}, {"metric": "model/gflops", "mode": "min"}],
             "constraints": {"inference/fps": {"min": 10}, "model/params_M": {"min": 1, "max": 60.5}}}


def test_objectives_and_constraints_load_and_round_trip(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, {**valid(), **TRADE_OFF, "search": {"algorithm": "nsga2"}}))
    assert space.directions() == [("val/bbox_mAP", "max"), ("inference/fps", "max"), ("model/gflops", "min")]
    assert (space.constraints["inference/fps"].min, space.constraints["inference/fps"].max) == (10, None)
    assert space.constraints["model/params_M"].text() == ">= 1 and <= 60.5"
    assert space.search.uses_optuna
    assert Space.from_json(json.loads(json.dumps(space.to_json()))) == space


@pytest.mark.parametrize(("sections", "field", "value", "fragment"), BAD_OBJECTIVES)
def test_bad_objective_or_constraint(tmp_path: Path, sections: dict[str, Any], field: str, value: Any,
                                     fragment: str) -> None:
    problem = only_problem(tmp_path, {**valid(), **sections})
    assert (problem.field, problem.value) == (field, value)
    assert fragment in problem.rule


def test_constraints_work_with_grid(tmp_path: Path) -> None:
    data = {**valid(), "constraints": {"inference/fps": {"min": 10}}, "search": {"algorithm": "grid"},
            "space": {"scale": {"choice": [[800, 800], [512, 512]]}}}
    assert load_space(write(tmp_path, data)).constraints["inference/fps"].min == 10
