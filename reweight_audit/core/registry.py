"""One registry class for every pluggable kind: weighting methods, metrics, noise families.

A :class:`Registry` maps names to entries in registration order. Lookup of an
unknown name is an :class:`~reweight_audit.core.errors.AuditError` that lists
the close matches ("did you mean"), as lm-evaluation-harness's registry does;
:meth:`Registry.transaction` rolls back everything registered inside it when
it fails, so a plugin that breaks half-way leaves no half of itself behind.
"""
from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

from reweight_audit.core.errors import AuditError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in messages: "method", "metric", "noise family")."""

    def __init__(self, kind: str, *, hint: str = "", known_label: str = "known"):
        self.kind = kind
        self.hint = hint  # where the user finds the names, e.g. "see `reweight-audit methods`"
        # How the list of names is introduced when there is no hint: "known methods: a, b".
        self.known_label = known_label
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` as ``name``; a name already taken is an error (never a silent replacement)."""
        if name in self._entries:
            raise AuditError(f"{self.kind} {name!r} is already registered; choose another name")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget ``name`` (unknown names are ignored: removal is how a failed registration is undone)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        """The entry named ``name``, or one line naming the close matches and where to find every name."""
        try:
            return self._entries[name]
        except KeyError:
            raise AuditError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = self.close_matches(name)
        guess = f"; did you mean {' or '.join(close)}?" if close else ""
        where = f" ({self.hint})" if self.hint else f"; {self.known_label}: {', '.join(self._entries) or '(none)'}"
        return f"unknown {self.kind} {name!r}{guess}{where}"

    def close_matches(self, name: str) -> list[str]:
        """Up to three registered names close to ``name`` (difflib ratio >= 0.6), best first."""
        return difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.6)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[list[str]]:
        """Everything added inside the block is removed again if the block raises; yields the names added."""
        before = set(self._entries)
        added: list[str] = []
        try:
            yield added
        except BaseException:
            for name in [n for n in self._entries if n not in before]:
                self.remove(name)
            raise
        finally:
            added[:] = [n for n in self._entries if n not in before]

    @contextlib.contextmanager
    def isolated(self) -> Iterator[None]:
        """Restore the entries (names, objects and order) on exit, whatever happened inside; for tests."""
        saved = dict(self._entries)
        try:
            yield
        finally:
            self._entries.clear()
            self._entries.update(saved)

    def names(self) -> list[str]:
        return list(self._entries)

    def values(self) -> list[T]:
        return list(self._entries.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __getitem__(self, name: str) -> T:
        """``registry[name]`` is :meth:`get`: an unknown name is an ``AuditError`` with "did you mean"."""
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
