"""``dettune lb``: record a public leaderboard score against a trial's MLflow run.

The score is the metric ``lb/public_mAP`` in percent, 0..100, exactly as the leaderboard shows it and the team's
log writes it (54.5, not 0.545), unlike the ``val/`` mAPs, which MLflow keeps in 0..1. Every submission adds one
point to that metric (step = submission number, so the latest is the run's value); the note goes to the tag
``dettune.lb_note``. ``dettune report`` lists the scores in its leaderboard table.
"""

from __future__ import annotations

import argparse
import math

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from results.store import LB_METRIC, TAG_LB_NOTE, add_tracking_flag, find_trial_run, open_tracking
from spaces.errors import BadArgument
from tracking_names import TAG_EXP_NUM


def record_score(client: MlflowClient, run: Run, score: float, *, note: str | None = None) -> int:
    """Logs one leaderboard submission's score (percent, 0..100) and note; returns the submission number.

    Raises:
        BadArgument: ``score`` outside 0..100.
    """
    if not (math.isfinite(score) and 0.0 <= score <= 100.0):
        raise BadArgument(f"--map is {score}, but must be the leaderboard's mAP in percent, 0..100 (e.g. 54.5)")
    run_id = run.info.run_id
    step = len(client.get_metric_history(run_id, LB_METRIC))
    client.log_metric(run_id, LB_METRIC, score, step=step)
    if note is not None:
        client.set_tag(run_id, TAG_LB_NOTE, note)
    return step + 1


# --- command line ---------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``dettune lb RUN --map SCORE [--note TEXT] [--tracking-uri URI]``."""
    parser = commands.add_parser("lb", help="record a public leaderboard score against a trial")
    parser.add_argument("run", metavar="RUN", help="the trial's Exp num (e.g. demo-4) or MLflow run id")
    parser.add_argument("--map", type=float, required=True, dest="score",
                        help="the public leaderboard mAP in percent, 0..100, as the leaderboard shows it (54.5)")
    parser.add_argument("--note", help="a note kept with the score (e.g. the submission file)")
    add_tracking_flag(parser)
    parser.set_defaults(handler=run_lb)


def run_lb(args: argparse.Namespace) -> int:
    """The ``lb`` command."""
    client = open_tracking(args.tracking_uri)
    run = find_trial_run(client, args.run)
    submission = record_score(client, run, args.score, note=args.note)
    name = run.data.tags.get(TAG_EXP_NUM, run.info.run_id)
    print(f"recorded public LB mAP {args.score:g} for {name} (run {run.info.run_id}, submission {submission})")
    return 0
