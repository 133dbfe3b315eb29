"""Tables in memory at the Python edge: a pandas DataFrame or a ``datasets`` table as plain rows.

The stages stream their input from files; the Python API (:mod:`reweight_audit.api`)
also hands them tables a notebook already holds. Here such a table becomes the
plain rows (dicts of Python values: no numpy scalars or arrays, no NaN) that
the loaders validate exactly as they validate a file's lines. Neither pandas
nor ``datasets`` is imported to recognise a table: an object of their types
can only exist once its library was imported.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Iterator
from typing import Any

from reweight_audit.core.errors import AuditError

#: What an in-memory corpus or table may be, for messages.
TABLE_KINDS = "a pandas DataFrame or a datasets.Dataset"


def is_dataframe(data: Any) -> bool:
    """True for a pandas DataFrame."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(data, pandas.DataFrame)


def is_table(data: Any) -> bool:
    """True for a pandas DataFrame or a Hugging Face ``Dataset`` / ``IterableDataset``."""
    if is_dataframe(data):
        return True
    datasets = sys.modules.get("datasets")
    return datasets is not None and isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def check_table(data: Any, what: str) -> None:
    """A one-line error for a ``datasets.DatasetDict`` (several splits): pick one."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = ", ".join(map(repr, data)) or "none"
        raise AuditError(f"{what}: a DatasetDict holds several splits ({splits}); pass one, e.g. data['train']")


def plain(value: Any) -> Any:
    """``value`` with numpy arrays as lists, numpy scalars as Python numbers and NaN/NA/NaT as None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    tolist = getattr(value, "tolist", None)
    if callable(tolist) and hasattr(value, "dtype"):  # numpy arrays and scalars
        return plain(tolist()) if getattr(value, "ndim", 0) else _scalar(tolist())
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is not None and not isinstance(value, (str, bool, int, float)) and _is_missing(value):
        return None
    return value


def _is_missing(value: Any) -> bool:
    """pandas' NA and NaT (only when pandas is loaded: nothing else produces them)."""
    pandas = sys.modules.get("pandas")
    if pandas is None:
        return False
    try:
        return bool(pandas.isna(value))
    except (TypeError, ValueError):
        return False


def table_rows(data: Any) -> Iterator[dict]:
    """The rows of a DataFrame or ``datasets`` table as plain dicts (see :func:`plain`), in order."""
    if is_dataframe(data):
        columns = [str(c) for c in data.columns]
        for values in data.itertuples(index=False, name=None):
            yield {c: plain(v) for c, v in zip(columns, values)}
        return
    for row in data:
        yield plain(dict(row))


def row_json(row: dict) -> str:
    """One row as canonical JSON text (sorted keys): what a digest or a missing id is computed from."""
    return json.dumps(row, ensure_ascii=False, sort_keys=True, default=str)


def rows_digest(rows: Iterator[dict] | list[dict]) -> str:
    """``sha256:`` of the rows' canonical JSON, one line each: the same table always gives the same digest."""
    h = hashlib.sha256()
    for row in rows:
        h.update(row_json(row).encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return "sha256:" + h.hexdigest()
