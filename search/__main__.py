"""``python -m search`` is the ``dettune`` command."""

from search.entry import main

raise SystemExit(main())
