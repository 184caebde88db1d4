"""``python -m authz``: the same entry point as the ``authz`` console script."""

from authz.cli import main

raise SystemExit(main())
