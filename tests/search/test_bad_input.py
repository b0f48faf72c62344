"""Bad input through the real ``dettune`` command: one line naming the problem and the fix, exit status 2.

Each test runs the console entry (:func:`search.entry.main`, what ``dettune`` runs) in this process with the
working directory in ``tmp_path`` and asserts four things: status 2, a message that names the problem (and the
fix, where there is one), no traceback, and nothing written: the files under ``tmp_path`` are exactly those the
test put there, and an MLflow store that existed holds the same experiments and runs. Data problems are made by
copying the synthetic dataset and breaking one thing in it; they go through ``dettune search``, the command users
run. One sweep feeds every dataset defect and every space problem the suite knows through it; the reverse, a bug
injected into a knob's build step, must keep its traceback.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from bad_spaces import BAD_FIELDS, BAD_OBJECTIVES, edited, valid
from conftest import write_space
from mlflow.tracking import MlflowClient
from services import free_port

from cocodata import synth
from cocodata.dataset import Dataset
from cocodata.defects import DEFECTS, apply_defect
from mmconfigs import build as build_module
from search.entry import main
from search.tracking import Tracker
from spaces.errors import USAGE_ERROR
from tracking_names import TAG_ROLE, TAG_STATUS, local_tracking_uri

STORAGE = "runs"
NAME = "t"  # the name write_space gives a space


@dataclass(frozen=True)
class Outcome:
    code: int | str | None
    out: str
    err: str

    def assert_refused(self, *words: str) -> None:
        """Status 2, every word in stderr, no traceback anywhere."""
        assert self.code == USAGE_ERROR, f"exit status {self.code}\nstdout:\n{self.out}\nstderr:\n{self.err}"
        for word in words:
            assert word in self.err, f"{word!r} not in stderr:\n{self.err}"
        assert "Traceback" not in self.out + self.err


def dettune(capfd: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    """Runs the command line in this process; captures at the file descriptors (logging handlers included)."""
    capfd.readouterr()
    try:
        code: int | str | None = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        code = exit_.code
    out, err = capfd.readouterr()
    return Outcome(code, out, err)


def tree(root: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (size, modification time), but the names in ``skip``."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.name not in skip}


def store_contents(tracking_uri: str) -> tuple[list[str], list[str]]:
    """The store's experiment names and run ids."""
    client = MlflowClient(tracking_uri)
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=10000)
    return sorted(e.name for e in experiments), sorted(r.info.run_id for r in runs)


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Runs the test in ``tmp_path``: the command's relative defaults (./runs, ./reports) land there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store is the one under ./runs
    return tmp_path


def search_refused(capfd: pytest.CaptureFixture[str], cwd: Path, space_file: Path, *extra: str) -> Outcome:
    """``dettune search`` that must write nothing at all."""
    before = tree(cwd)
    outcome = dettune(capfd, "search", str(space_file), "--storage", STORAGE, *extra)
    assert tree(cwd) == before, "a refused search wrote files"
    return outcome


# --- the space file ------------------------------------------------------------------------------------

SPACE_PROBLEMS: dict[str, tuple[dict[str, Any] | str, tuple[str, ...]]] = {
    "yaml-syntax": ("name: t\nbudget: {epochs: 1, trials: 1\n", ("invalid YAML", "line 3")),
    "unknown-field": ({"budgets": {"epochs": 1}}, ("budgets", "unknown field", "did you mean 'budget'?")),
    "wrong-type": ({"budget": {"epochs": "two", "trials": 1}}, ("budget.epochs", "'two'", "valid integer")),
    "unknown-knob-value": ({"space": {"backbone": {"choice": ["r18", "r999"]}}, "fixed": {"preset": "tiny"}},
                           ("space.backbone", "'r999'", "must be one of", "'r50'")),
    "lr-zero": ({"space": {"lr": {"loguniform": [0.0, 0.03]}}}, ("space.lr", "low > 0 must hold", "low=0.0")),
    "lr-negative": ({"space": {"batch_size": {"choice": [2, 4]}},
                     "fixed": {"backbone": "r18", "preset": "tiny", "lr": -0.1}}, ("fixed.lr", "-0.1", "> 0")),
    "low-not-below-high": ({"space": {"lr": {"uniform": [0.03, 0.01]}}},
                           ("space.lr", "low < high must hold", "low=0.03, high=0.01")),
    "base-missing": ({"base": "configs/nope/nope.py"}, ("base", "configs/nope/nope.py", "not found",
                                                       "give a config file path")),
}


# --- the data ------------------------------------------------------------------------------------------

Breaker = Callable[[Path, dict[str, Any]], None]


def _write_train(root: Path, doc: dict[str, Any]) -> None:
    (root / "train.json").write_text(json.dumps(doc))


def _corrupt(root: Path, doc: dict[str, Any]) -> None:
    (root / "train.json").write_text(json.dumps(doc)[:200])


def _not_coco(root: Path, doc: dict[str, Any]) -> None:
    _write_train(root, {"info": {"description": "labels"}, "items": doc["images"]})


def _image_missing(root: Path, doc: dict[str, Any]) -> None:
    (root / "images" / doc["images"][0]["file_name"]).unlink()


def _no_categories(root: Path, doc: dict[str, Any]) -> None:
    _write_train(root, {**doc, "categories": []})


def _unlisted_category(root: Path, doc: dict[str, Any]) -> None:
    annotations = [dict(doc["annotations"][0], category_id=999), *doc["annotations"][1:]]
    _write_train(root, {**doc, "annotations": annotations})


def _not_a_box(root: Path, doc: dict[str, Any]) -> None:
    _write_train(root, {**doc, "annotations": [dict(doc["annotations"][0], bbox=[1, 2]), *doc["annotations"][1:]]})


def _image_id_text(root: Path, doc: dict[str, Any]) -> None:
    _write_train(root, {**doc, "images": [dict(doc["images"][0], id="1"), *doc["images"][1:]]})


def _no_annotations(root: Path, doc: dict[str, Any]) -> None:
    _write_train(root, {**doc, "annotations": []})


def _root_missing(root: Path, doc: dict[str, Any]) -> None:
    shutil.rmtree(root)


DATA_PROBLEMS: dict[str, tuple[Breaker, tuple[str, ...]]] = {
    "root-missing": (_root_missing, ("data.root", "does not exist", "fix data.root")),
    "json-corrupt": (_corrupt, ("data.train", "train.json is not valid JSON", "re-export the annotations")),
    "not-coco": (_not_coco, ("not a COCO annotation file", "lacks ['images', 'annotations', 'categories']",
                             "a COCO file has 'images', 'annotations' and 'categories'")),
    "image-missing": (_image_missing, ("data.train", "image missing (1;", "000001.png", "dettune data check")),
    "no-categories": (_no_categories, ("data.train", "lists no categories", "add the class list")),
    "unlisted-category": (_unlisted_category, ("annotation of an unlisted category (1;", "category_id 999",
                                               "correct or remove those entries")),
    "not-a-box": (_not_a_box, ("data.train", "annotations[0].bbox = [1, 2] is not 4 numbers", "re-export")),
    "image-id-text": (_image_id_text, ("data.train", "images[0].id = '1' is not an integer", "re-export")),
    "no-annotations": (_no_annotations, ("data.train", "zero annotations", "annotate")),
}


# --- every defect the suite knows, through the command users run ---------------------------------------

Case = Callable[[Path, Dataset], tuple[Path, tuple[str, ...]]]
"""Writes a broken input under the working directory: the space file to search, and the words the refusal holds."""


def _space_problem(problem: str) -> Case:
    def make(cwd: Path, synth: Dataset) -> tuple[Path, tuple[str, ...]]:
        content, words = SPACE_PROBLEMS[problem]
        space_file = cwd / "space.yaml"
        if isinstance(content, str):
            space_file.write_text(content)
        else:
            write_space(space_file, synth, **content)
        return space_file, (str(space_file), *words)
    return make


def _data_problem(problem: str) -> Case:
    def make(cwd: Path, synth: Dataset) -> tuple[Path, tuple[str, ...]]:
        breaker, words = DATA_PROBLEMS[problem]
        root = cwd / "data"
        shutil.copytree(synth.root, root)
        breaker(root, json.loads((synth.root / synth.train).read_text()))
        return _space_over(cwd, synth, root), (str(root), *words)
    return make


def _dataset_defect(defect: str) -> Case:
    """One of :data:`cocodata.defects.DEFECTS` that the check refuses, on the second training image."""
    def make(cwd: Path, synth: Dataset) -> tuple[Path, tuple[str, ...]]:
        root = cwd / "data"
        shutil.copytree(synth.root, root)
        item = apply_defect(root, defect, "train", index=1)
        return _space_over(cwd, synth, root), ("data.train", DEFECTS[defect][1], item.split(" of ")[-1])
    return make


def _schema_problem(content: dict[str, Any], field: str, fragment: str) -> Case:
    """A row of the schema tests' tables: the valid file of ``bad_spaces`` with one field broken."""
    def make(cwd: Path, synth: Dataset) -> tuple[Path, tuple[str, ...]]:
        space_file = cwd / "space.yaml"
        space_file.write_text(yaml.safe_dump(content, sort_keys=False))
        return space_file, (f"{field} = ", fragment)
    return make


def _space_over(cwd: Path, synth: Dataset, root: Path) -> Path:
    return write_space(cwd / "space.yaml", synth, data={"root": str(root), "train": synth.train, "val": synth.val})


KNOWN_DEFECTS: dict[str, Case] = {
    **{f"space-{problem}": _space_problem(problem) for problem in SPACE_PROBLEMS},
    **{f"data-{problem}": _data_problem(problem) for problem in DATA_PROBLEMS},
    **{f"defect-{defect}": _dataset_defect(defect) for defect, (outcome, _, _) in DEFECTS.items()
       if outcome == "error"},
    **{f"field-{path}={value!r}": _schema_problem(edited(path, value), field, fragment)
       for path, value, field, fragment in BAD_FIELDS},
    **{f"objective-{field}={value!r}": _schema_problem({**valid(), **sections}, field, fragment)
       for sections, field, value, fragment in BAD_OBJECTIVES},
}


@pytest.mark.parametrize("case", list(KNOWN_DEFECTS))
def test_every_known_defect_is_refused_by_the_console_command(case: str, cwd: Path, synth: Dataset,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    """Every dataset defect :mod:`cocodata.defects` makes and every space and data problem the suite knows."""
    space_file, words = KNOWN_DEFECTS[case](cwd, synth)
    search_refused(capfd, cwd, space_file).assert_refused(*words)
    assert not (cwd / STORAGE).exists()


def test_a_bug_in_a_knob_step_keeps_its_traceback(cwd: Path, synth: Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reverse: an exception dettune's own step did not mean (here a KeyError) is a bug, never status 2.

    ``validate`` runs the same check as ``search`` without starting Ray beside it.
    """
    def broken_scale(cfg: Any, build: build_module.Build) -> None:
        raise KeyError("a bug in the scale step")

    monkeypatch.setitem(build_module.STEPS, "scale", replace(build_module.STEPS["scale"], edit=broken_scale))
    space_file = write_space(cwd / "space.yaml", synth)
    with pytest.raises(KeyError, match="a bug in the scale step") as caught:
        main(["validate", str(space_file)])
    assert caught.traceback[-1].name == "broken_scale"


def test_a_model_problem_is_refused_before_ray_starts(cwd: Path, synth: Dataset, no_local_ray: None,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(cwd / "space.yaml", synth, overrides={"model.backbone.depth": 19})
    search_refused(capfd, cwd, space_file).assert_refused(str(space_file), "invalid depth 19 for resnet")
    assert not ray.is_initialized()


# --- the search name, the tracking server ---------------------------------------------------------------

def test_a_taken_name_is_refused_until_overwrite(cwd: Path, synth: Dataset, ray_local: None,
                                                 capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(cwd / "space.yaml", synth, budget={"epochs": 1, "trials": 1, "max_concurrent": 1})
    first = dettune(capfd, "search", str(space_file), "--storage", STORAGE)
    assert first.code == 0, first.out[-3000:] + first.err[-3000:]
    tracking_uri = local_tracking_uri(cwd / STORAGE)
    stored = store_contents(tracking_uri)

    again = search_refused(capfd, cwd, space_file)
    again.assert_refused(f"a search named {NAME} already exists", "`dettune resume NAME`", "--overwrite")
    assert store_contents(tracking_uri) == stored

    overwritten = dettune(capfd, "search", str(space_file), "--storage", STORAGE, "--overwrite")
    assert overwritten.code == 0, overwritten.out[-3000:] + overwritten.err[-3000:]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(NAME)
    trials = client.search_runs([experiment.experiment_id], f"tags.`{TAG_ROLE}` = 'trial'")
    assert [t.data.tags[TAG_STATUS] for t in trials] == ["completed"], "the overwritten search's trials remain"


def test_unreachable_tracking_server_is_refused_at_start(cwd: Path, synth: Dataset,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # bound and closed again: nothing listens there
    space_file = write_space(cwd / "space.yaml", synth)
    outcome = search_refused(capfd, cwd, space_file, "--tracking-uri", url)
    outcome.assert_refused(f"MLflow tracking server {url} is unreachable", "start it", "fix --tracking-uri")


@pytest.mark.parametrize(("budget", "words"), [
    ({"gpus_per_trial": 1}, ("each trial needs 1 GPU, but the Ray cluster has no GPU", "budget.gpus_per_trial")),
    ({"cpus_per_worker": 3, "workers_per_trial": 2},  # the test's Ray has 4 CPUs on one node
     ("each trial needs 6 CPU, but the Ray cluster has 4 in all", "budget.cpus_per_worker")),
    ({"cpus_per_worker": 5}, ("each trial needs 5 CPU, but the Ray cluster has 4 in all",)),
])
def test_a_trial_larger_than_the_cluster_is_refused_at_start(budget: dict[str, int], words: tuple[str, ...],
                                                             cwd: Path, synth: Dataset, ray_local: None,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(cwd / "space.yaml", synth, budget={"epochs": 1, "trials": 1, **budget})
    search_refused(capfd, cwd, space_file).assert_refused(*words)


@pytest.mark.parametrize(("hours", "rule"), [("0", "must be > 0"), ("-1.5", "must be > 0"),
                                             ("nan", "finite number"), ("inf", "finite number")])
def test_a_bad_hours_flag_is_refused(hours: str, rule: str, cwd: Path, synth: Dataset,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    space_file = write_space(cwd / "space.yaml", synth)
    search_refused(capfd, cwd, space_file, "--hours", hours).assert_refused(
        "budget.hours", rule, "give the hours the search may run as a positive number")
    assert not (cwd / STORAGE).exists()


def test_resume_of_an_unknown_search(cwd: Path, capfd: pytest.CaptureFixture[str]) -> None:
    (cwd / STORAGE).mkdir()
    before = tree(cwd)
    outcome = dettune(capfd, "resume", "NOPE", "--storage", STORAGE)
    outcome.assert_refused("no search named NOPE", "check the name and --storage")
    assert tree(cwd) == before


@pytest.mark.parametrize("saved", ['{"uri": null, "down_tim', "[1, 2]", '{"uri": null, "timeout": 600}',
                                   '{"uri": 5, "down_timeout_s": 600}'],
                         ids=["cut-short", "not-an-object", "unknown-field", "wrong-type"])
def test_resume_of_a_search_whose_saved_settings_are_damaged(saved: str, cwd: Path,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    (cwd / STORAGE / NAME).mkdir(parents=True)
    (cwd / STORAGE / NAME / "search.json").write_text(saved)
    before = tree(cwd)
    outcome = dettune(capfd, "resume", NAME, "--storage", STORAGE)
    outcome.assert_refused(f"{NAME}/search.json is damaged", "restore it", "--overwrite")
    assert tree(cwd) == before


@pytest.mark.parametrize("command", [["report", "NOPE"], ["export", "NOPE", "--out", "exported"],
                                     ["report", "it's"]], ids=["report", "export", "quote-in-name"])
def test_report_and_export_of_an_unknown_search(command: list[str], cwd: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    tracking_uri = local_tracking_uri(cwd / STORAGE)
    Tracker(tracking_uri, "other").finish_search()  # a store holding another search
    stored = store_contents(tracking_uri)
    before = tree(cwd, skip=("mlflow.db",))

    outcome = dettune(capfd, *command, "--tracking-uri", tracking_uri)
    outcome.assert_refused(f"no search named {command[1]!r}", "(it has: other)", "check the name")
    assert tree(cwd, skip=("mlflow.db",)) == before
    assert store_contents(tracking_uri) == stored


@pytest.mark.parametrize("flags", [["--images", "2"], ["--size", "64"]], ids=["images", "size"])
def test_synthetic_data_with_an_argument_out_of_range(flags: list[str], cwd: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    dettune(capfd, "data", "synth", "out", *flags).assert_refused(f"{flags[0]} must be")
    assert not (cwd / "out").exists()


def test_a_bug_while_writing_synthetic_data_keeps_its_traceback(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_render(*args: Any) -> None:
        raise ValueError("a bug in rendering")  # the type an argument error has: it must not pass for one

    monkeypatch.setattr(synth, "_render", broken_render)
    with pytest.raises(ValueError, match="a bug in rendering"):
        main(["data", "synth", "out", "--images", "4"])
