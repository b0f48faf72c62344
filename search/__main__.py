"""``python -m search`` is the ``dettune`` command."""

from search.cli import main

raise SystemExit(main())
