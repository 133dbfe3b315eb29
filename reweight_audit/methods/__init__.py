"""Token weighting methods (``reweight_audit.methods``).

Importing the package registers the built-in methods, one module per family:
``baseline`` (sft, random), ``prob`` (dft, inv-prob, talr), ``entropy``
(entropy, eaft), ``loss`` (nll, focal), ``rank`` (ranktuner,
ranktuner-approx, ranktuner-dft) and ``reference`` (rho1); then the
2025-2026 objectives: ``gate`` (profit), ``deformed`` (deformed-log, deft,
deft-cayley) and ``entropy_scaled`` (mile); last the controls, ``control`` (position,
position-rev, rarity), trivial rankings every method should beat. Third-party
methods come from the entry-point group ``reweight_audit.methods`` or
``load_method_file``.
"""
from .registry import (
    ENTRY_POINT_GROUP,
    FAMILIES,
    Method,
    assign_batches,
    available_methods,
    compute_weights,
    get_method,
    isolated_registry,
    load_entry_points,
    load_method_file,
    missing_columns,
    parse_params,
    register,
    unregister,
)

# Import order is registration order, which is the order methods are listed.
from . import baseline, prob, entropy, loss, rank, reference, gate, deformed, entropy_scaled, control  # noqa: E402,F401  (registers built-ins)

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "Method",
    "assign_batches",
    "available_methods",
    "compute_weights",
    "get_method",
    "isolated_registry",
    "load_entry_points",
    "load_method_file",
    "missing_columns",
    "parse_params",
    "register",
    "unregister",
]
