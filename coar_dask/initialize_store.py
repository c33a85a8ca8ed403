"""``python -m coar_dask.initialize_store``: the research code's command (see :mod:`coar_dask.cli.initialize_store`)."""

from coar_dask.cli.initialize_store import main

if __name__ == "__main__":
    raise SystemExit(main())
