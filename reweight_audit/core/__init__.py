"""The shared ground every stage stands on: errors, files, the hub check, tables, formats, registries, models.

``errors``     AuditError, the one exception users see (one line: the file/line/field and what to do)
``io``         output paths, locks, atomic files and folders, manifests, JSON and parquet helpers
``hub``        whether the Hugging Face hub can be reached, asked once per process
``frames``     DataFrames and ``datasets`` tables as plain rows (no pandas import to recognise one)
``spans``      the record and span schema between inject and score (span kinds, checks, first-error spans)
``models``     resolving and loading models and tokenizers (the built-in GGUFs, hub ids, local paths)
``formatting`` numbers as table text
``registry``   the one registry class (methods, metrics, noise families)

May import: the standard library and third-party packages only — never a stage, ``methods`` or a face
(the import-linter contract in pyproject.toml).
"""

__version__ = "0.1.0"
