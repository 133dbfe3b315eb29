"""The options of the stages, defined once: their defaults and how a list option is spelled.

The command line (:mod:`reweight_audit.cli`), the Python API
(:mod:`reweight_audit.api`) and the stage functions (``run_inject``,
``run_score``, ``run_compare``) all take their defaults from here. An
option's Python keyword is its command-line name with ``_`` for ``-``
(``--batch-tokens`` is ``batch_tokens=``); a repeatable option is plural in
Python (``--param`` is ``params=``, ``--method-file`` is ``method_files=``).
``sweep`` and ``demo`` take theirs from here too.
``tests/test_api.py`` checks that the command line and the API agree on both.
"""
from __future__ import annotations

from collections.abc import Iterable

# ---------------------------------------------------------------- shared
SEED = 0
TRUST_REMOTE_CODE = False
LIMIT = None  # every record

# ---------------------------------------------------------------- inject
NOISE = None  # None: noise.DEFAULT_NOISE, unless a preset sets it
RATE = None  # None: noise.DEFAULT_RATE per eligible word boundary, unless target_frac or a preset sets it
TARGET_FRAC = None
CLEAN_FRAC = 0.0
PRESET = None
SPLIT = "train"
PROMPT_FIELD = "prompt"
RESPONSE_FIELD = "response"
ID_FIELD = None  # None: "id" where present, else a content hash; a named field must be present
STEPS_FIELD = None  # None: not step-labelled rows
FIRST_ERROR_FIELD = "label"
AFTER_ERROR = "cut"
TOKENIZER = "default"
SKIP_BAD = False

# ---------------------------------------------------------------- score
MODEL = "default"
DEVICE = "auto"
DTYPE = "auto"
BATCH_TOKENS = 2048
CHUNK_ROWS = None  # None: from free memory
MAX_LENGTH = None  # None: no truncation
TEMPLATE = "auto"
REF_MODEL = None
RESUME = False

# ---------------------------------------------------------------- compare
METHODS = None  # None: every registered method whose statistics exist
K = 10.0  # percent
RANK_BY = "weight"
SCOPE = "global"
BATCH_SEQS = 256
BOOTSTRAP = 200
TABLE1_MAP = None  # None: table1.DEFAULT_MAP (entropy=eaft,prob=dft,ranktuner=ranktuner-approx)
BY_META = None  # None: no per-group table (by_group.csv)
RECORDS = None  # None: the score manifest's input (read only with by_meta)
STRATIFY = ()  # no strata.csv; any of position, length, rarity
STRATA = 10  # deciles

# ---------------------------------------------------------------- sweep (methods, params, method files, batch
# seqs and seed as for compare)
SWEEP_K = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0)  # percent: Table 1's 10% and the range around it
SWEEP_RANK_BY = ("weight", "loss", "grad")
SWEEP_SCOPE = ("global", "sequence")
SWEEP_METRIC = "tok_rec"
SWEEP_BOOTSTRAP = 100  # enough for a 95% interval's ends to settle to about a point
CLAIM = None
SWEEP_STRATIFY = ("none",)  # the pooled metric only; add position, length or rarity for stratified settings

# ---------------------------------------------------------------- demo (limit, model and device as above)
REAL_ERRORS = 80  # champ-fws solutions in the real-error part; 0 skips it


def split_list(values: str | Iterable[str] | None) -> list[str]:
    """Repeated and comma-separated values as one list: ``["a,b", "c"]`` (``-x a,b -x c``) → ``[a, b, c]``.

    One string is one value list: ``"a, b"`` → ``[a, b]``.
    """
    if isinstance(values, str):
        values = [values]
    return [item.strip() for value in values or [] for item in str(value).split(",") if item.strip()]
