"""Method parameters as a sweep axis: ``sweep --grid ranktuner-approx.low_entropy=smooth,trivial``.

A grid item ``METHOD.PARAM=v1,v2,...`` makes one of a method's parameters a convention like rank-by or
scope: the sweep evaluates every method at every point of the grid (the product of the items' values),
and a setting's ``params`` column names the point (``ranktuner-approx.low_entropy=trivial;...``, or
``default`` without a grid). :func:`flips` then says, per grid axis, which pairs of methods change order
with that parameter alone (every other convention and every other axis held fixed). Pure functions.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from reweight_audit.core.errors import AuditError
from reweight_audit.methods import parse_params

#: The ``params`` value of a setting when no grid is given (every method at its defaults).
DEFAULT_POINT = "default"
#: Between the axes of a point's label.
JOIN = ";"


@dataclass(frozen=True)
class Axis:
    """One grid item: a method's parameter and the values it takes (as written, typed by ``parse_params``)."""

    method: str
    param: str
    values: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.method}.{self.param}"


def grid_items(grid: Any) -> list[str]:
    """``["m.p=a,b"]``, one such string, or ``{"m": {"p": ["a", "b"]}}`` as the command line's items."""
    if grid is None:
        return []
    if isinstance(grid, str):
        return [grid] if grid.strip() else []
    if isinstance(grid, Mapping):
        items = []
        for method, params in grid.items():
            if not isinstance(params, Mapping):
                raise AuditError(f"--grid {method}: give {{'param': [values]}} per method")
            items += [f"{method}.{key}=" + ",".join(map(str, vals if isinstance(vals, (list, tuple)) else [vals]))
                      for key, vals in params.items()]
        return items
    if not isinstance(grid, Sequence):
        raise AuditError(f"--grid {grid!r}: give METHOD.PARAM=v1,v2 (repeatable)")
    return [str(item) for item in grid]


def parse_grid(items: Sequence[str]) -> list[Axis]:
    """The grid's axes; each value is checked against the method's parameter (``parse_params``): an unknown
    method or parameter, a value of the wrong type, an axis given twice or fewer than one value is one line."""
    axes: list[Axis] = []
    for item in items:
        target, eq, raw = str(item).partition("=")
        values = tuple(dict.fromkeys(v.strip() for v in raw.split(",") if v.strip()))
        if not eq or "." not in target or not values:
            raise AuditError(f"--grid {item!r}: write METHOD.PARAM=v1,v2, e.g. ranktuner-approx.low_entropy=smooth,"
                             "trivial")
        for value in values:
            parse_params([f"{target.strip()}={value}"]).items()  # raises on an unknown name or a bad value
        method, _, param = target.strip().rpartition(".")
        if any(a.method == method and a.param == param for a in axes):
            raise AuditError(f"--grid {target.strip()} is given twice; give its values in one item")
        axes.append(Axis(method, param, values))
    return axes


def grid_points(axes: Sequence[Axis]) -> list[tuple[str, dict[str, list[str]]]]:
    """(label, ``--param`` items) per point of the grid, in the product's order; no axes: the default point."""
    if not axes:
        return [(DEFAULT_POINT, {})]
    points = []
    for combo in itertools.product(*(a.values for a in axes)):
        label = JOIN.join(f"{a.name}={v}" for a, v in zip(axes, combo))
        items: dict[str, list[str]] = {}
        for a, v in zip(axes, combo):
            items.setdefault(a.method, []).append(f"{a.name}={v}")
        points.append((label, items))
    return points


def point_params(base: Mapping[str, Mapping[str, Any]], items: Mapping[str, list[str]]) -> dict:
    """The sweep's ``--param`` map with one grid point's values laid over it."""
    merged = {m: dict(p) for m, p in base.items()}
    for method, method_items in items.items():
        for name, values in parse_params(method_items).items():
            merged.setdefault(name, {}).update(values)
    return merged


def axis_value(label: str, axis: str) -> str | None:
    """The value ``axis`` (``method.param``) takes in a point's label, or None."""
    for part in str(label).split(JOIN):
        key, _, value = part.partition("=")
        if key == axis:
            return value
    return None


def without_axis(label: str, axis: str) -> str:
    """The label with ``axis`` left out: the other axes' values, which a flip holds fixed."""
    rest = [part for part in str(label).split(JOIN) if part.partition("=")[0] != axis]
    return JOIN.join(rest) or DEFAULT_POINT


def flips(table: pd.DataFrame, metric: str, axes: Sequence[str], setting: Sequence[str]) -> pd.DataFrame:
    """Per grid axis and unordered pair of methods (a, b): in how many settings both are defined at two or more
    of the axis's values (``settings``), and in how many of those their order by ``metric`` differs between two
    values (``flipped``; a tie is no order). Every other convention, and every other axis, is held fixed."""
    rows = []
    if not len(table):
        return pd.DataFrame(columns=["axis", "a", "b", "settings", "flipped"])
    methods = list(dict.fromkeys(table["method"]))
    held = [c for c in setting if c != "params"]
    for axis in axes:
        t = table.assign(_value=table["params"].map(lambda s: axis_value(s, axis)),
                         _rest=table["params"].map(lambda s: without_axis(s, axis)))
        wide = t.pivot_table(index=[*held, "_rest", "_value"], columns="method", values=metric, aggfunc="first")
        wide = wide.reindex(columns=methods)
        rows += _axis_flips(axis, wide, methods)
    return pd.DataFrame(rows, columns=["axis", "a", "b", "settings", "flipped"])


def _axis_flips(axis: str, wide: pd.DataFrame, methods: list[str]) -> list[dict]:
    """Count, for one axis, the groups (everything but the axis's value) where a pair's sign changes."""
    values = wide.to_numpy(dtype=float)  # [group × value, methods]
    groups = wide.index.droplevel(-1)
    codes = pd.factorize(groups)[0]
    n = len(methods)
    both = np.zeros((n, n), dtype=np.int64)
    flipped = np.zeros((n, n), dtype=np.int64)
    for g in np.unique(codes):
        v = values[codes == g]  # [values of the axis, methods]
        if v.shape[0] < 2:
            continue
        diff = np.sign(v[:, :, None] - v[:, None, :])  # [values, a, b]
        defined = np.isfinite(diff)
        enough = defined.sum(axis=0) >= 2
        both += enough
        up = np.max(np.where(defined, diff, -np.inf), axis=0)  # an undefined value is no order
        down = np.min(np.where(defined, diff, np.inf), axis=0)
        flipped += enough & (up > 0) & (down < 0)
    ia, ib = np.triu_indices(n, k=1)
    return [{"axis": axis, "a": methods[i], "b": methods[j], "settings": int(both[i, j]),
             "flipped": int(flipped[i, j])} for i, j in zip(ia, ib)]
