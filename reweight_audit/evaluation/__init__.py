"""Stage 3, evaluate: every method × every metric on one or more stats tables (``compare``, ``sweep``).

``runs`` loads and checks stats tables and defines the pool the metrics see; ``metrics`` is the metric engine (pure);
``compare`` (``run_compare``) and ``sweep`` (``run_sweep``) are the two stages; ``strata``, ``groups``,
``agreement`` and ``table1`` are compare's views; ``results`` holds what compare returns.

May import: ``reweight_audit.core`` and ``reweight_audit.methods``. It never imports ``reporting``: it returns
results, and a caller that wants files passes the report stage's writer (``run_compare(..., writer=write_exports)``).
"""
