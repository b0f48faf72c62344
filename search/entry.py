"""The ``dettune`` console script and ``python -m search``: checks torch, then runs the command line.

The check comes first because :mod:`search.cli` imports modules that touch torch APIs at import time.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from search.torch_floor import installed_torch, torch_problem
from spaces.errors import USAGE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Runs ``dettune`` with ``argv`` (default: the process's arguments); returns the exit status."""
    problem = torch_problem(installed_torch())
    if problem is not None:
        print(f"dettune: error: {problem}", file=sys.stderr)
        return USAGE_ERROR
    from search.cli import main as cli_main

    return cli_main(argv)
