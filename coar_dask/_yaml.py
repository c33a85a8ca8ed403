"""Reading the YAML files users give (experiments, seed configs, SLURM settings).

One place that loads them safely (``yaml.safe_load``'s rules: plain data,
never Python objects) and turns a missing or malformed file into a one-line
:class:`~coar_dask.errors.ConfigError`. Hostile files are refused before they
are built into Python data: nesting deeper than :data:`MAX_DEPTH` (PyYAML
recurses once per level and would end in a RecursionError) and aliases whose
expansion passes :data:`MAX_NODES` nodes ("billion laughs": a few lines that
expand to billions of items). Anchors and aliases of ordinary size still work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from coar_dask.errors import ConfigError

#: Deepest nesting of lists and mappings read (configs here are a few levels deep).
MAX_DEPTH = 100
#: Most nodes a file may hold once its aliases are expanded.
MAX_NODES = 100_000


def _expanded_size(root: Any) -> int:
    """Nodes of the composed document with every alias expanded (aliases share node objects)."""
    sizes: dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # post-order without recursion; each distinct node once
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = -1
        order.append(node)
        for child in _children(node):
            if id(child) not in sizes:
                stack.append(child)
    for node in reversed(order):
        total = 1 + sum(sizes[id(c)] for c in _children(node))
        sizes[id(node)] = min(total, MAX_NODES + 1)
    return sizes[id(root)]


def _children(node: Any) -> list[Any]:
    value = getattr(node, "value", None)
    if not isinstance(value, list):
        return []
    return [x for pair in value for x in pair] if value and isinstance(value[0], tuple) else list(value)


def _loader(text: str, what: str) -> Any:
    """A SafeLoader over ``text`` that refuses nesting past :data:`MAX_DEPTH`."""
    import yaml

    class _Loader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ConfigError(f"{what} nests lists or mappings more than {MAX_DEPTH} levels deep (line "
                                      f"{mark.line + 1}); a configuration is a few levels deep: fix the file.")
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return _Loader(text)


def safe_load(text: str, what: str = "YAML") -> Any:
    """``yaml.safe_load(text)``, refusing deep nesting and alias bombs with one :class:`ConfigError` line."""
    loader = _loader(text, what)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_NODES:
            raise ConfigError(f"{what} expands to more than {MAX_NODES:,} items through its aliases (*name); "
                              f"a configuration needs no such expansion: write the values out.")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_problem(exc: Exception) -> str:
    """A YAML error on one line (PyYAML's own message spans several, with a source excerpt)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = ("only plain YAML is read (yaml.safe_load): no python tags"
            if "constructor" in problem else "fix the syntax there")
    return f"{problem}{where}; {hint}."


def read_yaml_file(path: str | os.PathLike, what: str, missing_hint: str = "") -> Any:
    """The data of a YAML file (``None`` for an empty one), read with ``yaml.safe_load``.

    ``what`` names the file in errors ("experiment file"); ``missing_hint`` is
    appended when it does not exist.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist{'; ' + missing_hint if missing_hint else ''}.")
    try:
        return safe_load(path.read_text(), f"{what} {str(path)!r}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {yaml_problem(exc)}") from None
