"""The Python API: :func:`inject`, :func:`score` and :func:`compare`, the command line's stages as functions.

Each takes what a notebook holds (a path, a pandas DataFrame, a
``datasets.Dataset``) and returns tables in memory; a file is written only
when ``output=`` is given. The options are the stage configs' fields
(``InjectConfig``, ``ScoreConfig``, ``CompareConfig``: the command line's names and
defaults, ``--batch-tokens`` is ``batch_tokens=``), are checked by the config before any work,
and a bad one raises
:class:`~reweight_audit.core.errors.AuditError` with the command line's one-line
message. The work is done by the stage functions the command line calls
(``run_inject``, ``run_score``, ``run_compare``): same engine, same files,
same tables.
"""
from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from reweight_audit.core.config import api_options, with_signature
from reweight_audit.core.errors import AuditError
from reweight_audit.core.frames import TABLE_KINDS, check_table, is_dataframe, is_table, table_rows
from reweight_audit.evaluation.config import CompareConfig
from reweight_audit.injection.config import InjectConfig
from reweight_audit.scoring.config import ScoreConfig

if TYPE_CHECKING:
    import pandas as pd
    from datasets import Dataset
    from matplotlib.figure import Figure

    from reweight_audit.evaluation.results import CompareResult

__all__ = ["inject", "score", "compare", "Comparison"]

PathLike = Union[str, os.PathLike]
#: The columns of ``inject``'s DataFrame: the lines of the noisy JSONL (``docs/formats.md``).
NOISY_COLUMNS = ("id", "prompt", "response", "clean_response", "spans", "meta")


# --------------------------------------------------------------------------- checking at the boundary


def _check_output(output: Any) -> None:
    if output is not None and not isinstance(output, (str, os.PathLike)):
        raise AuditError(f"--output {output!r}: give a path or None")


# --------------------------------------------------------------------------- inject


def inject(corpus: PathLike | pd.DataFrame | Dataset, *, output: PathLike | None = None, **options: Any
           ) -> pd.DataFrame:
    """Inject labelled noise into the responses of a corpus (``reweight-audit inject``).

    Parameters
    ----------
    corpus
        A ``.jsonl``/``.json``/``.csv``/``.parquet`` path, ``"champ"``,
        ``"champ-fws"`` (CHAMP's model solutions with their annotated first
        wrong step), ``"hf:NAME[:CONFIG]"`` (with `split`), a pandas DataFrame
        or a ``datasets.Dataset``, with prompt and response columns (or a
        ``messages`` chat column). Spans a record brings are kept.
    noise
        Comma list of noise families, optionally weighted (``"filler:2,hedge:1"``);
        ``"all"`` for every family, ``"none"`` to pass the corpus through
        (None: ``filler,hedge,random-word,repeat,typo,digit``).
    rate
        Probability of an injection at each eligible word boundary (None: 0.1).
    target_frac
        Instead of `rate`: the share of response words to make noise.
    clean_frac
        Share of sequences left untouched (the negatives of the sequence metrics).
    seed
        Seed of every random choice; a sequence's noise depends only on
        (seed, id), not on the order or subset of the corpus.
    preset
        Named noise settings instead of `noise` and `rate`: ``"table1"``
        (filler and hedge at about 0.8% of CHAMP's tokens).
    limit
        Only the first `limit` records.
    split, prompt_field, response_field, id_field
        Which split of a Hugging Face dataset, and which fields hold the
        prompt, the response and the id (``id_field=None``: ``id`` where
        present, else a content hash; a field named here must be present).
    steps_field, first_error_field
        Read step-labelled rows (ProcessBench): the field with the list of
        steps, and the one with the index of the first wrong step (-1: none).
    after_error
        After an annotated first wrong step: ``"cut"`` (the response ends with
        it) or ``"keep"`` (the rest stays, as a span of kind ``after-error``).
    tokenizer
        Vocabulary source for the ``random-token`` family (a `model` value of :func:`score`).
    skip_bad
        Skip and count malformed JSONL lines instead of stopping.
    trust_remote_code
        Allow tokenizer code from the hub to run.
    output
        A noisy JSONL to write, with its manifest beside it; None writes nothing.

    Returns
    -------
    pandas.DataFrame
        One row per record with a non-blank response, columns ``id``,
        ``prompt``, ``response`` (with noise), ``clean_response``, ``spans``
        (list of ``{start, end, kind, text}``, character offsets into
        ``response``) and ``meta``: the lines of the noisy JSONL.

    Raises
    ------
    AuditError
        A bad option or input, in one line naming it and what to do.

    Examples
    --------
    >>> import pandas as pd
    >>> import reweight_audit as ra
    >>> corpus = pd.DataFrame({
    ...     "id": ["a", "b"],
    ...     "prompt": ["What is 2 + 3?", "Name a prime."],
    ...     "response": ["We add the two numbers and get 5, so the answer is 5.",
    ...                  "The number 7 is prime because only 1 and 7 divide it."]})
    >>> noisy = ra.inject(corpus, noise="filler", rate=0.3, seed=0)
    >>> noisy.loc[0, "response"]
    'We add the two numbers and get 5, so the er answer is uh 5.'
    >>> noisy.loc[0, "spans"]  # doctest: +NORMALIZE_WHITESPACE
    [{'start': 41, 'end': 43, 'kind': 'filler', 'text': 'er'},
     {'start': 54, 'end': 56, 'kind': 'filler', 'text': 'uh'}]
    >>> list(noisy.columns)
    ['id', 'prompt', 'response', 'clean_response', 'spans', 'meta']
    """
    import pandas as pd

    from reweight_audit.injection.run import run_inject

    source = _corpus(corpus)
    config = api_options(InjectConfig, options, "inject")
    _check_output(output)
    result = run_inject(source, output, config)
    records = result.records if output is None else _read_jsonl(Path(output))
    frame = pd.DataFrame(records, columns=list(NOISY_COLUMNS))
    if result.manifest is not None:
        frame.attrs["manifest"] = result.manifest
    return frame


def _corpus(corpus: Any) -> Any:
    """A path as text; a table as it is; anything else one line saying what is accepted."""
    check_table(corpus, "corpus")
    if is_table(corpus):
        return corpus
    if isinstance(corpus, (str, os.PathLike)):
        return os.fspath(corpus)
    raise AuditError(f"corpus: got {type(corpus).__name__}; give a .jsonl/.json/.csv/.parquet path, "
                     f"'hf:NAME[:CONFIG]', 'champ' or 'champ-fws', or {TABLE_KINDS}")


def _read_jsonl(path: Path) -> list[dict]:
    import json

    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- score


def score(noisy: PathLike | pd.DataFrame, *, output: PathLike | None = None, **options: Any) -> pd.DataFrame:
    """Per-token statistics from one forward pass of a causal LM (``reweight-audit score``).

    Parameters
    ----------
    noisy
        The noisy records: a JSONL path written by ``inject``, or the
        DataFrame :func:`inject` returned.
    model
        ``"default"`` (SmolLM2-135M-Instruct GGUF), a hub id, a local model
        directory or a ``.gguf`` file.
    device, dtype
        ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``auto`` (bf16 on
        CUDA, fp32 elsewhere), ``float32``, ``bfloat16`` or ``float16``.
    batch_tokens
        Padded tokens per forward batch.
    chunk_rows
        Rows per output-head chunk (None: from free memory).
    max_length
        Truncate sequences to this many tokens (None: the model's context).
    no_truncate
        Refuse a sequence longer than the model's context instead of
        truncating it (the manifest counts what truncation left out).
    template
        ``auto``, ``chat`` or ``plain``: how prompt and response are rendered.
    ref_model
        Reference model for Rho-1 (adds the ``ref_logp`` column).
    trust_remote_code
        Allow model code from the hub to run.
    resume
        Continue an interrupted run from its finished shards (needs `output`).
    output
        The ``stats.parquet`` to write, with its manifest beside it; None
        scores in a temporary folder and writes nothing.

    Returns
    -------
    pandas.DataFrame
        One row per scored token: ``seq_id``, ``pos``, ``token_id``,
        ``token``, ``logp``, ``entropy``, ``rank``, ``expected_rank``,
        ``topk_entropy``, ``sum_p2`` (``ref_logp``), ``is_noise``,
        ``noise_kind``: the rows of ``stats.parquet``. ``.attrs["manifest"]``
        holds the run's manifest (model, counts, timing).

    Raises
    ------
    AuditError
        A bad option, input or model, in one line naming it and what to do.

    Examples
    --------
    On a tiny random model (:func:`reweight_audit.testing.tiny_model_dir`), so nothing is downloaded:

    >>> import pandas as pd
    >>> import reweight_audit as ra
    >>> from reweight_audit.testing import tiny_model_dir
    >>> corpus = pd.DataFrame({"id": ["a"], "prompt": ["What is 2 + 3?"],
    ...                        "response": ["We add the two numbers and get 5, so the answer is 5."]})
    >>> noisy = ra.inject(corpus, noise="filler", rate=0.3, seed=0)
    >>> stats = ra.score(noisy, model=tiny_model_dir(), device="cpu")
    >>> stats.columns.tolist()  # doctest: +NORMALIZE_WHITESPACE
    ['seq_id', 'pos', 'token_id', 'token', 'logp', 'entropy', 'rank', 'expected_rank', 'topk_entropy',
     'sum_p2', 'is_noise', 'noise_kind']
    >>> stats.loc[stats["is_noise"], ["token", "noise_kind"]].to_numpy().tolist()  # the tiny vocabulary splits "uh"
    [['er', 'filler'], ['u', 'filler'], ['h', 'filler']]
    >>> bool((stats["logp"] <= 0).all() and (stats["rank"] >= 1).all())
    True
    """
    from reweight_audit.scoring.engine import run_score

    source = _noisy(noisy)
    config = api_options(ScoreConfig, options, "score")
    _check_output(output)
    if config.resume and output is None:
        raise AuditError("--resume needs output=: the finished shards of an interrupted run lie beside its output")
    if output is not None:
        return _stats_frame(run_score(source, Path(output), config, resume=config.resume))
    with tempfile.TemporaryDirectory(prefix="reweight-audit-score-") as folder:
        return _stats_frame(run_score(source, Path(folder) / "stats.parquet", config))


def _noisy(noisy: Any) -> Any:
    from reweight_audit.scoring.engine import NoisyRows

    check_table(noisy, "noisy")
    if is_table(noisy):
        return NoisyRows(list(table_rows(noisy)), name=f"noisy {type(noisy).__name__}")
    if isinstance(noisy, (str, os.PathLike)):
        return Path(noisy)
    raise AuditError(f"noisy: got {type(noisy).__name__}; give the noisy JSONL written by inject, "
                     "or the DataFrame inject returned")


def _stats_frame(result: Any) -> pd.DataFrame:
    """The stats table as a DataFrame (read before a temporary folder goes), its manifest in ``attrs``."""
    import pyarrow.parquet as pq

    frame = pq.read_table(result.output).to_pandas()
    frame.attrs["manifest"] = result.manifest
    return frame


# --------------------------------------------------------------------------- compare


def compare(stats: PathLike | pd.DataFrame | Sequence[PathLike | pd.DataFrame], *, output: PathLike | None = None,
            **options: Any) -> Comparison:
    """Every weighting method × every metric on one or more stats tables (``reweight-audit compare``).

    Parameters
    ----------
    stats
        A ``stats.parquet`` path or a DataFrame from :func:`score`, or a list
        of them (several runs side by side). A run is labelled by its model
        (from the manifest beside the file, or the DataFrame's
        ``attrs["manifest"]``), else by its file name or position.
    methods
        Method names, as a list or a comma list; None: every registered method
        whose statistics exist (the others are listed in ``skipped``).
    k
        The top-k cut in percent, in (0, 100].
    rank_by
        ``weight``, ``loss`` (w·nll) or ``grad`` (w·gradient norm); one or a list.
    scope
        ``global`` (one top-k over all tokens) or ``sequence`` (per sequence); one or a list.
    params
        Method parameters: ``{"talr": {"w_min": 0.1}}`` or ``["talr.w_min=0.1"]``.
    method_files
        Python files that register extra methods.
    batch_seqs
        Sequences per simulated training batch (TALR, DEFT-Cayley, MiLe).
    bootstrap
        Bootstrap resamples over sequences for the 95% intervals (0: none).
    seed
        Seed of the bootstrap, the random baseline and the simulated batches.
    table1_map
        The method each row of RankTuner's Table 1 stands for, as
        ``{"entropy": "eaft", "prob": "dft", "ranktuner": "ranktuner-approx-dft"}``
        or the comma list ``"entropy=eaft,prob=dft,ranktuner=ranktuner-approx-dft"``
        (None: entropy=entropy,prob=inv-prob,ranktuner=ranktuner-approx); read by the Table 1 view (``.table1``).
    by_meta
        A record meta field (e.g. ``model``): every metric also per value of
        it (``.by_group``, by_group.csv), read from the noisy JSONL the
        table was scored from. None: no per-group table.
    records
        With ``by_meta``: that noisy JSONL (None: the score manifest's input).
    stratify
        ``position``, ``length`` or ``rarity``, one or a list: every metric
        also within quantile strata of that variable, averaged with each
        stratum weighted by its noise tokens (``.strata``, strata.csv).
    strata
        Strata per ``stratify`` variable (10: deciles).
    output
        A folder to write the report into (tables, plots, heatmap, summary);
        None writes nothing (:meth:`Comparison.save` can later).

    Returns
    -------
    Comparison
        ``.table`` (the rows of table.csv), ``.by_kind``, ``.curves``,
        ``.weights``, ``.to_markdown()``, ``.save(folder)`` and ``.plot()``.

    Raises
    ------
    AuditError
        A bad option, table or method, in one line naming it and what to do.

    Examples
    --------
    Ten tokens, two of them noise, ranked by three methods at the top 20% (two tokens):

    >>> import pandas as pd
    >>> import reweight_audit as ra
    >>> stats = pd.DataFrame({
    ...     "seq_id": ["s0"] * 5 + ["s1"] * 5,
    ...     "pos": [0, 1, 2, 3, 4] * 2,
    ...     "token": ["We", " add", " um", " and", " get", "The", " answer", " is", " like", " 5"],
    ...     "logp": [-0.5, -1.0, -6.0, -0.2, -0.9, -0.4, -1.5, -0.3, -5.0, -0.8],
    ...     "is_noise": [False, False, True, False, False, False, False, False, True, False]})
    >>> result = ra.compare(stats, methods="sft,nll,dft", k=20, bootstrap=0)
    >>> result.table[["method", "tok_prec", "tok_rec", "seq_hit"]]
      method  tok_prec  tok_rec  seq_hit
    0    sft       0.2      0.2      0.2
    1    nll       1.0      1.0      1.0
    2    dft       0.0      0.0      0.0

    ``sft`` weighs every token alike, so its top set holds noise at the base
    rate (2/10) and reaches a given sequence's noise token with chance 2/10;
    ``nll`` puts its top 20% on exactly the two noise tokens, ``dft`` on two
    clean ones.
    """
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.reporting.exports import write_exports

    sources = _stats_sources(stats)
    config = api_options(CompareConfig, options, "compare")
    _check_output(output)
    result = run_compare(sources, None if output is None else Path(output), config,
                         writer=None if output is None else write_exports)
    return Comparison(result)


def _stats_sources(stats: Any) -> list[Any]:
    """Paths as paths and DataFrames as :class:`~reweight_audit.evaluation.runs.StatsTable` (named ``stats`` or ``stats[i]``)."""
    single = isinstance(stats, (str, os.PathLike)) or is_table(stats)
    items = [stats] if single else stats
    if not isinstance(items, Sequence) or not items:
        raise AuditError(f"stats: got {type(stats).__name__}; give a stats.parquet path or the DataFrame score "
                         "returned, or a non-empty list of them")
    return [_stats_source(item, "stats" if single else f"stats[{i}]") for i, item in enumerate(items)]


def _stats_source(item: Any, name: str) -> Any:
    from reweight_audit.evaluation.runs import StatsTable

    if isinstance(item, (str, os.PathLike)):
        return Path(item)
    if not is_dataframe(item):
        raise AuditError(f"{name}: got {type(item).__name__}; give a stats.parquet path or the DataFrame score "
                         "returned")
    import pyarrow as pa

    try:
        table = pa.Table.from_pandas(item, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise AuditError(f"{name}: the DataFrame cannot be read as a stats table ({first}); give one column "
                         "type per column, as score returns") from None
    # pandas' own text dtype arrives as large_string; the stats format (and so weights.parquet) has string
    schema = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_large_string(f.type) else f for f in table.schema])
    return StatsTable(table.cast(schema), name, item.attrs.get("manifest"))


def _options_signature(fn: Any, config_cls: type) -> None:
    """``help(fn)`` and editors show the config's options as keywords, between the input and ``output``."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    with_signature(fn, [p for p in own if p.name != "output"], config_cls, [p for p in own if p.name == "output"])


for _function, _config in ((inject, InjectConfig), (score, ScoreConfig), (compare, CompareConfig)):
    _options_signature(_function, _config)


# --------------------------------------------------------------------------- the result of compare


class Comparison:
    """What :func:`compare` found, as tables, Markdown, figures and a report folder.

    Metric values are fractions (0..1). ``table``, ``curves`` and ``by_kind``
    are the rows of ``table.csv``, ``curves.csv`` and ``by_kind.csv``
    (columns: ``docs/formats.md``); ``skipped`` lists the methods a run
    lacked the statistics for; ``runs`` describes each run.

    Examples
    --------
    >>> import pandas as pd
    >>> import reweight_audit as ra
    >>> stats = pd.DataFrame({"seq_id": ["s0"] * 4, "pos": [0, 1, 2, 3], "token": ["a", " b", " um", " c"],
    ...                       "logp": [-0.5, -1.0, -6.0, -0.2], "is_noise": [False, False, True, False]})
    >>> result = ra.compare(stats, methods=["nll", "dft"], k=25, bootstrap=0)
    >>> result.weights[["token", "is_noise", "nll", "dft"]].round(3)
      token  is_noise  nll    dft
    0     a     False  0.5  0.607
    1     b     False  1.0  0.368
    2    um      True  6.0  0.002
    3     c     False  0.2  0.819
    >>> print(result.to_markdown().splitlines()[0])
    # reweight-audit compare: top 25%
    >>> sorted(result.plot())
    ['expected_rank_vs_entropy', 'rank_vs_prob', 'recall_curves', 'weight_distributions']
    """

    def __init__(self, result: CompareResult):
        self.result = result
        self._weights: pd.DataFrame | None = None

    @property
    def table(self) -> pd.DataFrame:
        """One row per run × rank-by × scope × method: every metric at the cut ``k`` (table.csv)."""
        return self.result.table

    @property
    def curves(self) -> pd.DataFrame:
        """The per-cut metrics at every cut of ``docs/metrics.md`` (curves.csv)."""
        return self.result.curves

    @property
    def by_kind(self) -> pd.DataFrame:
        """Every metric per noise kind, each kind against the clean tokens (by_kind.csv)."""
        return self.result.by_kind

    @property
    def table1(self) -> pd.DataFrame | None:
        """The Table 1 view: each Table 1 row's method (``table1_map``) beside the paper's figures (table1.csv)."""
        return self.result.table1

    @property
    def by_group(self) -> pd.DataFrame | None:
        """Every metric per value of the ``by_meta`` field (by_group.csv); None without ``by_meta``."""
        return self.result.by_group

    @property
    def strata(self) -> pd.DataFrame | None:
        """Every metric within strata of each ``stratify`` variable, and their weighted mean (strata.csv); None
        without ``stratify``."""
        return self.result.strata

    @property
    def agreement(self) -> pd.DataFrame | None:
        """With several runs: each pair of methods' order per metric and run (agreement.csv)."""
        return self.result.agreement

    @property
    def skipped(self) -> list[dict]:
        """``{"run", "method", "reason"}`` for every method a run could not compute."""
        return self.result.skipped

    @property
    def runs(self) -> list[dict]:
        """Per run: label, path, model, token and sequence counts, base rate, noise kinds, manifest."""
        return self.result.runs

    @property
    def weights(self) -> pd.DataFrame:
        """Every token's weight under every method: run, seq_id, pos, token, is_noise, noise_kind, one column per
        method (weights.parquet)."""
        if self._weights is None:
            from reweight_audit.reporting.exports import weights_table

            self._weights = weights_table(self.result.run_data, self.result.run_weights).to_pandas()
            for column in ("run", "seq_id"):  # dictionary-encoded in the file; plain text here
                self._weights[column] = self._weights[column].astype(str)
        return self._weights

    def to_markdown(self) -> str:
        """table.md: the tables as Markdown, one block per run × rank-by × scope, then its sections (Controls,
        Across runs, By FIELD)."""
        from reweight_audit.reporting.exports import report_markdown

        return report_markdown(self.result)

    def save(self, folder: PathLike) -> dict[str, Path]:
        """Write the report (every file of ``reweight-audit compare -o folder``) into ``folder``; the files by name."""
        from reweight_audit.reporting.exports import write_exports

        _check_output(folder)
        config = self.result.config
        return write_exports(self.result, Path(folder), runs=self.result.run_data,
                             run_weights=self.result.run_weights, seed=config["seed"],
                             heatmap_sequences=config["heatmap_sequences"])

    def plot(self, names: str | Sequence[str] | None = None) -> dict[str, Figure]:
        """The report's plots as matplotlib figures, by name: ``recall_curves``, ``rank_vs_prob``,
        ``expected_rank_vs_entropy``, ``weight_distributions`` (all by default, or the ones named)."""
        from reweight_audit.reporting.exports import PLOTS, figures

        chosen = list(PLOTS) if names is None else [names] if isinstance(names, str) else list(names)
        unknown = [n for n in chosen if n not in PLOTS]
        if unknown:
            raise AuditError(f"plot {unknown[0]!r} is not known; use one of {', '.join(PLOTS)}")
        return figures(self.result, runs=self.result.run_data, run_weights=self.result.run_weights,
                       seed=self.result.config["seed"], names=tuple(chosen))

    def _repr_markdown_(self) -> str:  # a notebook shows the tables
        return self.to_markdown()

    def __repr__(self) -> str:
        methods = list(dict.fromkeys(self.table["method"])) if len(self.table) else []
        return (f"<Comparison: {len(self.runs)} run(s), {len(methods)} method(s), k={self.result.k:g}%; "
                f".table, .curves, .by_kind, .weights, .to_markdown(), .save(folder), .plot()>")
