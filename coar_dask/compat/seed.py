"""The seed's regression YAML (``regression_config.yaml``), read without fastargs.

The research code configures ``run_regression.py`` with a YAML file of three
sections, overridable by dotted command-line flags::

    data:
      data_path: ~            # the .beton (here: a .beton or a zarr store)
      num_train: 45000
      num_val: 5000
    cfg:
      out_dir: ~
      num_workers: 8
      k: 1
      batch_size: 2500
      lr: 1e-3
      eps: 1e-4
      true_random: true
      manual_max_lambda: 0
    early_stopping:
      check_every: 3
      eps: 1e-10

:func:`load_regression_config` reads such files (``yaml.safe_load``; values
typed like fastargs does, so ``1e-3`` is a float), applies overrides, and
returns a frozen :class:`SeedRegressionConfig`. Keys that the chosen solver
does not use -- the SAGA step size and stopping rule when the exact
least-squares fit runs, unknown keys such as ``true_random`` -- are not
dropped silently: a :class:`SeedConfigWarning` lists them, and the config
keeps them in ``unused``/``unknown``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from coar_dask._yaml import read_yaml_file
from coar_dask.errors import ConfigError
from coar_dask.solvers.base import option_infos
from coar_dask.solvers.registry import REGISTRY, options_class

__all__ = [
    "SeedRegressionConfig",
    "SeedConfigWarning",
    "load_regression_config",
    "flatten",
    "describe_ignored",
    "read_config_files",
    "KNOWN_KEYS",
    "UNUSED_KEYS",
    "solver_kind",
    "choose_solver",
    "solver_for",
    "seed_options",
    "SEED_SOLVERS",
]

#: What ``--solver`` may say for the seed's settings (``auto``: :func:`choose_solver` decides; the others:
#: the registered solvers whose entry has the ``seed`` trait).
SEED_SOLVERS = ("auto", *(name for name, entry in REGISTRY.items() if entry.seed))


class SeedConfigWarning(UserWarning):
    """A seed config has keys that this package reads but does not act on, or does not know."""


#: Every key of the seed's ``run_regression.py`` (dotted) -> (type, default).
#: ``None`` defaults are the seed's required keys.
KNOWN_KEYS: dict[str, tuple[type, Any]] = {
    "data.data_path": (str, None),
    "data.num_train": (int, None),
    "data.num_val": (int, None),
    "data.seed": (int, None),
    "data.target_start_ind": (int, 0),
    "data.target_end_ind": (int, -1),
    "cfg.k": (int, None),
    "cfg.lr": (float, 0.01),
    "cfg.eps": (float, 1e-5),
    "cfg.batch_size": (int, None),
    "cfg.out_dir": (str, None),
    "cfg.num_workers": (int, 16),
    "cfg.use_bias": (int, 1),
    "cfg.manual_max_lambda": (float, -1.0),
    "early_stopping.check_every": (int, 2),
    "early_stopping.eps": (float, 1e-5),
}

#: Known keys a solver does not act on, and why: the exact least-squares fit
#: (``lstsq``, for the seed's ``k: 1, manual_max_lambda: 0``) and the SAGA
#: lasso path (``saga``, fast_l1's algorithm, for the other settings).
UNUSED_KEYS: dict[str, dict[str, str]] = {
    "lstsq": {
        "data.seed": "unused by the seed as well",
        "cfg.lr": "SAGA step size; the exact least-squares solver has none",
        "cfg.eps": "lambda-path ratio; with k = 1 there is no path",
        "early_stopping.check_every": "SAGA early stopping; the exact solver needs none",
        "early_stopping.eps": "SAGA early stopping; the exact solver needs none",
    },
    "saga": {"data.seed": "unused by the seed as well"},
}


def _plain(k: int | None, manual_max_lambda: float) -> bool:
    """Whether the seed's settings ask for plain least squares: ``k: 1`` (an absent ``cfg.k``
    counts as 1, SAGA's default) and ``manual_max_lambda: 0``."""
    return (k is None or k == 1) and manual_max_lambda == 0


def choose_solver(k: int | None, manual_max_lambda: float, solver: str = "auto") -> str:
    """The solver for the seed's settings: ``auto`` is the exact ``lstsq`` for ``k: 1,
    manual_max_lambda: 0`` (``k`` absent counts as 1), else ``saga``; an explicit one is kept.

    The one place the seed's settings choose a solver (:func:`solver_kind` and
    :func:`solver_for` ask it).

    >>> choose_solver(None, 0.0), choose_solver(20, -1.0), choose_solver(1, 0.0, "fast_l1")
    ('lstsq', 'saga', 'fast_l1')
    """
    if solver not in SEED_SOLVERS:
        raise ConfigError(f"--solver {solver!r}: choose one of {list(SEED_SOLVERS)}.")
    if solver == "auto":
        return "lstsq" if _plain(k, manual_max_lambda) else "saga"
    return solver


def solver_kind(k: int | None, manual_max_lambda: float, solver: str = "auto") -> str:
    """``"lstsq"`` or ``"saga"``: which family fits these settings (see :func:`choose_solver`)."""
    return "lstsq" if choose_solver(k, manual_max_lambda, solver) == "lstsq" else "saga"


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"cfg": {"k": 1}}`` -> ``{"cfg.k": 1}``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _coerce(key: str, kind: type, value: Any, source: str) -> Any:
    if value is None:
        return None
    try:
        if kind is int:
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                text = value.strip().lower()
                if text in ("true", "false"):
                    return int(text == "true")
                as_float = float(text)
                if not as_float.is_integer():
                    raise ValueError
                return int(as_float)
            if isinstance(value, int):
                return value
            raise ValueError
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            if isinstance(value, (str, os.PathLike)):
                return os.fspath(value)
            raise ValueError
    except (TypeError, ValueError):
        pass
    raise ConfigError(
        f"{key} in {source} must be {'an integer' if kind is int else 'a number' if kind is float else 'a string'}; "
        f"found {value!r}."
    )


@dataclass(frozen=True)
class SeedRegressionConfig:
    """The seed's regression settings, typed.

    Attributes mirror the dotted keys (``data.num_train`` -> ``num_train``,
    ``early_stopping.eps`` -> ``early_stopping_eps``). ``unused`` lists the
    known keys that were set but are not acted on, ``unknown`` the keys the
    seed does not define either; ``values`` holds every key as given.
    """

    data_path: str | None = None
    num_train: int | None = None
    num_val: int | None = None
    seed: int | None = None
    target_start_ind: int = 0
    target_end_ind: int = -1
    k: int | None = None
    lr: float = 0.01
    eps: float = 1e-5
    batch_size: int | None = None
    out_dir: str | None = None
    num_workers: int = 16
    use_bias: int = 1
    manual_max_lambda: float = -1.0
    early_stopping_check_every: int = 2
    early_stopping_eps: float = 1e-5
    unused: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()
    values: Mapping[str, Any] = field(default_factory=dict)
    unused_reasons: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        minimum = {"num_train": 0, "num_val": 0, "k": 1, "batch_size": 1, "num_workers": 1}
        for name, low in minimum.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{_dotted(name)} must be >= {low}; found {value}.")
        if self.target_start_ind < 0:
            raise ConfigError(f"data.target_start_ind must be >= 0; found {self.target_start_ind}.")
        if self.target_end_ind != -1 and self.target_end_ind <= self.target_start_ind:
            raise ConfigError(
                f"data.target_end_ind ({self.target_end_ind}) must be greater than "
                f"data.target_start_ind ({self.target_start_ind}), or -1 for all targets."
            )

    @property
    def target_slice(self) -> tuple[int, int]:
        """``(target_start_ind, target_end_ind)``; ``-1`` means to the end."""
        return self.target_start_ind, self.target_end_ind

    def require(self, *keys: str) -> None:
        """Raise :class:`ConfigError` naming the flag for each missing key."""
        missing = [k for k in keys if getattr(self, _attr(k)) is None]
        if missing:
            raise ConfigError(
                f"missing required settings {missing}: set them in the YAML config or pass "
                + " ".join(f"--{k} VALUE" for k in missing)
                + "."
            )


def _attr(key: str) -> str:
    section, _, name = key.partition(".")
    return f"early_stopping_{name}" if section == "early_stopping" else name


def _dotted(attr: str) -> str:
    for key in KNOWN_KEYS:
        if _attr(key) == attr:
            return key
    return attr


def load_regression_config(
    paths: str | os.PathLike | Sequence[str | os.PathLike] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    solver: str = "auto",
    warn: bool = True,
) -> SeedRegressionConfig:
    """Read the seed's regression YAML file(s) and dotted overrides.

    Later files override earlier ones and ``overrides`` (``{"cfg.out_dir":
    ...}``; ``None`` values are ignored) override the files, as with
    fastargs' ``--config-file`` and ``--section.key`` flags.

    Parameters
    ----------
    paths
        YAML (or JSON) files.
    overrides
        Dotted keys from the command line.
    solver
        The solver that will run (``auto``, ``lstsq``, ``saga``, ``fast_l1``):
        it decides which known keys count as unused (see :data:`UNUSED_KEYS`).
    warn
        Emit a :class:`SeedConfigWarning` listing unused and unknown keys.

    Examples
    --------
    >>> cfg = load_regression_config("regression_config.yaml",
    ...                              {"data.data_path": "ds.beton"})  # doctest: +SKIP
    >>> cfg.num_train, cfg.k, cfg.unknown                               # doctest: +SKIP
    (45000, 1, ('cfg.true_random',))
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for p in paths:
        for key, value in read_config_files([p]).items():
            merged[key] = value
            origin[key] = f"config file {str(p)!r}"
    for key, value in (overrides or {}).items():
        if value is not None:
            merged[key] = value
            origin[key] = f"--{key}"

    kwargs: dict[str, Any] = {}
    unknown = []
    for key, value in merged.items():
        if key in KNOWN_KEYS:
            kind, _ = KNOWN_KEYS[key]
            kwargs[_attr(key)] = _coerce(key, kind, value, origin[key])
        else:
            unknown.append(key)
    for key, (_, default) in KNOWN_KEYS.items():
        if kwargs.get(_attr(key)) is None and default is not None:
            kwargs[_attr(key)] = default
    kind = solver_kind(kwargs.get("k"), kwargs.get("manual_max_lambda", -1.0), solver)
    unused = sorted(k for k in UNUSED_KEYS[kind] if k in merged and merged[k] is not None)
    cfg = SeedRegressionConfig(
        **kwargs, unused=tuple(unused), unknown=tuple(sorted(unknown)), values=dict(merged),
        unused_reasons={k: UNUSED_KEYS[kind][k] for k in unused},
    )
    if warn and (cfg.unused or cfg.unknown):
        warnings.warn(describe_ignored(cfg), SeedConfigWarning, stacklevel=2)
    return cfg


def describe_ignored(cfg: SeedRegressionConfig) -> str:
    """One message naming the keys that are read but not acted on."""
    parts = []
    if cfg.unused:
        parts.append(
            "settings read but not used: "
            + "; ".join(f"{k}={getattr(cfg, _attr(k))!r} ({cfg.unused_reasons.get(k, 'unused')})"
                        for k in cfg.unused)
        )
    if cfg.unknown:
        parts.append(
            "unknown keys, ignored (the seed's run_regression.py does not define them either): "
            + ", ".join(f"{k}={cfg.values.get(k)!r}" for k in cfg.unknown)
        )
    return "; ".join(parts) + "."


def read_config_files(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Flattened ``{dotted key: value}`` of YAML/JSON config files, later files winning
    (the seed's ``--config-file``/``-C``, accepted by every seed command)."""
    merged: dict[str, Any] = {}
    for p in paths:
        path = Path(p)
        data = read_yaml_file(path, "config file", "check the --config path")
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"config file {str(path)!r} must hold sections such as 'data:' and 'cfg:'; "
                f"found a {type(data).__name__}."
            )
        merged.update(flatten(data))
    return merged


def seed_options(cfg: SeedRegressionConfig, solver: str) -> dict[str, Any]:
    """The options of ``solver`` that the seed's keys set, derived from the options class's fields
    (each field's ``seed_key``; unset keys are left to the solver's defaults)."""
    out: dict[str, Any] = {}
    for info in option_infos(options_class(solver)):
        if info.seed_key is None:
            continue
        value = getattr(cfg, _attr(info.seed_key))
        if value is None:
            continue
        out[info.name] = info.from_seed(value) if info.from_seed is not None else value
    return out


def solver_for(cfg: SeedRegressionConfig, solver: str = "auto") -> tuple[str, dict[str, Any]]:
    """The solver and its options for the seed's settings: the one mapping.

    ``auto``: exact least squares for ``k: 1, manual_max_lambda: 0`` (the
    seed's configs; an absent ``cfg.k`` counts as 1), the SAGA lasso path
    otherwise, with the options its fields' seed keys name.

    Raises
    ------
    ConfigError
        For ``use_bias: 0``, or ``--solver lstsq`` with settings that need a path.
    """
    if cfg.use_bias != 1:
        raise ConfigError(
            f"cfg.use_bias={cfg.use_bias}: fitting without an intercept is not supported; set cfg.use_bias: 1."
        )
    name = choose_solver(cfg.k, cfg.manual_max_lambda, solver)
    if name == "lstsq":
        if not _plain(cfg.k, cfg.manual_max_lambda):
            raise ConfigError(
                f"cfg.k={cfg.k}, cfg.manual_max_lambda={cfg.manual_max_lambda} ask for a lasso path, which "
                f"the exact least-squares solver does not fit; use --solver saga (or auto), or set cfg.k: 1 "
                f"and cfg.manual_max_lambda: 0."
            )
        return "lstsq", {}
    return name, seed_options(cfg, name)
