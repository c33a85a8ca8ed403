"""Ctrl-C stops the test session, also once dask-jobqueue (the SLURM tests) has been imported.

dask-jobqueue's ``runner`` module installs a SIGINT handler that calls ``sys.exit()``: without
``conftest``'s restore, a Ctrl-C became a SystemExit in the running test, that test failed and the
session went on (issue 24 item 7). Here a real pytest session is interrupted as a terminal does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("dask_jobqueue")

TESTS = Path(__file__).resolve().parent


def test_ctrl_c_stops_a_session_that_imported_dask_jobqueue(tmp_path, ctrl_c):
    started, after = tmp_path / "started", tmp_path / "after"
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(f"""\
        import time
        from pathlib import Path

        import dask_jobqueue  # noqa: F401  (installs its SIGINT handler, as the SLURM tests do)


        def test_long():
            Path({str(started)!r}).write_text("x")
            time.sleep(120)


        def test_next():
            Path({str(after)!r}).write_text("ran")
        """))
    # This folder's conftest, loaded as a plugin into a session rooted in tmp_path.
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q",
           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")]
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    done = ctrl_c(cmd, started.exists, env=env, wait_s=120, what="the inner test's start")
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.INTERRUPTED, output
    assert "KeyboardInterrupt" in output, output
    assert not after.exists(), "the session went on after Ctrl-C"
