"""``python -m coar_dask.cli``: the same as the ``coar-dask`` command."""

from coar_dask.cli.main import main

raise SystemExit(main())
