"""The ``dettune`` command line.

Bad input ends with one line naming the problem and the fix on stderr and exit status 2, never a
traceback; each subcommand validates before it writes anything.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from results import ensemble, export, leaderboard, predict, report
from search import submit, validate_cmd
from search.callbacks import TrackingDown
from search.driver import RayStartHung, SearchOptions, SearchOutcome, load_for_search, resume_options, run_search
from search.staging import check_chain
from spaces.errors import USAGE_ERROR, BadArgument, UserError
from tracking_names import (
    DEFAULT_STORAGE,
    DEFAULT_TRACKING_TIMEOUT_S,
    experiment_page,
    without_credentials,
)
from tracking_names.storage import tracking_uri_for

NO_TRIAL_FINISHED = 1
INTERRUPTED = 3  # the search stopped on purpose and can be resumed
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
DEMO_SPACE = Path(__file__).resolve().parents[1] / "spaces" / "demo.yaml"
DEMO_DATA = Path("data/synth")
DEMO_IMAGES = 96
STUDY_STORAGE_HELP = ("Optuna storage (an SQLAlchemy URL, e.g. postgresql+psycopg://HOST/DB) where a TPE/NSGA-II "
                      "search copies its study for optuna-dashboard (default: sqlite under --storage); a "
                      "user:password@ goes to PGUSER/PGPASSWORD, never written")
HOURS_HELP = ("wall-clock hours the search may run: no trial starts that could not reach its first rung in "
              "time, and at the end each running trial stops after its current epoch")
STORAGE_HELP = (f"Ray storage: a folder shared by all nodes, or s3://BUCKET/PREFIX (any URI pyarrow.fs opens; "
                f"credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for MinIO & co; needs "
                f"--tracking-uri) (default: {DEFAULT_STORAGE})")


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from cocodata.synth import check_arguments, write_dataset

    if args.defects:
        return _synth_defects(args)
    try:
        check_arguments(images=args.images, size=args.size)
    except ValueError as exc:  # argument rules, e.g. --images must be >= 4
        raise BadArgument(str(exc)) from None
    summary = write_dataset(Path(args.out), images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {summary.train_images} train + {summary.val_images} val images, "
          f"{summary.annotations} objects {summary.area_counts} to {summary.out}")
    return 0


def _synth_defects(args: argparse.Namespace) -> int:
    from cocodata.defects import write_defects

    try:
        placed = write_defects(Path(args.out), size=args.size, seed=args.seed)
    except ValueError as exc:
        raise BadArgument(str(exc)) from None
    print(f"wrote a dataset with one defect per image to {args.out} (`dettune data check {args.out}` lists them):")
    for defect, outcome, split, item in placed:
        print(f"  {defect:<24} {outcome:<8} {split}.json: {item}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from cocodata.datacheck import check_dataset, fix_line
    from cocodata.imagescan import terminal

    checked = check_dataset(args.root, args.train, args.val, args.images, progress=terminal())
    print(f"{args.root}: {len(checked.errors)} errors, {len(checked.warnings)} warnings "
          f"({checked.decoded} images decoded in {checked.seconds:.1f} s)")
    print("\n".join(f"  {line}" for line in checked.card_lines()))
    for line in checked.problem_lines():
        print(f"  {line}", file=sys.stderr if checked.errors else sys.stdout)
    if checked.errors:
        print(f"dettune: error: {fix_line(args.root, args.train, args.val, args.images)}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def _search_options(args: argparse.Namespace, **changes: object) -> SearchOptions:
    fields = dict(space_file=Path(args.space[0]), name=args.name, address=args.address,
                  tracking_uri=args.tracking_uri,
                  storage=args.storage, trials=args.trials, epochs=args.epochs,
                  max_concurrent=args.max_concurrent, hours=args.hours,
                  data_root=Path(args.data_root) if args.data_root else None,
                  tracking_timeout_s=args.tracking_timeout, study_storage=args.study_storage,
                  overwrite=getattr(args, "overwrite", False), resume=getattr(args, "resume", False))
    fields.update(changes)
    return SearchOptions(**fields)  # type: ignore[arg-type]


def _print_outcome(outcome: SearchOutcome) -> int:
    """Prints the results table and where the results are; returns the exit status (1: no trial finished)."""
    print(f"\nsearch {outcome.name}: best trial {outcome.best_trial_id or '-'}\n")
    print(outcome.table)
    print(f"\nRay results: {outcome.experiment_dir}")
    if outcome.tracking_uri.startswith("sqlite:"):
        print(f"MLflow:      mlflow ui --backend-store-uri {outcome.tracking_uri}\n"
              f"             then open {experiment_page(LOCAL_UI, outcome.experiment_id)}")
    elif outcome.tracking_uri.startswith(("http:", "https:")):
        print(f"MLflow:      {experiment_page(outcome.tracking_uri, outcome.experiment_id)}")
    else:
        print(f"MLflow:      {outcome.tracking_uri}")  # credentials were never part of it
    if outcome.budget_end:
        print(f"dettune: {outcome.budget_end}")
    if outcome.stopped_because:
        print(f"dettune: search stopped: {outcome.stopped_because}; fix it (`dettune validate SPACE.yaml` checks "
              "a space) and start the search again with --overwrite", file=sys.stderr)
    if outcome.finished:
        return 0
    print(f"dettune: no trial of {outcome.name} finished: each failed trial's line above names its reason and "
          "the file with its traceback", file=sys.stderr)
    return NO_TRIAL_FINISHED


def _cmd_search(args: argparse.Namespace) -> int:
    files: list[str] = args.space
    if len(files) == 1:
        return _print_outcome(run_search(_search_options(args, space_file=Path(files[0]))))
    if args.name:
        raise BadArgument("--name renames one search, but a chain runs several: drop --name (each search takes its "
                        "space's name)")
    check_chain([(file, load_for_search(_search_options(args, space_file=Path(file)))) for file in files],
                tracking_uri_for(args.storage, args.tracking_uri))
    status = 0
    for index, file in enumerate(files):
        again = _continue_command(files[index:], args)
        print(f"chain {index + 1}/{len(files)}: {file}  (if it stops, continue with: {again})", flush=True)
        try:
            status = max(status, _print_outcome(run_search(_search_options(args, space_file=Path(file)))))
        except (UserError, TrackingDown):
            print(f"dettune: the chain stopped at {file}; continue it with: {again}", file=sys.stderr)
            raise
    return status


def _continue_command(files: Sequence[str], args: argparse.Namespace) -> str:
    """The command that continues a chain at its first file: the same flags, that search resumed."""
    flags = {"--address": args.address, "--storage": args.storage if Path(args.storage) != DEFAULT_STORAGE else None,
             "--trials": args.trials, "--epochs": args.epochs, "--max-concurrent": args.max_concurrent,
             "--hours": args.hours,
             "--data-root": args.data_root, "--tracking-timeout": (
                 args.tracking_timeout if args.tracking_timeout != DEFAULT_TRACKING_TIMEOUT_S else None),
             # from the environment it is there again; typed on the command line it is shown without credentials
             "--tracking-uri": (without_credentials(args.tracking_uri)
                                if args.tracking_uri != os.environ.get("MLFLOW_TRACKING_URI") else None),
             "--study-storage": args.study_storage and without_credentials(args.study_storage)}
    given = [f"{flag} {shlex.quote(str(value))}" for flag, value in flags.items() if value is not None]
    return shlex.join(["dettune", "search", *files]) + "".join(f" {flag}" for flag in given) + " --resume"


def _cmd_resume(args: argparse.Namespace) -> int:
    return _print_outcome(run_search(resume_options(args.name, args.storage, args.tracking_uri,
                                                    args.tracking_timeout, args.study_storage, hours=args.hours)))


def _cmd_demo(args: argparse.Namespace) -> int:
    from cocodata.synth import write_dataset

    if not (DEMO_DATA / "train.json").is_file():
        write_dataset(DEMO_DATA, images=DEMO_IMAGES, size=160, seed=0)
        print(f"wrote the demo dataset to {DEMO_DATA}")
    args.space = [str(DEMO_SPACE)]
    return _print_outcome(run_search(_search_options(args, overwrite=True)))


def _add_search_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="search name (default: the space's name)")
    parser.add_argument("--address", help="Ray cluster address (default: inside a Ray job its cluster, "
                                          "else Ray in this process)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite under --storage)")
    parser.add_argument("--storage", default=str(DEFAULT_STORAGE), help=STORAGE_HELP)
    parser.add_argument("--trials", type=int, help="number of trials (default: budget.trials)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: budget.epochs)")
    parser.add_argument("--max-concurrent", type=int, help="trials at a time (default: budget.max_concurrent)")
    parser.add_argument("--hours", type=float, help=HOURS_HELP + " (default: budget.hours, else no limit)")
    parser.add_argument("--data-root", help="dataset folder, replacing the space's data.root")
    parser.add_argument("--tracking-timeout", type=float, default=DEFAULT_TRACKING_TIMEOUT_S, metavar="SECONDS",
                        help="stop the search (to resume later) when MLflow stays unreachable this long "
                             f"(default {DEFAULT_TRACKING_TIMEOUT_S:.0f}); until then its writes are buffered")
    parser.add_argument("--study-storage", metavar="URL", help=STUDY_STORAGE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dettune", description="Hyperparameter search for MMDetection.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic COCO dataset with the trash task's 10 classes")
    synth.add_argument("out", help="output directory (train.json, val.json, images/)")
    synth.add_argument("--images", type=int, default=48, help="number of images (default 48)")
    synth.add_argument("--size", type=int, default=160, help="image side in pixels (default 160)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    synth.add_argument("--defects", action="store_true", help="break one image each way real exports are broken "
                                                              "(truncated, EXIF-rotated, NaN box, ...; --images "
                                                              "is ignored) and say which")
    synth.set_defaults(handler=_cmd_data_synth)
    check = data.add_parser("check", help="decode every image and check every box of a COCO dataset")
    check.add_argument("root", help="dataset folder")
    check.add_argument("--train", default="train.json", help="train annotations, relative to ROOT (default: "
                                                             "train.json)")
    check.add_argument("--val", default="val.json", help="val annotations, relative to ROOT (default: val.json)")
    check.add_argument("--images", default="images", help="image folder, relative to ROOT (default: images)")
    check.set_defaults(handler=_cmd_data_check)

    search = commands.add_parser("search", help="run a hyperparameter search over a space file, or a chain of them")
    search.add_argument("space", nargs="+", help="space YAML file; several run as a chain, in order, each free to "
                                                 "inherit from and warm-start on the ones before")
    _add_search_flags(search)
    search.add_argument("--overwrite", action="store_true", help="replace an existing search of this name")
    search.add_argument("--resume", action="store_true", help="continue an existing search of this name")
    search.set_defaults(handler=_cmd_search)

    resume = commands.add_parser("resume", help="finish a search whose driver stopped (same trials, same runs)")
    resume.add_argument("name", help="the search's name")
    resume.add_argument("--storage", default=str(DEFAULT_STORAGE),
                        help=f"Ray storage the search used, a folder or a URI (default: {DEFAULT_STORAGE})")
    resume.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the search used)")
    resume.add_argument("--tracking-timeout", type=float, metavar="SECONDS",
                        help="stop when MLflow stays unreachable this long (default: what the search used)")
    resume.add_argument("--hours", type=float, help=HOURS_HELP + ", counted from this resume (default: "
                                                    "budget.hours of the search, again from this resume)")
    resume.add_argument("--study-storage", metavar="URL", help="Optuna storage of the study copy (default: the "
                                                               "one the search used)")
    resume.set_defaults(handler=_cmd_resume)

    for module in (validate_cmd, submit, report, export, ensemble, predict, leaderboard):
        module.add_parser(commands)

    demo = commands.add_parser("demo", help="search spaces/demo.yaml on synthetic data (written on first use)")
    _add_search_flags(demo)
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except UserError as exc:  # wrong input, not a bug: the message says the fix, no traceback
        print(f"dettune: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except TrackingDown as exc:
        print(f"dettune: stopped: {exc}", file=sys.stderr)
        return INTERRUPTED
    except RayStartHung as exc:  # not the input's fault: no usage error, but no traceback to read either
        print(f"dettune: stopped: {exc}", file=sys.stderr)
        return NO_TRIAL_FINISHED
