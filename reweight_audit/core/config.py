"""The machinery of the stage configs: each option once, as a typed dataclass field with its flag, help and check.

A stage's config (``injection.config.InjectConfig``, ``scoring.config.ScoreConfig``,
``evaluation.config.CompareConfig`` / ``SweepConfig``, ``training.config.TrainConfig``,
``demo.DemoConfig``) declares every option with :func:`option`: its default, its help
text, its command-line flag (``--batch-tokens`` for ``batch_tokens`` unless given) and
an optional ``check`` that refuses a bad value with one :class:`AuditError` line naming
the flag and returns the value as the config keeps it. The config's ``__post_init__``
calls :func:`validate`, so a config that exists is valid, however it was built.

From the same fields come the command line's parameters (:func:`cli_parameters`, typer
reads them from a generated ``__signature__``), the Python API's keywords
(:func:`api_parameters`, :func:`api_options`) and what a manifest records (:func:`record`).
Only the standard library is imported here (typer lazily, by the command line).
"""
from __future__ import annotations

import dataclasses
import inspect
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

from reweight_audit.core.errors import AuditError

_KEY = "reweight_audit.option"


@dataclasses.dataclass(frozen=True)
class Option:
    """What a config field says about its option besides its type and default."""

    help: str
    flag: str | None = None  # the command line's name; None: --<name with - for _>
    check: Callable[[Any], Any] | None = None  # refuses a bad value (AuditError), returns the value kept
    kind: str | None = None  # the type check (a key of KINDS); None: from the field's annotation
    cli: bool = True  # False: the stage's own (no flag, no API keyword; the config's caller sets it)
    api_type: str | None = None  # the annotation the API shows; None: from the kind


def option(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
           check: Callable[[Any], Any] | None = None, kind: str | None = None, cli: bool = True,
           api_type: str | None = None) -> Any:
    """A config field: ``x: int = option(3, help="...", flag="--x", check=...)``. A list default is a tuple."""
    return dataclasses.field(default=default, metadata={_KEY: Option(help, flag, check, kind, cli, api_type)})


#: kind -> (accepted types, what to give, the command line's type, the API's annotation)
KINDS: dict[str, tuple[tuple, str, Any, str]] = {
    "text": ((str,), "text", str, "str"),
    "int": ((numbers.Integral,), "a whole number", int, "int"),
    "number": ((numbers.Real,), "a number", float, "float"),
    "flag": ((bool,), "True or False", bool, "bool"),
    "path": ((str, os.PathLike), "a path", Path, "PathLike"),
    "model": ((str, os.PathLike), "'default', a hub id or a path", str, "PathLike"),
    "names": ((str,), "a comma list or a list of names", list[str], "str | Sequence[str]"),
    "paths": ((str, os.PathLike), "a path", list[Path], "Sequence[PathLike]"),
    "params": ((object,), "method parameters", list[str], "Sequence[str]"),  # the config's check reads them
    "cuts": ((object,), "cuts in percent", list[str], "float | Sequence[float]"),  # the config's check reads them
    "any": ((object,), "a value", str, "Any"),
}
#: kinds whose value passes to the config's own check as given
_OWN_CHECK = ("params", "cuts")
_ANNOTATION_KINDS = {"str": "text", "int": "int", "float": "number", "bool": "flag", "Path": "path",
                     "list[str]": "names", "list[Path]": "paths"}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One option as the generators see it."""

    name: str
    flag: str
    kind: str
    optional: bool
    default: Any
    option: Option

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING


def specs(config: Any) -> list[Spec]:
    """The options of a config class (or instance), in field order."""
    out = []
    for f in dataclasses.fields(config):
        meta = f.metadata.get(_KEY)
        if meta is None:
            continue
        parts = [p.strip() for p in str(f.type).split("|")]
        base = " | ".join(p for p in parts if p != "None")
        out.append(Spec(f.name, meta.flag or "--" + f.name.replace("_", "-"),
                        meta.kind or _ANNOTATION_KINDS.get(base, "any"), "None" in parts, f.default, meta))
    return out


def split_list(values: str | Iterable[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list: ``["a,b", "c"]`` (``-x a,b -x c``) → ``[a, b, c]``.

    One string is one value list: ``"a, b"`` → ``[a, b]``.
    """
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values or [] for item in str(value).split(",") if item.strip()]


# --------------------------------------------------------------------------- validation


def validate(config: Any) -> None:
    """Every option of ``config`` type-checked, converted (paths, lists) and checked, in field order."""
    for spec in specs(config):
        value = _typed(spec, getattr(config, spec.name))
        if value is not None and spec.option.check is not None:
            value = spec.option.check(value)
        object.__setattr__(config, spec.name, value)


def _wrong(spec: Spec, value: Any, what: str | None = None) -> AuditError:
    what = what or KINDS[spec.kind][1]
    return AuditError(f"{spec.flag} {value!r}: give {what}{' or None' if spec.optional else ''}")


def _typed(spec: Spec, value: Any) -> Any:
    """The value as the config keeps it: a path as Path, a list option as a list; a wrong type is one line."""
    if value is None and (spec.optional or spec.kind == "any"):
        return None
    if value is None and KINDS[spec.kind][2] in (list[str], list[Path]):
        return []  # a list option left empty: its check gives the default
    if spec.kind in _OWN_CHECK:
        return value
    if spec.kind == "names":
        return _names(spec, value)
    if spec.kind == "paths":
        items = [value] if isinstance(value, (str, os.PathLike)) else value
        if not isinstance(items, Iterable):
            raise _wrong(spec, value)
        return [Path(_one(spec, item)) for item in items]
    value = _one(spec, value)
    return Path(value) if spec.kind == "path" else os.fspath(value) if spec.kind == "model" else value


def _one(spec: Spec, value: Any) -> Any:
    types = KINDS[spec.kind][0]
    wrong_bool = isinstance(value, bool) and bool not in types and object not in types  # True is no number here
    if wrong_bool or not isinstance(value, types):
        raise _wrong(spec, value)
    return value


def _names(spec: Spec, value: Any) -> list[str]:
    if isinstance(value, str) or (isinstance(value, Sequence) and all(isinstance(v, str) for v in value)):
        return split_list(value)
    raise _wrong(spec, value)


# --------------------------------------------------------------------------- records and generated signatures


def record(config: Any) -> dict:
    """The options as JSON values, by field name (paths as text), for a manifest."""
    def plain(value: Any) -> Any:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return {spec.name: plain(getattr(config, spec.name)) for spec in specs(config)}


class Config:
    """The base of the stage configs (dataclasses): validated on construction, recorded by option name."""

    def __post_init__(self) -> None:
        validate(self)
        self.check()

    def check(self) -> None:
        """Checks across options, after each option's own (a subclass adds them)."""

    def record(self) -> dict:
        """The options as JSON values, by name, for a manifest."""
        return record(self)


def _cli_default(spec: Spec) -> Any:
    if spec.required:
        return inspect.Parameter.empty
    if isinstance(spec.default, tuple):
        return [f"{v:g}" if isinstance(v, float) else str(v) for v in spec.default]
    return spec.default


def cli_parameters(config_cls: type) -> list[inspect.Parameter]:
    """The config's command-line options as typer parameters (``Annotated[type, typer.Option(flag, help=...)]``)."""
    import typing

    import typer

    out = []
    for spec in specs(config_cls):
        if not spec.option.cli:
            continue
        kind = "text" if spec.kind == "names" and spec.optional else spec.kind  # --methods a,b: one comma list
        cli_type = KINDS[kind][2]
        if spec.optional:
            cli_type = Optional[cli_type]
        annotation = typing.Annotated[cli_type, typer.Option(spec.flag, help=spec.option.help)]
        out.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=_cli_default(spec),
                                     annotation=annotation))
    return out


def api_parameters(config_cls: type) -> list[inspect.Parameter]:
    """The config's options as the API's keyword parameters; a one-value list default shows as that value."""
    out = []
    for spec in specs(config_cls):
        if not spec.option.cli:  # a stage-only option (the stage function's config takes it)
            continue
        default = spec.default
        if isinstance(default, tuple) and len(default) == 1:
            default = default[0]
        annotation = spec.option.api_type or KINDS[spec.kind][3] + (" | None" if spec.optional else "")
        out.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                     annotation=annotation))
    return out


def with_signature(fn: Callable, before: Sequence[inspect.Parameter], config_cls: type,
                   after: Sequence[inspect.Parameter] = (), *, api: bool = True) -> Callable:
    """Set ``fn.__signature__``: ``before``, then the config's options (API or command-line form), then ``after``."""
    options = api_parameters(config_cls) if api else cli_parameters(config_cls)
    params = [*before, *options, *after]
    if not api:  # typer passes keywords: keyword-only lets a required option follow optional ones
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    fn.__signature__ = inspect.Signature(params, return_annotation=inspect.signature(fn).return_annotation)
    return fn


def api_options(config_cls: type, options: Mapping[str, Any], where: str) -> Any:
    """The config built from an API call's ``**options``; an unknown keyword is one line naming the known ones."""
    known = [p.name for p in api_parameters(config_cls)]
    for name in options:
        if name not in known:
            raise AuditError(f"{where}: no option {name!r}; the options are {', '.join(known)}")
    return config_cls(**options)

