"""``dettune validate SPACE.yaml``: checks a search space without training anything.

Prints a one-screen summary of a valid space and exits 0; otherwise lists every problem (file, field,
value, rule) on stderr and exits 2, without a traceback. A space that builds on earlier searches (``inherit``,
``warm_start``) is read against the tracking store the search would use: each inherited value is printed with
the trial it comes from, and the earlier trials the searcher will be told, or why they are left out. A named
search that is not in the store yet is a note, not an error: a chain is validated before it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from spaces.errors import USAGE_ERROR
from tracking_names import DEFAULT_STORAGE


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds the ``validate`` subcommand to the CLI's subcommands.

    Args:
        commands: The object ``ArgumentParser.add_subparsers()`` returned.
    """
    parser = commands.add_parser(
        "validate",
        help="check a space file without training: schema, base config, data, every model it can build",
        description="Check a search space without training: its schema, base config and data, and that every "
        "combination of its knobs builds a model. Exit status 2 lists every problem.",
    )
    parser.add_argument("space", help="space YAML file")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow store holding the searches named by inherit and warm_start (default: "
                             "$MLFLOW_TRACKING_URI, else the SQLite store under --storage, as `dettune search`)")
    parser.add_argument("--storage", default=str(DEFAULT_STORAGE),
                        help=f"the search's Ray storage, a folder or a URI (default: {DEFAULT_STORAGE})")
    parser.set_defaults(handler=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    """Checks ``args.space`` and prints the summary or the problems.

    Returns:
        0 for a valid space, 2 if it has problems.
    """
    from mmconfigs.validate import check_file, check_space, summary
    from search.staging import stage_from_store
    from spaces.errors import SpaceError
    from tracking_names.storage import tracking_uri_for
    from trainers.smoke import first_step

    try:
        validation = check_file(args.space, first_step=first_step)
        tracking_uri = tracking_uri_for(args.storage, args.tracking_uri)
        staged = stage_from_store(validation.space, tracking_uri, pending_ok=True)
        if staged.inherited:  # the models change with the inherited knobs: build them again
            validation = check_space(staged.space, args.space, first_step=first_step)
    except SpaceError as error:
        count = len(error.problems)
        print(f"dettune: error: {args.space} has {count} problem{'' if count == 1 else 's'}:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return USAGE_ERROR
    print(summary(validation))
    for line in staged.lines():
        print(line)
    return 0
