"""The ``address`` kind: a client of a scheduler that is already running."""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

from coar_dask.errors import ConfigError

__all__ = ["CONNECT_TIMEOUT_S", "check_address", "address_client"]

logger = logging.getLogger(__name__)

_ADDRESS = re.compile(r"(?:(?:tcp|tls|ucx|ws|wss)://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")
#: Seconds to reach a scheduler before giving up (distributed's own default retries for 30 s).
CONNECT_TIMEOUT_S = 10


def check_address(address: str) -> str:
    """``address`` if it reads as a scheduler address (``tcp://host:port`` or ``host:port``), else ConfigError."""
    match = _ADDRESS.fullmatch(str(address).strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"--address {address!r} is not a scheduler address; give one like tcp://10.0.0.1:8786 "
                          f"(the address `dask scheduler` prints).")
    return str(address).strip()


def _connect(client_cls: Any, address: str) -> Any:
    """A client of the scheduler at ``address``, or one ConfigError line when it cannot be reached in time."""
    try:
        return client_cls(address, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"no Dask scheduler answered at {address} within {CONNECT_TIMEOUT_S} s "
                          f"({type(exc).__name__}); start one with `dask scheduler`, or check the address.") from None


@contextlib.contextmanager
def address_client(address: str | None) -> Iterator[Any]:
    """A client of the running scheduler at ``address`` (closed after; the scheduler is left running)."""
    from distributed import Client

    if not address:
        raise ConfigError("cluster 'address' needs a scheduler address, e.g. --address tcp://host:8786")
    with _connect(Client, check_address(address)) as client:
        logger.info("connected to scheduler %s (dashboard %s)", address, client.dashboard_link)
        yield client
