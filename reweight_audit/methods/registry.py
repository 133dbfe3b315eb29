"""The method registry: registration, discovery, parameters and validated evaluation.

A *method* is a pure function of per-token statistics (numpy columns) that
returns one non-negative weight per token. Methods are registered with the
``@register`` decorator; built-ins live in the family modules of this package,
third-party methods arrive through the entry-point group
``reweight_audit.methods`` or a ``--method-file path.py``.

Every method function has the signature::

    fn(columns, *, batch=None, rng=None, **params) -> np.ndarray

``columns`` maps column names to 1-D arrays of equal length, ``batch`` is the
per-token simulated training-batch id (only batch-dependent methods look at
it), ``rng`` is a ``numpy.random.Generator`` seeded by the caller. The
method's parameters are the keyword-only parameters after ``batch`` and
``rng``; their defaults are the parameter defaults (``Method.params``), so a
default is written once, in the function. ``compute_weights`` is the only
sanctioned way to call one: it checks inputs, merges parameters over the
defaults and validates the output, so a broken method fails with a one-line
``AuditError`` instead of corrupting a report.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import math
import sys
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from reweight_audit.core.errors import AuditError
from reweight_audit.core.registry import Registry

from .shapes import ViewedWeights, loss_view

ENTRY_POINT_GROUP = "reweight_audit.methods"

FAMILIES = ("prob", "entropy", "rank", "loss", "reference", "baseline", "control")

# Characters a method name may not contain: ``.`` and ``=`` are the syntax of
# ``--param name.key=value``; ``,`` separates ``--methods a,b``.
_FORBIDDEN_IN_NAME = set(".=,") | set(" \t\r\n")
# Keyword parameters every method takes that are not parameters of the method.
_CALL_KEYWORDS = ("batch", "rng")


@dataclass(frozen=True)
class Method:
    """One registered weighting method (see the module docstring for ``fn``)."""

    name: str
    family: str  # prob | entropy | rank | loss | reference | baseline | control
    needs: tuple[str, ...]  # statistics columns required, e.g. ("logp",)
    # Parameter defaults, read from fn's keyword-only parameters. Excluded from
    # hashing (a dict is unhashable) so a Method can still be a dict key or set
    # member. Treat as read-only.
    params: dict = field(hash=False)
    formula: str
    source: str
    fn: Callable[..., np.ndarray]
    batch_dependent: bool = False
    # The declared per-token loss shape (``methods.shapes.LossShape``) when the method changes the loss
    # itself; None: the method trains sg(w)·NLL. Every view follows from it (``compute_views``).
    shape: Any = field(default=None, compare=False)
    # Which source supports which value of each parameter: {param: text} (docs/methods.md).
    param_sources: dict = field(default_factory=dict, hash=False, compare=False)


# Registration order is the order ``available_methods`` reports.
_METHODS: Registry[Method] = Registry("method", known_label="known methods")
_entry_points_loaded = False
# Entry points already loaded, keyed by (name, value), so a setup callable is
# never called twice.
_loaded_entry_points: set[tuple[str, str]] = set()
# Method files already imported: resolved path -> names they added. Importing a
# file twice would re-register its methods and fail as duplicates.
_loaded_files: dict[str, list[str]] = {}


def _one_line(text: object) -> str:
    """Collapse a message onto one line (AuditError messages are single lines)."""
    return " ".join(str(text).split())


def _describe_exception(exc: BaseException) -> str:
    message = _one_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# ---------------------------------------------------------------- registration


def signature_params(name: str, fn: Callable) -> dict[str, Any]:
    """The method's parameters: ``fn``'s keyword-only parameters other than batch and rng, with their defaults.

    A keyword-only parameter without a default is an error (every parameter
    needs a default, which ``--param`` overrides). A callable without a
    signature (a builtin) has none.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return {}
    defaults: dict[str, Any] = {}
    for p in sig.parameters.values():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.name in _CALL_KEYWORDS:
            continue
        if p.default is inspect.Parameter.empty:
            raise AuditError(
                f"method {name!r}: keyword-only parameter {p.name!r} needs a default "
                "(the default is the method's parameter default)"
            )
        defaults[p.name] = p.default
    return defaults


def _check_signature(name: str, fn: Callable, params: Mapping[str, Any]) -> None:
    """Fail at registration, not at first use, if ``fn`` cannot take its call."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return
    try:
        sig.bind({}, batch=None, rng=None, **params)
    except TypeError as exc:
        raise AuditError(
            f"method {name!r}: {getattr(fn, '__qualname__', fn)!s} must accept "
            f"(columns, *, batch, rng, {', '.join(params) or 'no params'}) ({_one_line(exc)})"
        ) from None


def _check_declaration(name: str, family: str, needs: Any, params: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Validate what ``@register`` is told; returns ``needs`` as a tuple."""
    if not isinstance(name, str) or not name or set(name) & _FORBIDDEN_IN_NAME:
        raise AuditError(
            f"invalid method name {name!r}: use a non-empty name without spaces, '.', '=' or ','"
        )
    if family not in FAMILIES:
        raise AuditError(
            f"method {name!r}: unknown family {family!r}; use one of {', '.join(FAMILIES)}"
        )
    if isinstance(needs, str):  # ("logp") instead of ("logp",): a classic slip
        needs = (needs,)
    needs_t = tuple(needs)
    if not all(isinstance(c, str) and c for c in needs_t):
        raise AuditError(f"method {name!r}: needs must be column names, got {needs!r}")
    for key in params or {}:
        if not (isinstance(key, str) and key.isidentifier()) or key in _CALL_KEYWORDS:
            raise AuditError(f"method {name!r}: invalid parameter name {key!r}")
    return needs_t


def register(
    name: str,
    *,
    family: str,
    needs: tuple[str, ...] | list[str],
    formula: str,
    source: str,
    params: Mapping[str, Any] | None = None,
    batch_dependent: bool = False,
    shape: Any = None,
    param_sources: Mapping[str, str] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` as method ``name``; returns ``fn`` unchanged.

    The parameters and their defaults are ``fn``'s keyword-only parameters
    after ``batch`` and ``rng``. ``params={...}`` is still accepted from older
    third-party code: when given, it is the parameter set instead (and ``fn``
    must accept it). A duplicate name, an unknown family, a name containing
    ``. = ,`` or whitespace, a parameter name that is not an identifier, or a
    function that cannot be called as ``fn(columns, batch=, rng=, **params)``
    raises ``AuditError``. ``shape`` declares the per-token loss (``methods.shapes.LossShape``) the
    weight is the NLL-gradient multiplier of; ``param_sources`` says, per parameter, which source supports
    which value (docs/methods.md prints it).
    """
    needs_t = _check_declaration(name, family, needs, params)

    def decorator(fn: Callable) -> Callable:
        if name in _METHODS:
            raise AuditError(
                f"method {name!r} is already registered (from {_METHODS.get(name).fn.__module__}); "
                "choose another name"
            )
        if not callable(fn):
            raise AuditError(f"method {name!r}: @register must decorate a function")
        defaults = dict(params) if params is not None else signature_params(name, fn)
        _check_signature(name, fn, defaults)
        _METHODS.add(name, Method(
            name=name,
            family=family,
            needs=needs_t,
            params=defaults,
            formula=formula,
            source=source,
            fn=fn,
            batch_dependent=bool(batch_dependent),
            shape=shape,
            param_sources=dict(param_sources or {}),
        ))
        return fn

    return decorator


def unregister(name: str) -> Method:
    """Remove a registered method and return it (for tests and plugin reloads)."""
    if name not in _METHODS:
        raise AuditError(f"cannot unregister {name!r}: no such method")
    method = _METHODS.get(name)
    _METHODS.remove(name)
    return method


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Restore the registry (methods, loaded files, loaded entry points) on exit.

    Tests register throw-away methods inside ``with isolated_registry():`` so
    nothing leaks into other tests.
    """
    global _entry_points_loaded
    saved = (_entry_points_loaded, set(_loaded_entry_points), dict(_loaded_files))
    try:
        with _METHODS.isolated():
            yield
    finally:
        _entry_points_loaded = saved[0]
        _loaded_entry_points.clear()
        _loaded_entry_points.update(saved[1])
        _loaded_files.clear()
        _loaded_files.update(saved[2])


# ------------------------------------------------------------------- discovery


@contextlib.contextmanager
def _entry_point_errors(ep: EntryPoint) -> Iterator[None]:
    """Turn whatever a failing entry point raises into one ``AuditError`` line naming it."""
    where = f"entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP})"
    try:
        yield
    except AuditError as exc:
        raise AuditError(f"{where}: {exc}") from None
    except Exception as exc:  # a third-party plugin can raise anything
        raise AuditError(f"{where} failed to load: {_describe_exception(exc)}") from None


def _load_entry_point(ep: EntryPoint) -> None:
    """Import ``ep``; call it when it is a setup hook rather than a module or a registered method."""
    obj = ep.load()
    if callable(obj) and not isinstance(obj, ModuleType):
        if not any(m.fn is obj for m in _METHODS.values()):
            obj()


def load_entry_points() -> list[str]:
    """Load every entry point of group ``reweight_audit.methods``; return names added.

    An entry point names a module (``pkg.methods``) whose import registers
    methods with ``@register``, or a callable (``pkg.methods:setup``). A
    callable that is itself a registered method function needs nothing more;
    any other callable is called once with no arguments, as a setup hook that
    registers methods. A failing entry point raises ``AuditError`` naming it,
    and whatever it had registered is rolled back (``Registry.transaction``).
    """
    global _entry_points_loaded
    _entry_points_loaded = True
    added: list[str] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = (ep.name, ep.value)
        if key in _loaded_entry_points:
            continue
        # The transaction is inside the error translation: roll back first, then report.
        with _entry_point_errors(ep), _METHODS.transaction() as names:
            _load_entry_point(ep)
        _loaded_entry_points.add(key)
        added.extend(names)
    return added


@contextlib.contextmanager
def _method_file_errors(path: str | Path, mod_name: str) -> Iterator[None]:
    """Turn an error while importing a method file into one ``AuditError`` line naming the file."""
    try:
        yield
    except BaseException as exc:
        sys.modules.pop(mod_name, None)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        detail = str(exc) if isinstance(exc, AuditError) else _describe_exception(exc)
        raise AuditError(f"method file {str(path)!r}: {_one_line(detail)}") from None


def load_method_file(path: str | Path) -> list[str]:
    """Import a Python file whose ``@register`` calls add methods; return the names added.

    Loading the same file again returns the names of the first load without
    re-executing it. A missing file or any error while importing raises a
    one-line ``AuditError`` naming the file; methods it had registered before
    failing are removed again (``Registry.transaction``).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise AuditError(f"method file {str(path)!r} not found")
    resolved = str(p.resolve())
    if resolved in _loaded_files:
        return list(_loaded_files[resolved])
    # A module name unique per file, so two files both called methods.py
    # do not replace each other in sys.modules.
    digest = hashlib.blake2b(resolved.encode("utf-8"), digest_size=6).hexdigest()
    mod_name = f"_reweight_audit_method_file_{p.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise AuditError(f"method file {str(path)!r} cannot be imported as Python (use a .py file)")
    module = importlib.util.module_from_spec(spec)
    # In sys.modules during execution: dataclasses and pickling look it up there.
    sys.modules[mod_name] = module
    with _method_file_errors(path, mod_name), _METHODS.transaction() as names:
        spec.loader.exec_module(module)
    _loaded_files[resolved] = list(names)
    return list(names)


def _ensure_entry_points() -> None:
    if not _entry_points_loaded:
        load_entry_points()


def available_methods() -> list[Method]:
    """All registered methods (built-ins, then entry points, then files), in registration order.

    Entry points are loaded on the first call only.
    """
    _ensure_entry_points()
    return _METHODS.values()


def registered_methods() -> list[Method]:
    """The methods registered so far, without loading entry points (the built-ins, at import)."""
    return _METHODS.values()


def get_method(name: str) -> Method:
    """The method registered as ``name``; an unknown name raises ``AuditError`` with "did you mean" and the known ones."""
    if name not in _METHODS:
        # Built-ins resolve without touching plugins; only an unknown name
        # pays for (and can be broken by) entry-point discovery.
        _ensure_entry_points()
    return _METHODS.get(name)


# ------------------------------------------------------------------ parameters


def _coerce(method: str, key: str, raw: str, default: Any) -> float | int | str | bool:
    """Parse ``raw`` to the type of the parameter's default."""
    where = f"--param {method}.{key}={raw}"
    if isinstance(default, bool):
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise AuditError(f"{where}: expected true or false")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise AuditError(f"{where}: expected an integer") from None
    if isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            raise AuditError(f"{where}: expected a number") from None
        if not math.isfinite(value):
            raise AuditError(f"{where}: expected a finite number")
        return value
    if isinstance(default, str):
        return raw
    # A default of another type (None, list...): best-effort number, else text.
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_params(items: list[str]) -> dict[str, dict[str, float | int | str]]:
    """Parse ``["talr.w_min=0.1", "focal.gamma=3"]`` into ``{"talr": {"w_min": 0.1}, ...}``.

    Values take the type of the parameter's default (``focal.gamma=3`` gives
    the float 3.0). Bad syntax, an unknown method, an unknown parameter or a
    value of the wrong type raises ``AuditError``. A later item overrides an
    earlier one for the same parameter.
    """
    out: dict[str, dict[str, float | int | str]] = {}
    for item in items:
        text = str(item).strip()
        target, eq, raw = text.partition("=")
        name, dot, key = target.strip().rpartition(".")
        name, key, raw = name.strip(), key.strip(), raw.strip()
        if not eq or not dot or not name or not key or not raw:
            raise AuditError(
                f"--param {text!r}: expected METHOD.PARAM=VALUE, e.g. focal.gamma=3"
            )
        method = get_method(name)
        if key not in method.params:
            known = ", ".join(method.params) or "none"
            raise AuditError(
                f"--param {text!r}: method {name!r} has no parameter {key!r} (parameters: {known})"
            )
        out.setdefault(name, {})[key] = _coerce(name, key, raw, method.params[key])
    return out


# --------------------------------------------------------------------- batches


def assign_batches(seq_codes: np.ndarray, batch_seqs: int, seed: int) -> np.ndarray:
    """Per-token simulated training-batch id (int64).

    The distinct sequence codes (sorted, so row order does not matter) are
    shuffled with ``np.random.default_rng(seed)`` and cut into consecutive
    batches of ``batch_seqs`` sequences (the last may be smaller). Every token
    of a sequence gets its sequence's batch. The result depends only on the set
    of sequences and the seed, not on the order of the rows.
    """
    codes = np.asarray(seq_codes)
    if codes.ndim != 1:
        raise AuditError(f"assign_batches: seq_codes must be 1-D, got shape {codes.shape}")
    if isinstance(batch_seqs, bool) or not isinstance(batch_seqs, (int, np.integer)) or batch_seqs < 1:
        raise AuditError(f"batch size must be a whole number of sequences >= 1, got {batch_seqs!r}")
    if codes.size == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inverse = np.unique(codes, return_inverse=True)
    perm = np.random.default_rng(seed).permutation(uniq.size)
    batch_of_unique = np.empty(uniq.size, dtype=np.int64)
    # The sequence at shuffled position j is uniq[perm[j]] and lands in batch j // batch_seqs.
    batch_of_unique[perm] = np.arange(uniq.size, dtype=np.int64) // int(batch_seqs)
    return batch_of_unique[inverse.reshape(-1)]


# ----------------------------------------------------------------- evaluation


def missing_columns(method: Method, available: Any) -> list[str]:
    """The columns ``method`` needs that ``available`` (names or a mapping) lacks, in ``needs`` order."""
    have = set(available)
    return [c for c in method.needs if c not in have]


def _as_column(method: Method, name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise AuditError(f"method {method.name!r}: column {name!r} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise AuditError(
            f"method {method.name!r}: column {name!r} must be numeric, got dtype {arr.dtype}"
        )
    return arr


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def compute_weights(
    method: Method,
    columns: Mapping[str, np.ndarray],
    *,
    params: Mapping | None = None,
    batch: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Evaluate ``method`` on ``columns``: a validated float64 weight per token.

    Checks that the needed columns exist, are 1-D, numeric and of one length;
    merges ``params`` over the defaults (unknown name -> ``AuditError``); calls
    ``fn(columns, batch=batch, rng=np.random.default_rng(seed), **params)``;
    and checks the result is a 1-D array of one finite, non-negative weight per
    token. Every failure is an ``AuditError`` naming the method. The returned
    array is a fresh copy, never a view of an input column.
    """
    missing = missing_columns(method, columns)
    if missing:
        raise AuditError(
            f"method {method.name!r} needs column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(repr(c) for c in missing)}, which the statistics table lacks"
        )
    merged = merged_params(method, params)

    # Row count: from the needed columns; a method that needs none (sft,
    # random) takes it from whatever columns were passed.
    cols: dict[str, np.ndarray] = {}
    n: int | None = None
    first: str | None = None
    for name in list(method.needs) + [c for c in columns if c not in method.needs]:
        arr = np.asarray(columns[name])
        if name in method.needs:
            arr = _as_column(method, name, arr)
        cols[name] = arr
        if arr.ndim != 1:
            continue  # an extra column the method does not use
        if n is None:
            n, first = arr.shape[0], name
        elif arr.shape[0] != n and name in method.needs:
            raise AuditError(
                f"method {method.name!r}: column {name!r} has {arr.shape[0]} rows but {first!r} has {n}"
            )
    if n is None:
        raise AuditError(f"method {method.name!r}: no 1-D statistics columns given, so no tokens to weight")
    if batch is not None:
        batch = np.asarray(batch)
        if batch.ndim != 1 or batch.shape[0] != n:
            raise AuditError(
                f"method {method.name!r}: batch ids have shape {batch.shape}, expected ({n},)"
            )

    try:  # NumPy's over/invalid warnings stay silent: _validate names every non-finite weight, in one line
        with np.errstate(all="ignore"):
            result = method.fn(cols, batch=batch, rng=np.random.default_rng(seed), **merged)
    except AuditError as exc:
        msg = str(exc)
        raise AuditError(msg if repr(method.name) in msg else f"method {method.name!r}: {msg}") from None
    except ValueError as exc:
        # Methods signal bad parameter values with ValueError; anything else
        # is a bug and keeps its traceback.
        raise AuditError(f"method {method.name!r}: {_one_line(exc)}") from None
    return _validate(method, result, n, cols)


def merged_params(method: Method, params: Mapping | None) -> dict:
    """``params`` over the method's defaults; an unknown name is an ``AuditError`` naming the known ones."""
    merged = dict(method.params)
    for key, value in dict(params or {}).items():
        if key not in method.params:
            known = ", ".join(method.params) or "none"
            raise AuditError(f"method {method.name!r} has no parameter {key!r} (parameters: {known})")
        merged[key] = value
    return merged


def compute_views(
    method: Method,
    columns: Mapping[str, np.ndarray],
    *,
    params: Mapping | None = None,
    batch: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(weight, loss) per token: the weight as ``compute_weights`` checks it, and the loss view.

    The loss view is the method's declared per-token loss ℓ_t (``Method.shape``) when it has one, else
    w_t·(−log p_t), the loss of a stop-gradient weight; both need the ``logp`` column (NaN without it).
    """
    w = compute_weights(method, columns, params=params, batch=batch, seed=seed)
    if "logp" not in columns:
        return w, np.full(w.shape, np.nan)
    if method.shape is None:
        return w, loss_view(w, np.asarray(columns["logp"]))
    _, loss = method.shape.views(columns, batch, merged_params(method, params))
    return w, np.asarray(loss, dtype=np.float64)


def compute_viewed(
    method: Method,
    columns: Mapping[str, np.ndarray],
    *,
    params: Mapping | None = None,
    batch: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``compute_weights`` whose result also carries the loss view (``shapes.ViewedWeights.loss``)
    when the method declares a loss shape; otherwise the plain weights (their loss view is w·NLL)."""
    if method.shape is None or "logp" not in columns:
        return compute_weights(method, columns, params=params, batch=batch, seed=seed)
    w, loss = compute_views(method, columns, params=params, batch=batch, seed=seed)
    return ViewedWeights(w, loss)


def _validate(method: Method, result: Any, n: int, cols: Mapping[str, np.ndarray]) -> np.ndarray:
    label = f"method {method.name!r}"
    if result is None:
        raise AuditError(f"{label} returned None instead of an array of {n} weights")
    arr = np.asarray(result)
    if arr.dtype.kind not in "biuf":
        raise AuditError(f"{label} returned dtype {arr.dtype}; expected real-valued weights")
    if arr.ndim != 1:
        raise AuditError(f"{label} returned an array of shape {arr.shape}; expected 1-D with {n} weights")
    if arr.shape[0] != n:
        raise AuditError(f"{label} returned {arr.shape[0]} weights for {n} tokens")
    weights = np.array(arr, dtype=np.float64)  # always a copy
    problems = []
    n_nan = int(np.isnan(weights).sum())
    n_inf = int(np.isinf(weights).sum())
    n_neg = int((weights < 0).sum())
    if n_nan:
        problems.append(_plural(n_nan, "NaN weight"))
    if n_inf:
        problems.append(_plural(n_inf, "infinite weight"))
    if n_neg:
        problems.append(_plural(n_neg, "negative weight"))
    if problems:
        # Point at bad inputs when there are any: it is usually the table, not the method.
        hints = []
        for name in method.needs:
            col = cols[name]
            if col.dtype.kind == "f":
                bad = int((~np.isfinite(col)).sum())
                if bad:
                    hints.append(f"column {name!r} has {_plural(bad, 'non-finite value')}")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise AuditError(f"{label} returned {' and '.join(problems)}{hint}")
    return weights
