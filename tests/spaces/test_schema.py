"""Search-space files: a valid one loads and round-trips; every broken rule is reported, all at once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution
from ray.tune.search.sample import Categorical, Float

from spaces.distributions import Choice, LogUniform
from spaces.errors import MISSING, Problem, SpaceError
from spaces.schema import METRICS, Space, load_space

VALID = """\
name: backbone-vs-map
base: mmdet::cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py
data: {root: data/trash, train: train.json, val: val.json}
metric: val/bbox_mAP
hypothesis: a bigger backbone raises mAP at the same budget
budget: {epochs: 12, trials: 16, gpus_per_trial: 1, cpus_per_worker: 2, max_concurrent: 4, max_retries: 2}
search: {algorithm: tpe, seed: 0}
scheduler: {type: asha, grace_epochs: 1, reduction_factor: 3}
space:
  backbone: {choice: [r50, r101, swin-t]}
  lr: {loguniform: [1.0e-4, 2.0e-2]}
  scale: {choice: [[800, 800], [512, 512]]}
fixed: {preset: tiny, schedule: step}
overrides: {model.rpn_head.anchor_generator.scales: [8]}
pretrained: {r50: /path/to/r50.pth}
"""


def valid() -> dict[str, Any]:
    return yaml.safe_load(VALID)


def write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def problems(tmp_path: Path, data: Any) -> list[Problem]:
    with pytest.raises(SpaceError) as caught:
        load_space(write(tmp_path, data))
    return caught.value.problems


def edited(path: str, value: Any) -> dict[str, Any]:
    """The valid file with the field at dotted ``path`` set to ``value`` (deleted for MISSING)."""
    data = valid()
    *parents, last = path.split(".", 1)
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    if value is MISSING:
        del node[last]
    else:
        node[last] = value
    return data


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


# Each row: a field set to a bad value (MISSING deletes it), the field path reported and a rule fragment.
# The problem's value is the bad value, except for a bad choice value (the value itself, see SHOWN).
BAD_FIELDS = [
    ("name", "my search", "name", "must match ^[A-Za-z0-9][A-Za-z0-9_.-]*$"),
    ("name", "-x", "name", "starting with a letter or digit"),
    ("name", MISSING, "name", "required field is missing"),
    ("base", "", "base", "e.g. mmdet::"),
    ("data.val", MISSING, "data.val", "required field is missing"),
    ("data.vall", "val.json", "data.vall", "unknown field; did you mean 'val'?"),
    ("budjet", {}, "budjet", "unknown field; did you mean 'budget'?"),
    ("budget.epochs", 0, "budget.epochs", "must be >= 1"),
    ("budget.epochs", "12", "budget.epochs", "valid integer"),
    ("budget.trials", 0, "budget.trials", "must be >= 1"),
    ("budget.gpus_per_trial", -1, "budget.gpus_per_trial", "must be >= 0: use 0 to train on CPU workers"),
    ("budget.workers_per_trial", 0, "budget.workers_per_trial", "must be >= 1"),
    ("budget.workers_per_trial", 2, "budget.workers_per_trial", "2 workers cannot share gpus_per_trial 1 evenly"),
    ("budget.gpus_per_trial", 1.5, "budget.gpus_per_trial", "above one GPU a trial takes whole GPUs"),
    ("budget.cpus_per_worker", 0, "budget.cpus_per_worker", "must be >= 1"),
    ("budget.max_concurrent", 0, "budget.max_concurrent", "must be >= 1"),
    ("budget.max_retries", -1, "budget.max_retries", "must be >= 0"),
    ("scheduler.reduction_factor", 1, "scheduler.reduction_factor", "must be >= 2"),
    ("scheduler.grace_epochs", 0, "scheduler.grace_epochs", "must be >= 1"),
    ("scheduler.grace_epochs", 12, "scheduler.grace_epochs", "grace_epochs < budget.epochs must hold"),
    ("scheduler.type", "hyperband", "scheduler.type", "'asha' or 'none'"),
    ("search.algorithm", "bayes", "search.algorithm", "'tpe', 'nsga2', 'random' or 'grid'"),
    ("metric", "val/bbox_map", "metric", "did you mean 'val/bbox_mAP'?"),
    ("mode", "maximize", "mode", "'max' or 'min'"),
    ("space.backbon", {"choice": ["r50"]}, "space.backbon", "did you mean 'backbone'?"),
    ("fixed.presett", "tiny", "fixed.presett", "did you mean 'preset'?"),
    ("space.epochs", {"randint": [1, 12]}, "space.epochs", "epochs comes from budget.epochs"),
    ("fixed.epochs", 3, "fixed.epochs", "epochs comes from budget.epochs"),
    ("fixed.lr", 0.01, "fixed.lr", "lr is both searched (space.lr) and fixed"),
    ("fixed.batch_size", 0, "fixed.batch_size", "must be > 0"),
    ("fixed.freeze", 7, "fixed.freeze", "must be one of [-1, 0, 1, 2, 3, 4]"),
    ("space.backbone", {"choice": ["r50", "r999"]}, "space.backbone", "every choice value must be one of"),
    ("space.scale", {"choice": [[800, 800], [800, 8000]]}, "space.scale", "between 32 and 4096 pixels"),
    ("space.lr", {"uniform": [0.0, 0.1]}, "space.lr", "uniform low 0 breaks the lr rule: must be > 0"),
    ("space.lr", {"quniform": [0.0, 0.1, 0.01]}, "space.lr", "must be > 0"),
    ("space.lr", {"loguniform": [0.1, 0.01]}, "space.lr", "but got (low=0.1, high=0.01)"),
    ("space.batch_size", {"uniform": [1.0, 8.0]}, "space.batch_size", "must be a whole number; use randint"),
    ("space.batch_size", {"randint": [0, 8]}, "space.batch_size", "randint low 0 breaks the batch_size rule"),
    ("space.optimizer", {"uniform": [0.0, 1.0]}, "space.optimizer", "optimizer is categorical"),
    ("space.roi_head", {"grid": ["faster", "cascade"]}, "space.roi_head", "grid only works with search"),
    ("space.lr", 0.01, "space.lr", "put it under fixed"),
    ("pretrained.r5", "/x.pth", "pretrained.r5", "keys are backbone names"),
]


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


BAD_OBJECTIVES = [
    ({"objectives": [{"metric": "inference/fsp", "mode": "max"}]}, "objectives.0.metric", "inference/fsp",
     "did you mean 'inference/fps'?"),
    ({"objectives": [{"metric": "inference/fps", "mode": "maximize"}]}, "objectives.0.mode", "maximize",
     "'max' or 'min'"),
    ({"objectives": [{"metric": "inference/fps"}]}, "objectives.0.mode", MISSING, "required field is missing"),
    ({"objectives": [{"metric": "val/bbox_mAP", "mode": "max"}]}, "objectives.0.metric", "val/bbox_mAP",
     "is already an objective"),
    ({"constraints": {"lb/public_mAP": {"min": 50}}}, "constraints.lb/public_mAP", {"min": 50},
     "no trial reports lb/public_mAP (`dettune lb` records it after the search)"),
    ({"constraints": {"model/gflop": {"max": 5}}}, "constraints.model/gflop", {"max": 5},
     "did you mean 'model/gflops'?"),
    ({"constraints": {"inference/fps": {}}}, "constraints.inference/fps", {}, "a limit needs min or max"),
    ({"constraints": {"model/gflops": {"min": 5, "max": 1}}}, "constraints.model/gflops", {"min": 5, "max": 1},
     "min <= max must hold, but got (min=5, max=1)"),
    ({"objectives": [{"metric": "inference/fps", "mode": "max"}], "warm_start": ["earlier"]}, "warm_start",
     ["earlier"], "objectives need every objective's value: remove warm_start or objectives"),
    ({"objectives": [{"metric": "inference/fps", "mode": "max"}], "search": {"algorithm": "grid"},
      "space": {"scale": {"choice": [[800, 800], [512, 512]]}}}, "search.algorithm", "grid",
     "nothing to steer: use tpe or nsga2, or remove objectives"),
]


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
