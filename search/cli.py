"""The ``dettune`` command line.

Bad input ends with one line naming the problem and the fix on stderr and exit status 2, never a
traceback; each subcommand validates before it writes anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from spaces.build import BuildError
from spaces.dataset import DatasetError

USAGE_ERROR = 2
# The errors that mean "the user's input is wrong" (as opposed to a bug): reported without a traceback.
INPUT_ERRORS: tuple[type[Exception], ...] = (BuildError, DatasetError, ValueError, FileNotFoundError)


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from search.synth import write_dataset

    summary = write_dataset(Path(args.out), images=args.images, size=args.size, seed=args.seed)
    print(f"wrote {summary.train_images} train + {summary.val_images} val images, "
          f"{summary.annotations} objects {summary.area_counts} to {summary.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dettune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write a synthetic COCO dataset with the trash task's 10 classes")
    synth.add_argument("out", help="output directory (train.json, val.json, images/)")
    synth.add_argument("--images", type=int, default=48, help="number of images (default 48)")
    synth.add_argument("--size", type=int, default=160, help="image side in pixels (default 160)")
    synth.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes (default 0)")
    synth.set_defaults(handler=_cmd_data_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except INPUT_ERRORS as exc:
        print(f"dettune: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
