"""``python -m coar_dask.write_dataset``: the research code's command (see :mod:`coar_dask.cli.write_dataset`)."""

from coar_dask.cli.write_dataset import main

if __name__ == "__main__":
    raise SystemExit(main())
