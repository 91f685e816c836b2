"""``python -m datumdb``: the same command line as ``datumdb``."""

from datumdb.cli import main

raise SystemExit(main())
