"""The Python API: the CLI's tables from in-memory calls, shared options, boundary errors, doctests, quickstart."""
from __future__ import annotations

import doctest
import inspect
import json
import pydoc
import runpy
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import reweight_audit as ra
from reweight_audit import api, cli, testing
from reweight_audit.reporting import exports
from reweight_audit.core.config import split_list
from reweight_audit.core.errors import AuditError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

CORPUS = [
    {"id": "p1", "prompt": "How many strings?", "response": "Let x be the number of strings. Then x_1 = 3 and the answer is 41."},
    {"id": "p2", "prompt": "Sum?", "response": "We compute the sum of the first 10 odd numbers: 1 + 3 + 5 + ... + 19 = 100."},
    {"id": "p3", "prompt": "Triangle?", "response": "The triangle has sides 3, 4 and 5, so it is a right triangle."},
    {"id": "p4", "prompt": "Probability?", "response": "Thus the probability is $\\frac{1}{2}$ and hence the expected value equals 7."},
    {"id": "p5", "prompt": "Convex?", "response": "The function f(x) = x^2 is convex; every quadratic with a > 0 is."},
]
INJECT_OPTIONS = {"noise": "filler,hedge,typo", "rate": 0.3, "clean_frac": 0.2, "seed": 5}  # 2 of 5 clean


@pytest.fixture()
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in CORPUS), encoding="utf-8")
    return path


def invoke(*args: str) -> None:
    result = runner.invoke(cli.app, [*args, "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)


@pytest.mark.slow
def test_cli_and_api_give_identical_files_and_tables(tmp_path, corpus_file, tiny_model):
    """The same corpus through the command line and through Python: the same records, statistics and reports."""
    cli_dir = tmp_path / "cli"
    invoke("inject", str(corpus_file), "-o", str(cli_dir / "noisy.jsonl"), "--noise", INJECT_OPTIONS["noise"],
           "--rate", "0.3", "--clean-frac", "0.2", "--seed", "5")
    invoke("score", str(cli_dir / "noisy.jsonl"), "-o", str(cli_dir / "stats.parquet"), "--model", str(tiny_model),
           "--device", "cpu")
    invoke("compare", str(cli_dir / "stats.parquet"), "-o", str(cli_dir / "report"), "--rank-by", "weight,loss",
           "--scope", "global", "--scope", "sequence", "--bootstrap", "10", "--param", "focal.gamma=3")

    noisy = ra.inject(corpus_file, **INJECT_OPTIONS)
    lines = [json.loads(line) for line in (cli_dir / "noisy.jsonl").read_text(encoding="utf-8").splitlines()]
    assert noisy.to_dict("records") == lines
    assert sum(len(s) for s in noisy["spans"]) > 0 and noisy["meta"].map(lambda m: m["clean"]).any()

    stats = ra.score(noisy, model=tiny_model, device="cpu")  # the DataFrame, not the file
    pd.testing.assert_frame_equal(stats, pq.read_table(cli_dir / "stats.parquet").to_pandas())
    assert stats.attrs["manifest"]["input"] == "noisy DataFrame"

    result = ra.compare(stats, rank_by=["weight", "loss"], scope="global,sequence", bootstrap=10,
                        params={"focal": {"gamma": 3}})
    exports.write_tables(result.result, tmp_path)  # as .save() and output= write them, without the plots
    # table.md differs only in its note on skipped methods, which names the source ("stats.parquet" or "stats")
    for name in ("table.csv", "curves.csv", "by_kind.csv"):
        assert (tmp_path / name).read_bytes() == (cli_dir / "report" / name).read_bytes(), name
    pd.testing.assert_frame_equal(result.weights, pq.read_table(cli_dir / "report" / "weights.parquet").to_pandas()
                                  .astype({"run": str, "seq_id": str}))
    assert result.table["run"].unique().tolist() == [Path(tiny_model).name]  # labelled by the manifest's model
    assert len(result.table) == 4 * result.table["method"].nunique() and len(result.skipped) == 1  # rho1


def test_inject_output_writes_the_file_and_returns_the_same_records(tmp_path, corpus_file):
    in_memory = ra.inject(corpus_file, **INJECT_OPTIONS)
    written = ra.inject(corpus_file, **INJECT_OPTIONS, output=tmp_path / "noisy.jsonl")
    pd.testing.assert_frame_equal(in_memory, written)
    assert written.attrs["manifest"]["records"] == len(CORPUS)
    assert (tmp_path / "noisy.jsonl.manifest.json").is_file()
    assert not list(tmp_path.glob("*.tmp"))


def test_inject_takes_a_dataframe_or_a_dataset_like_the_file(corpus_file):
    import datasets

    from_file = ra.inject(corpus_file, **INJECT_OPTIONS)
    frame = pd.DataFrame(CORPUS)
    pd.testing.assert_frame_equal(ra.inject(frame, **INJECT_OPTIONS), from_file)
    pd.testing.assert_frame_equal(ra.inject(datasets.Dataset.from_pandas(frame), **INJECT_OPTIONS), from_file)
    with pytest.raises(AuditError, match=r"a DatasetDict holds several splits \('train'\); pass one"):
        ra.inject(datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame)}))


def test_inject_reads_numpy_values_and_missing_cells_of_a_dataframe():
    frame = pd.DataFrame({"id": [7, 8], "prompt": ["Why?", np.nan], "response": ["Because one and one make two.", "Yes."]})
    noisy = ra.inject(frame, noise="filler", rate=0.0)
    assert noisy["id"].tolist() == ["7", "8"] and noisy["prompt"].tolist() == ["Why?", ""]
    assert noisy["response"].tolist() == frame["response"].tolist()


def test_score_output_writes_the_table_and_manifest(tmp_path, tiny_model, noisy_rows):
    noisy = pd.DataFrame(noisy_rows)
    written = ra.score(noisy, model=tiny_model, device="cpu", output=tmp_path / "stats.parquet")
    pd.testing.assert_frame_equal(written, pq.read_table(tmp_path / "stats.parquet").to_pandas())
    manifest = json.loads((tmp_path / "stats.parquet.manifest.json").read_text())
    assert written.attrs["manifest"] == manifest and manifest["input"] == "noisy DataFrame"
    assert not (tmp_path / "stats.parquet.shards").exists()


def test_rows_in_memory_are_identified_by_their_content():
    """--resume continues only the same input: the digest of rows follows their content, not the object."""
    from reweight_audit.scoring.reader import NoisyRows, input_digest

    rows = [dict(r, spans=[]) for r in CORPUS]
    assert input_digest(NoisyRows(rows)) == input_digest(NoisyRows([dict(r) for r in rows]))
    edited = [dict(r) for r in rows]
    edited[1]["response"] += " Done."
    assert input_digest(NoisyRows(edited)) != input_digest(NoisyRows(rows))


def test_score_names_a_bad_row_of_a_dataframe(tiny_model, noisy_rows):
    noisy_rows[2]["spans"] = [{"start": 0, "end": 999, "kind": "filler"}]
    with pytest.raises(AuditError, match=r"^noisy DataFrame row 2: span 0 \[0, 999\) lies outside the response"):
        ra.score(pd.DataFrame(noisy_rows), model=tiny_model, device="cpu")


def _cli_error(*args: str) -> str:
    """The one line the command line prints (after 'error: ') for these arguments."""
    result = runner.invoke(cli.app, list(args))
    assert isinstance(result.exception, AuditError), (result.output, result.exception)
    return str(result.exception)


@pytest.mark.parametrize("cli_args, call", [
    (["inject", "champ", "-o", "{tmp}/n.jsonl", "--noise", "nope"], lambda tmp: ra.inject("champ", noise="nope")),
    (["inject", "champ", "-o", "{tmp}/n.jsonl", "--rate", "1.5"], lambda tmp: ra.inject("champ", rate=1.5)),
    (["inject", "champ", "-o", "{tmp}/n.jsonl", "--limit", "0"], lambda tmp: ra.inject("champ", limit=0)),
    (["score", "{tmp}/none.jsonl", "-o", "{tmp}/s.parquet"], lambda tmp: ra.score(tmp / "none.jsonl")),
    (["score", "{tmp}/n.jsonl", "-o", "{tmp}/s.parquet", "--batch-tokens", "0"],
     lambda tmp: ra.score(tmp / "n.jsonl", batch_tokens=0)),
    (["compare", "{tmp}/s.parquet", "-o", "{tmp}/r", "--k", "0"], lambda tmp: ra.compare(tmp / "s.parquet", k=0)),
    (["compare", "{tmp}/s.parquet", "-o", "{tmp}/r", "--rank-by", "votes"],
     lambda tmp: ra.compare(tmp / "s.parquet", rank_by="votes")),
    (["compare", "{tmp}/s.parquet", "-o", "{tmp}/r", "--param", "focal.nope=1"],
     lambda tmp: ra.compare(tmp / "s.parquet", params={"focal": {"nope": 1}})),
    (["compare", "{tmp}/none.parquet", "-o", "{tmp}/r"], lambda tmp: ra.compare(tmp / "none.parquet")),
])
def test_the_api_raises_the_command_lines_one_line_errors(tmp_path, cli_args, call):
    (tmp_path / "n.jsonl").write_text(json.dumps(CORPUS[0]) + "\n")
    (tmp_path / "s.parquet").write_bytes(b"not parquet")
    message = _cli_error(*[a.format(tmp=tmp_path) for a in cli_args])
    with pytest.raises(AuditError) as caught:
        call(tmp_path)
    assert str(caught.value) == message and "\n" not in message


@pytest.mark.parametrize("call, message", [
    (lambda: ra.inject(42), "corpus: got int; give a .jsonl/.json/.csv/.parquet path, 'hf:NAME[:CONFIG]', 'champ' "
                            "or 'champ-fws', or a pandas DataFrame or a datasets.Dataset"),
    (lambda: ra.inject("champ", seed="0"), "--seed '0': give a whole number"),
    (lambda: ra.inject("champ", rate=True), "--rate True: give a number or None"),
    (lambda: ra.score(pd.DataFrame(CORPUS), batch_tokens=2.5), "--batch-tokens 2.5: give a whole number"),
    (lambda: ra.score(["a.jsonl"]), "noisy: got list; give the noisy JSONL written by inject, or the DataFrame "
                                    "inject returned"),
    (lambda: ra.score(pd.DataFrame(CORPUS), resume=True), "--resume needs output=: the finished shards of an "
                                                          "interrupted run lie beside its output"),
    (lambda: ra.compare([]), "stats: got list; give a stats.parquet path or the DataFrame score returned, or a "
                             "non-empty list of them"),
    (lambda: ra.compare([pd.DataFrame({"x": [1]})]), "stats[0]: not a reweight-audit stats table, missing column(s) "
                                                     "seq_id, pos, token, logp, is_noise"),
    (lambda: ra.compare(pd.DataFrame({"x": [1]}), methods=[3]), "--methods [3]: give a comma list or a list of names"),
])
def test_bad_arguments_are_one_line_errors_before_any_work(call, message):
    with pytest.raises(AuditError) as caught:
        call()
    assert str(caught.value).startswith(message), str(caught.value)


def _small_stats(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = 60
    logp = -rng.gamma(0.8, 1.0, size=n)
    return pd.DataFrame({"seq_id": [f"s{i // 10}" for i in range(n)], "pos": np.tile(np.arange(10), 6),
                         "token": [f"t{i}" for i in range(n)], "logp": logp, "is_noise": rng.random(n) < 0.2})


def test_compare_runs_side_by_side_and_keeps_what_save_and_plot_need(tmp_path):
    from matplotlib.figure import Figure

    from reweight_audit.reporting.exports import EXPORT_FILES

    a, b = _small_stats(0), _small_stats(1)
    result = ra.compare([a, b], methods=["sft", "nll", "dft"], k=20, bootstrap=0, output=tmp_path / "written")
    assert result.table["run"].unique().tolist() == ["stats[0]", "stats[1]"]
    weights = result.weights
    assert weights.columns.tolist() == ["run", "seq_id", "pos", "token", "is_noise", "noise_kind", "sft", "nll", "dft"]
    first = weights[weights["run"] == "stats[0]"]
    np.testing.assert_allclose(first["nll"], -a["logp"], rtol=1e-6)  # nll = −log p (stored as float32)
    np.testing.assert_allclose(first["dft"], np.exp(a["logp"]), rtol=1e-6)  # dft = p
    files = result.save(tmp_path / "report")
    # two runs: the cross-run agreement view (agreement.csv) is written beside every report file
    assert sorted(files) == sorted(EXPORT_FILES + ("agreement.csv",)) and all(p.is_file() for p in files.values())
    for name in ("table.csv", "curves.csv", "by_kind.csv", "table.md"):  # output= wrote the same report
        assert (tmp_path / "written" / name).read_bytes() == files[name].read_bytes(), name
    assert pd.read_csv(files["table.csv"])["tok_prec"].tolist() == pytest.approx(result.table["tok_prec"].tolist())
    figures = result.plot("recall_curves")
    assert list(figures) == ["recall_curves"] and isinstance(figures["recall_curves"], Figure)
    with pytest.raises(AuditError, match="plot 'heatmap' is not known"):
        result.plot(["heatmap"])
    assert "2 run(s), 3 method(s), k=20%" in repr(result)


def test_a_method_registered_in_the_session_is_compared():
    from reweight_audit.methods import isolated_registry, register

    with isolated_registry():
        @register("half-nll", family="loss", needs=("logp",), formula="w = −log p / 2", source="test")
        def half_nll(columns, *, batch=None, rng=None):
            return -columns["logp"] / 2

        result = ra.compare(_small_stats(), methods="nll,half-nll", bootstrap=0)
    rows = result.table.set_index("method")
    assert rows.loc["half-nll", "tok_prec"] == rows.loc["nll", "tok_prec"]  # the same ranking
    np.testing.assert_allclose(result.weights["half-nll"], result.weights["nll"] / 2, rtol=1e-6)


# --------------------------------------------------------------------------- the API mirrors the command line

RENAMED = {"inject": {"input": "corpus"}, "score": {"input": "noisy"}, "compare": {}}


@pytest.mark.parametrize("command", ["inject", "score", "compare"])
def test_the_api_has_the_command_lines_options_and_defaults(command):
    """Every option of the command has a keyword of the same name and default in the API, and back."""
    cli_params = dict(inspect.signature(getattr(cli, command)).parameters)
    api_params = dict(inspect.signature(getattr(api, command)).parameters)
    cli_params.pop("quiet")
    cli_params.pop("verbose", None)  # compare's printing: every table, not only the compact one
    for cli_name, api_name in RENAMED[command].items():
        assert cli_params.pop(cli_name).default is inspect.Parameter.empty
        assert api_params.pop(api_name).default is inspect.Parameter.empty
    assert cli_params.pop("output").default is inspect.Parameter.empty  # required on the command line
    assert api_params.pop("output").default is None  # optional in Python: nothing is written without it
    if command == "compare":
        assert cli_params.pop("stats").default is inspect.Parameter.empty
        assert api_params.pop("stats").default is inspect.Parameter.empty
        assert cli_params.pop("params").default == [] and api_params.pop("params").default == ()
    assert list(cli_params) == list(api_params)
    for name, parameter in cli_params.items():
        cli_default, api_default = parameter.default, api_params[name].default
        if isinstance(cli_default, list):  # a repeatable option: one value in Python
            cli_default, api_default = cli_default, split_list(api_default) if api_default else []
        assert cli_default == api_default, name


def test_the_stage_functions_share_the_defaults():
    from reweight_audit.evaluation.config import CompareConfig
    from reweight_audit.injection.config import InjectConfig
    from reweight_audit.scoring.config import ScoreConfig

    # the stages take their config; an API keyword's default is the config's default
    for function, config, skip in ((api.inject, InjectConfig, ("corpus", "output")),
                                   (api.score, ScoreConfig, ("noisy", "output")),
                                   (api.compare, CompareConfig, ("stats", "output"))):
        for name, parameter in inspect.signature(function).parameters.items():
            if name not in skip:
                assert config(**{name: parameter.default}) == config(), (function.__name__, name)
    config = CompareConfig()
    assert config.bootstrap == 200 and config.rank_by == ["weight"] and config.k == 10.0
    assert config.scope == ["global"] and config.batch_seqs == 256 and config.seed == 0


def test_help_shows_a_documented_typed_function():
    for function in (ra.inject, ra.score, ra.compare):
        signature = inspect.signature(function)
        assert signature.return_annotation is not inspect.Signature.empty
        assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
        text = pydoc.render_doc(function, renderer=pydoc.plaintext)
        for section in ("Parameters", "Returns", "Raises", "Examples"):
            assert f"{section}\n    ---" in text, (function.__name__, section)
    assert "rank_by: 'str | Sequence[str]' = 'weight'" in pydoc.render_doc(ra.compare, renderer=pydoc.plaintext)


def test_the_functions_keep_their_names_beside_the_stage_packages():
    # the stage packages (injection, scoring, evaluation) are named apart from the API's functions,
    # so importing a stage never replaces `ra.compare` and no package-level trick is needed
    import reweight_audit.evaluation.compare  # noqa: F401
    import reweight_audit.injection.run  # noqa: F401
    from reweight_audit import compare, inject

    assert compare is api.compare and inject is api.inject and ra.compare is api.compare
    assert type(ra) is types.ModuleType  # a plain module: no __class__ swap at the package root


def test_import_stays_light():
    code = "import sys, reweight_audit as ra; print(sorted(m for m in ('pandas', 'torch', 'pyarrow') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --------------------------------------------------------------------------- docstring examples and quickstart

FINDER = doctest.DocTestFinder()
DOCTESTS = [t for module in (api, testing) for t in FINDER.find(module) if t.examples]


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_examples_run(test):
    runner_ = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner_.run(test)
    assert runner_.failures == 0 and runner_.tries > 0


def test_docstring_examples_cover_every_public_function():
    names = {t.name.rsplit(".", 1)[-1] for t in DOCTESTS}
    assert {"inject", "score", "compare", "Comparison", "tiny_model_dir"} <= names


@pytest.mark.slow
def test_quickstart_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model, monkeypatch, capsys):
    """The script as `python examples/quickstart.py ...` runs it, in this process (torch is loaded already)."""
    from reweight_audit.methods import isolated_registry

    out = tmp_path / "report"
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--model", str(tiny_model), "--device", "cpu", "--limit", "3",
                                      "--output", str(out)])
    with isolated_registry():  # the script registers its method
        runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "inject: 3 responses" in printed and "sqrt-nll" in printed and "TOK PREC@10%" in printed
    table = pd.read_csv(out / "table.csv")
    assert "sqrt-nll" in set(table["method"]) and (out / "heatmap.html").is_file()
