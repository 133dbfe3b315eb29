"""Token weighting methods (``reweight_audit.methods``): the registry and the built-in families.

Job: define what a weighting method is (a pure function of per-token
statistics returning one non-negative weight per token), register the
built-ins, discover third-party ones, and evaluate any of them safely
(``compute_weights``). It may import only ``reweight_audit.core`` (the layer
below it; see the import-linter contract in pyproject.toml) and never a
stage above (injection, scoring, evaluation, ...), not even lazily.

Importing the package registers the built-in methods, one module per family:
``baseline`` (sft, random), ``prob`` (dft, inv-prob, talr), ``entropy``
(entropy, eaft), ``loss`` (nll, focal), ``rank`` (ranktuner,
ranktuner-approx, ranktuner-dft) and ``reference`` (rho1); then the
2025-2026 objectives: ``gate`` (profit), ``deformed`` (deformed-log, deft,
deft-cayley) and ``entropy_scaled`` (mile); then ``rank_math``
(ranktuner-approx-dft, RankTuner's math weight, added later); last the controls, ``control`` (position,
position-rev, rarity), trivial rankings every method should beat. Third-party
methods come from the entry-point group ``reweight_audit.methods`` or
``load_method_file``. A method's parameters and defaults are its function's
keyword-only parameters. A method that changes the loss shape declares it (``shapes.LossShape``:
focal, deformed-log, deft, deft-cayley); its weight, loss and grad views and the training loss follow
from that one definition (``compute_views``, ``shape_of``). ``methods_markdown()`` renders the table of
docs/methods.md from the registry (``python -m reweight_audit.methods --write-docs docs/methods.md``).
"""
from .registry import (
    ENTRY_POINT_GROUP,
    FAMILIES,
    Method,
    assign_batches,
    available_methods,
    compute_viewed,
    compute_views,
    compute_weights,
    get_method,
    isolated_registry,
    load_entry_points,
    load_method_file,
    missing_columns,
    parse_params,
    register,
    registered_methods,
    signature_params,
    unregister,
)

# Import order is registration order, which is the order methods are listed.
from . import baseline, prob, entropy, loss, rank, reference, gate, deformed, entropy_scaled, rank_math, control  # noqa: E402,F401  (registers built-ins)
from .catalog import methods_markdown, splice_table  # noqa: E402
from .shapes import LossShape, shape_of  # noqa: E402

__all__ = [
    "ENTRY_POINT_GROUP",
    "FAMILIES",
    "Method",
    "assign_batches",
    "available_methods",
    "compute_viewed",
    "compute_views",
    "compute_weights",
    "LossShape",
    "shape_of",
    "get_method",
    "isolated_registry",
    "load_entry_points",
    "load_method_file",
    "methods_markdown",
    "missing_columns",
    "parse_params",
    "register",
    "registered_methods",
    "signature_params",
    "splice_table",
    "unregister",
]
