"""``python -m coar_dask.run_regression``: the research code's command (see :mod:`coar_dask.cli.run_regression`)."""

from coar_dask.cli.run_regression import main

if __name__ == "__main__":
    raise SystemExit(main())
