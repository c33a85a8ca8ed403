"""coar_dask's settings in dask's config: an argument left ``None`` is read from the config at call time
(``dask.config.get(key, override_with=value)``), as dask-jobqueue does; no string stands for "the config"."""

from __future__ import annotations

import ast
from pathlib import Path

import dask.config
import pytest

from coar_dask.config import factory_timeout, worker_dask_config
from coar_dask.errors import ConfigError

PACKAGE = Path(__file__).resolve().parents[1] / "coar_dask"


def test_none_reads_the_config_when_called_and_a_value_overrides_it():
    with dask.config.set({"coar-dask.factory-timeout": "3m", "coar-dask.worker-profile-interval": "40ms"}):
        assert factory_timeout() == factory_timeout(None) == 180.0
        assert worker_dask_config(None) == {"distributed.worker.profile.interval": "40ms"}
        assert factory_timeout("5s") == 5.0
        assert worker_dask_config("1s") == {"distributed.worker.profile.interval": "1000ms"}
    with dask.config.set({"coar-dask.factory-timeout": None, "coar-dask.worker-profile-interval": None}):
        assert factory_timeout() is None and worker_dask_config() == {}  # null in the config: no limit, dask's own


@pytest.mark.parametrize("off", [0, False, "off"])
def test_an_explicit_no_limit_wins_over_the_config(off):
    with dask.config.set({"coar-dask.factory-timeout": "3m"}):
        assert factory_timeout(off) is None
    with dask.config.set({"coar-dask.worker-profile-interval": "40ms"}):
        assert worker_dask_config(False) == {}


def test_the_word_config_is_not_a_setting():
    with pytest.raises(ConfigError, match="coar-dask.factory-timeout"):
        factory_timeout("config")
    with pytest.raises(ConfigError, match="coar-dask.worker-profile-interval"):
        worker_dask_config("config")


def _config_sentinels(path: Path) -> list[str]:
    """Defaults ``= "config"`` and comparisons ``== "config"`` in one module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defaults = node.args.defaults + [d for d in node.args.kw_defaults if d is not None]
            if any(isinstance(d, ast.Constant) and d.value == "config" for d in defaults):
                found.append(f"{path.name}:{node.lineno} {node.name}(... = 'config')")
        elif isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value == "config" for c in [node.left, *node.comparators]):
            found.append(f"{path.name}:{node.lineno} compares with 'config'")
    return found


def test_no_config_string_sentinel_in_the_package():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _config_sentinels(path)]
    assert not found, "use None and dask.config.get(key, override_with=value) instead:\n" + "\n".join(found)
