"""reweight-audit: how much of a token-reweighting method's attention goes to noise.

The pipeline from Python, one call per stage of the command line::

    import reweight_audit as ra

    noisy = ra.inject("champ", seed=0)       # DataFrame: id, prompt, response, spans, ...
    stats = ra.score(noisy)                  # DataFrame: one row per token, its statistics
    result = ra.compare(stats, k=10)         # .table, .by_kind, .curves, .weights, .plot()

Weighting methods: :mod:`reweight_audit.methods` (``register``,
``available_methods``, ``compute_weights``). Errors in the input or the
options raise :class:`AuditError`, one line naming what to fix.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from reweight_audit.core import __version__

# Names re-exported here, each imported on first use so that `import reweight_audit` stays fast
# (the stages pull in pandas, pyarrow and torch). name -> module that defines it.
_EXPORTS = {
    # the stages (reweight_audit.api)
    "inject": "reweight_audit.api",
    "score": "reweight_audit.api",
    "compare": "reweight_audit.api",
    "Comparison": "reweight_audit.api",
    "AuditError": "reweight_audit.core.errors",
    # training (ReweightedLoss, AuditCallback) and sweep are re-exported here, the same way, once they exist
}
# Subpackages reachable as attributes: ra.methods.register(...)
_SUBMODULES = ("methods",)

__all__ = ["__version__", *_EXPORTS, *_SUBMODULES]

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports these
    from reweight_audit import methods
    from reweight_audit.api import Comparison, compare, inject, score
    from reweight_audit.core.errors import AuditError


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
