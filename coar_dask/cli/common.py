"""What every command shares: printing, the one error handler, logging, progress bars, builds.

:func:`run_command` is the only place where errors become exit codes: a
:class:`~coar_dask.errors.CoarError` is one line ``PROG: error: MESSAGE`` on
stderr and exit code 2; Ctrl-C and SIGTERM are one line and exit code 130; a closed
stdout (``| head``) ends the command quietly with exit code 141.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import unicodedata
from typing import Any, Callable

from coar_dask.errors import CoarError

__all__ = ["echo", "printable", "run_command", "setup_logging", "progress_bar", "build_with_progress"]

#: What Ctrl-C prints when a command says nothing more specific.
INTERRUPTED = "interrupted."


def printable(text: str, keep: str = "\n\t") -> str:
    """``text`` with control and format characters (terminal escapes, ``\\r``, bidi overrides) written as
    escapes (``\\x1b``), except those in ``keep``: what a store or file from elsewhere records cannot
    drive the terminal it is shown on."""
    return "".join(ch if ch in keep or unicodedata.category(ch) not in _HIDDEN
                   else ch.encode("unicode_escape").decode("ascii") for ch in text)


_HIDDEN = {"Cc", "Cf", "Zl", "Zp"}


def echo(*args: Any) -> None:
    """Print to stdout, flushed (output interleaves with progress bars on stderr), control characters
    escaped (:func:`printable`)."""
    print(printable(" ".join(map(str, args))), flush=True)


def run_command(handler: Callable[[Any], int | None], args: Any, prog: str,
                interrupted: str = INTERRUPTED) -> int:
    """Run a command's handler; turn a user error into exit code 2 and Ctrl-C into 130.

    Parameters
    ----------
    handler
        The command: takes the parsed arguments, returns its exit code (``None``: 0).
    args
        The parsed arguments.
    prog
        How the command is called, e.g. ``"coar-dask build"``; starts each message.
    interrupted
        What to say after ``PROG:`` on Ctrl-C.
    """
    previous = _on_sigterm(_terminate)
    try:
        return int(handler(args) or 0)
    except CoarError as exc:
        print(printable(f"{prog}: error: {exc}"), file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's or a user's `kill`)
        print(f"{prog}: {interrupted}", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:  # `coar-dask status S | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    finally:
        _on_sigterm(previous)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _on_sigterm(handler: Any) -> Any:
    """Install ``handler`` for SIGTERM (main thread only); return the one it replaces."""
    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, handler)


def setup_logging(verbose: int = 0) -> None:
    """Warnings (``-v``: info, ``-vv``: debug) as one line each; Dask's INFO chatter only with ``-v``."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    import dask

    # Read by distributed when it is first imported...
    dask.config.set({"logging": {"distributed": "error", "bokeh": "error", "tornado": "error"}})
    # ...and, if it already was, set directly.
    for noisy in ("distributed", "bokeh", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def progress_bar(total: int, desc: str, unit: str = "block") -> Any:
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None)


def build_with_progress(store: Any, experiment: Any, client: Any, desc: str) -> Any:
    """Build a store's pending blocks with a progress bar; returns the :class:`BuildReport`."""
    from coar_dask.runtime.build import BuildReport, execute_plan, plan_build

    plan = plan_build(store, experiment)
    if not plan.blocks:
        echo(f"{desc}: nothing to do; all {plan.n_blocks_total} blocks of {plan.store_path} are completed.")
        return BuildReport()
    bar = progress_bar(len(plan.blocks), desc)

    def update(result: Any, done: int, n: int) -> None:
        bar.update(1)
        bar.set_postfix(rows=result.rows, refresh=False)

    try:
        return execute_plan(plan, client, progress=update)
    finally:
        bar.close()
