"""``dettune submit``: a search (or a chain) sent to a Ray cluster's job API, checked here first.

One command instead of ``ray job submit --address … --working-dir . --runtime-env-json … -- python -m search …``:
the space files are checked on this machine (schema and knob values, not data or training: the data lives on the
cluster), then only what the job needs is uploaded: dettune's packages and the space files, never ``data/``,
``runs/`` or a virtualenv. Credentials (a ``user:password@`` in ``--tracking-uri``, MLflow's and the standard AWS
variables set here) travel as the job's environment variables, never in its entrypoint, which Ray shows to anyone
who lists jobs. Built on Ray's ``JobSubmissionClient``, which sends the cluster's token (``RAY_AUTH_TOKEN``) itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from spaces.errors import DETTUNE_PACKAGES, BadArgument, NotFound
from spaces.schema import load_space
from tracking_names import DEFAULT_STORAGE, credential_variables, without_credentials

SUBMITTED = "submitted"
"""The upload's folder for the space files, in the order given."""
PASSED_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
"""Set on this machine, they reach the job's driver as they are."""
FAILED = 1


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune submit SPACE.yaml... --address URL`` (and ``--stop JOB``, ``--logs JOB``)."""
    parser = commands.add_parser("submit", help="send a search to a Ray cluster's job API, checked here first")
    parser.add_argument("space", nargs="*", help="space YAML file(s); several run as a chain on the cluster")
    parser.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the head's job API, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking URI as the cluster reaches it (default: $MLFLOW_TRACKING_URI, else "
                             "SQLite under --storage on the cluster)")
    parser.add_argument("--storage", default=str(DEFAULT_STORAGE),
                        help=f"Ray storage on the cluster: a folder shared by its nodes, or s3://BUCKET/PREFIX "
                             f"(default: {DEFAULT_STORAGE})")
    parser.add_argument("--name", help="search name (one space file only)")
    parser.add_argument("--trials", type=int, help="number of trials (default: budget.trials)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: budget.epochs)")
    parser.add_argument("--data-root", help="the dataset folder on the cluster, replacing the space's data.root")
    parser.add_argument("--follow", action="store_true", help="stream the job's log and exit with its status")
    parser.add_argument("--stop", metavar="JOB", help="stop a submitted job")
    parser.add_argument("--logs", metavar="JOB", help="print a submitted job's log so far")
    parser.set_defaults(handler=run_submit)


def run_submit(args: argparse.Namespace) -> int:
    """The ``submit`` command."""
    if not args.address:
        raise BadArgument("--address is required: the head's job API, e.g. --address http://HEAD:8265")
    if args.stop or args.logs:
        return _manage(args)
    if not args.space:
        raise BadArgument("name the space file(s) to submit, or --stop JOB / --logs JOB")
    if args.name and len(args.space) > 1:
        raise BadArgument("--name names one search: drop it for a chain (each space's name is used)")
    spaces = [_checked(Path(file)) for file in args.space]
    client = _client(args.address)
    env = _job_environment(args.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="dettune-submit-") as upload:
        files = stage_upload(Path(upload), spaces)
        try:
            job = client.submit_job(entrypoint=shlex.join(_entrypoint(args, files)),
                                    runtime_env={"working_dir": upload, "env_vars": env})
        except RuntimeError as error:  # the job API's refusal, e.g. a head whose job agent is still starting
            raise BadArgument(f"the job API at {args.address} refused the job: {error}") from None
    _print_submitted(job, args)
    return _follow(client, job) if args.follow else 0


def _checked(path: Path) -> Path:
    if not path.is_file():
        raise NotFound(f"{path}: no such space file")
    load_space(path)  # schema and knob values: a SpaceError lists every problem
    return path


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError as error:
        raise BadArgument(f"no Ray job API answers at {address} ({error}): pass the head's dashboard address, "
                          "http://HEAD:8265, and set RAY_AUTH_TOKEN if the cluster uses token authentication"
                          ) from None


def _job_environment(tracking_uri: str | None) -> dict[str, str]:
    """The job driver's credentials: those in ``tracking_uri`` and the variables set here, never the URI's text."""
    env = {name: os.environ[name] for name in PASSED_VARIABLES if os.environ.get(name)}
    if tracking_uri:
        env.update(credential_variables(tracking_uri, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"))
    return env


def stage_upload(upload: Path, spaces: list[Path]) -> list[str]:
    """Copies dettune's packages (what the job imports; the cluster's image provides the dependencies) and the
    space files into ``upload``; returns the files' paths in it."""
    root = Path(__file__).resolve().parents[1]
    for package in DETTUNE_PACKAGES:
        shutil.copytree(root / package, upload / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (upload / SUBMITTED).mkdir()
    files = []
    for index, space in enumerate(spaces, start=1):
        target = Path(SUBMITTED) / f"{index:02d}-{space.name}"
        shutil.copyfile(space, upload / target)
        files.append(str(target))
    return files


def _entrypoint(args: argparse.Namespace, files: list[str]) -> list[str]:
    command = ["python", "-m", "search", "search", *files, "--storage", args.storage]
    for flag, value in (("--tracking-uri", args.tracking_uri and without_credentials(args.tracking_uri)),
                        ("--name", args.name), ("--trials", args.trials), ("--epochs", args.epochs),
                        ("--data-root", args.data_root)):
        if value is not None:
            command += [flag, str(value)]
    return command


def _print_submitted(job: str, args: argparse.Namespace) -> None:
    tracking = without_credentials(args.tracking_uri) if args.tracking_uri else f"SQLite under {args.storage}"
    print(f"submitted job {job} to {args.address}")
    print(f"  MLflow: {tracking} (an experiment per search, named after it)")
    print(f"  log:    dettune submit --logs {job} --address {args.address}")
    print(f"  stop:   dettune submit --stop {job} --address {args.address}")


def _follow(client: Any, job: str) -> int:
    """Streams the job's log until it ends; 0 if it succeeded."""
    async def stream() -> None:
        async for lines in client.tail_job_logs(job):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(stream())
    status = str(client.get_job_status(job))
    print(f"job {job}: {status}")
    return 0 if status.endswith("SUCCEEDED") else FAILED


def _manage(args: argparse.Namespace) -> int:
    client = _client(args.address)
    job = args.stop or args.logs
    try:
        if args.logs:
            sys.stdout.write(client.get_job_logs(job))
            return 0
        stopped = client.stop_job(job)
    except RuntimeError as error:  # the job API's answer for an unknown job id
        raise NotFound(f"job {job} at {args.address}: {error}") from None
    print(f"job {job}: {'stop requested' if stopped else 'already ended'}")
    return 0
