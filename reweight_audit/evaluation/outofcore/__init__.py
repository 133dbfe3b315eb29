"""The out-of-core evaluation engine (``--engine duckdb``): compare's numbers with memory flat in the tokens.

A table is read in chunks of whole sequences (:mod:`.chunks`; whole simulated
batches for batch-dependent methods); each method's weights are computed per
chunk with the plain NumPy methods; what is local to a sequence is summed per
sequence (:mod:`.accumulate`); the ranking scores are spilled to parquet and
DuckDB counts them per distinct value, streamed highest first (:mod:`.tables`),
from which one pass gives every cut, AUROC and AP exactly (:mod:`.histogram`)
and, in the same pass, the per-sequence counts at the cuts that feed the same
bootstrap (:class:`.tables.SequenceTally`, :mod:`.engine`).
Design and limits: ``docs/scaling.md``.
"""
