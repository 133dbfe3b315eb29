"""Stage 1, inject: labelled noise into the responses of a corpus (``reweight-audit inject``, ``ra.inject``).

``corpus`` reads every input source as one stream of records, ``noise`` holds the noise families, the protected
regions and the per-sequence RNG (pure), ``run`` is the I/O edge around them (``run_inject``).

May import: ``reweight_audit.core`` only. Its output, the noisy JSONL and its manifest, is the contract with the
score stage (the schema lives in ``core.spans``), so the two stages never import each other.
"""
