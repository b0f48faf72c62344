"""``dettune validate SPACE.yaml``: checks a search space without training anything.

Prints a one-screen summary of a valid space and exits 0; otherwise lists every problem (file, field,
value, rule) on stderr and exits 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from spaces.errors import USAGE_ERROR


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
    parser.set_defaults(handler=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    """Checks ``args.space`` and prints the summary or the problems.

    Returns:
        0 for a valid space, 2 if it has problems.
    """
    from spaces.errors import SpaceError
    from spaces.validate import check_file, summary

    try:
        validation = check_file(args.space)
    except SpaceError as error:
        count = len(error.problems)
        print(f"dettune: error: {args.space} has {count} problem{'' if count == 1 else 's'}:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return USAGE_ERROR
    print(summary(validation))
    return 0
