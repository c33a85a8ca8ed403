"""``python -m coar_dask.cli``: the same as the ``coar-dask`` command."""

from coar_dask.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
