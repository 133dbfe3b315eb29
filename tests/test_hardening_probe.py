"""Issue 23's probe, as tests: nothing outside the output is touched, degenerate tables are ordinary,
impossible values are refused with one line."""
from __future__ import annotations

import os
import stat

import pytest

from reweight_audit.core.errors import AuditError
from reweight_audit.evaluation.config import CompareConfig, SweepConfig
from reweight_audit.core.io import acquire_lock, atomic_directory, atomic_file, lock_path, output_lock, \
    refuse_symlink


# --------------------------------------------------------------------------- links and modes (security)


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    notes = tmp_path / "elsewhere" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    out = tmp_path / "out.jsonl"
    lock_path(out).symlink_to(notes)
    with pytest.raises(AuditError, match="lock file is a symbolic link"):
        acquire_lock(out)
    assert notes.read_text() == "mine" and lock_path(out).is_symlink()


def test_a_dangling_lock_link_creates_nothing(tmp_path):
    out = tmp_path / "out.jsonl"
    lock_path(out).symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(AuditError, match="symbolic link"):
        with output_lock(out):
            pass
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_link_swapped_in_for_a_held_lock_is_not_deleted_on_release(tmp_path):
    out = tmp_path / "out.jsonl"
    target = tmp_path / "target.txt"
    target.write_text("mine")
    lock = acquire_lock(out)
    lock.path.unlink()
    lock.path.symlink_to(target)
    lock.release()
    assert lock.path.is_symlink() and target.read_text() == "mine"


def test_refuse_symlink_names_the_link(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "keep.tmp").write_text("theirs")
    link = tmp_path / "stats.parquet.shards"
    link.symlink_to(folder)
    with pytest.raises(AuditError, match="stats.parquet.shards: the shards folder is a symbolic link"):
        refuse_symlink(link, "the shards folder")
    assert refuse_symlink(folder, "the shards folder") == folder


def test_a_planted_temporary_link_is_not_written_through(tmp_path):
    out = tmp_path / "a.json"
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    out.with_name(f"{out.name}.{os.getpid()}.tmp").symlink_to(victim)
    with atomic_file(out) as tmp:
        tmp.write_text("new")
    assert out.read_text() == "new" and victim.read_text() == "mine"


@pytest.mark.parametrize("through_link", [False, True])
def test_a_replaced_report_folder_keeps_its_mode(tmp_path, through_link):
    real = tmp_path / "private"
    real.mkdir()
    real.chmod(0o700)
    (real / "a.csv").write_text("old")
    out = real
    if through_link:
        out = tmp_path / "report"
        out.symlink_to(real)
    with atomic_directory(out) as work:
        (work / "a.csv").write_text("new")
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o700 and (real / "a.csv").read_text() == "new"
    assert not through_link or out.is_symlink()


def test_a_planted_link_at_the_work_folder_is_removed_not_followed(tmp_path):
    out = tmp_path / "report"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "x").write_text("theirs")
    out.with_name(f".{out.name}.{os.getpid()}.tmp").symlink_to(theirs)
    with atomic_directory(out) as work:
        (work / "a.csv").write_text("new")
    assert sorted(p.name for p in theirs.iterdir()) == ["x"] and (out / "a.csv").read_text() == "new"


# --------------------------------------------------------------------------- rendered text is escaped (security)

HOSTILE = "=1+2<img src=x onerror=alert(1)>$\\nosuchcommand{$"


@pytest.fixture(scope="module")
def hostile_report(tmp_path_factory):
    import numpy as np
    import pyarrow as pa

    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.reporting.exports import write_exports
    from helpers import make_stats, write_stats

    d = tmp_path_factory.mktemp("hostile")
    table = make_stats(20)
    kinds = np.array(table.column("noise_kind").to_pylist(), dtype=object)
    kinds[kinds == "typo"] = "<b>typo</b>"
    table = table.set_column(table.schema.get_field_index("noise_kind"), "noise_kind", pa.array(list(kinds)))
    stats = write_stats(d / f"{HOSTILE}.parquet", table)
    run_compare([stats], d / "out", CompareConfig(methods=["sft", "entropy", "position", "rarity"], bootstrap=0,
                                                  heatmap_sequences=2), writer=write_exports)
    return d / "out"


def test_markdown_pages_carry_no_raw_html_from_labels_or_kinds(hostile_report):
    import re

    for page in ("table.md", "table1.md"):
        text = re.sub(r"(`+).*?\1", "", (hostile_report / page).read_text())  # a code span shows HTML as text
        assert "<img" not in text and "<b>" not in text, page
    assert "&lt;img src=x onerror=alert(1)&gt;" in (hostile_report / "table.md").read_text()
    assert "&lt;b&gt;typo&lt;/b&gt;" in (hostile_report / "table.md").read_text()


def test_csv_text_cells_cannot_start_a_formula_and_numbers_are_untouched(hostile_report):
    import pandas as pd

    table = pd.read_csv(hostile_report / "table.csv")
    assert set(table["run"]) == {"'" + HOSTILE}
    assert (table["auroc"].dropna() <= 1).all()
    by_kind = pd.read_csv(hostile_report / "by_kind.csv")
    assert not by_kind.select_dtypes(["object", "string"]).map(lambda v: str(v).startswith(("=", "+", "-", "@"))).any().any()


def test_escaping_leaves_plain_text_as_it_was():
    from reweight_audit.core.escaping import csv_text, markdown_code, markdown_text, plot_text

    plain = "SmolLM2-135M-Instruct.Q4_1.gguf [a/stats] (x)"
    assert markdown_text(plain) == plain and plot_text(plain) == plain and csv_text(plain) == plain
    assert markdown_code("a/b.parquet") == "`a/b.parquet`" and markdown_code("a`b") == "`` a`b ``"
    assert csv_text(-1.5) == -1.5 and csv_text("-x") == "'-x" and csv_text("=") == "=" and markdown_text("a|b\nc") == "a\\|b c"
    assert plot_text("$x$") == r"\$x\$"


def test_by_meta_values_and_sweep_pages_are_escaped():
    import pandas as pd

    from reweight_audit.evaluation.groups import by_group_markdown

    frame = pd.DataFrame([{"group_by": "<i>f", "group": "<script>x", "run": "r", "rank_by": "weight",
                           "scope": "global", "method": "sft", "n_tokens": 1, "n_noise": 0, "n_noise_seqs": 0,
                           "n_seqs": 1}])
    text = by_group_markdown(frame, 10.0)
    assert "<script>" not in text and "<i>" not in text and "&lt;script&gt;x" in text


# --------------------------------------------------------------------------- degenerate tables are ordinary


def _variant(tmp_path, name, change):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from helpers import make_stats

    table = make_stats(8)
    column, values = change(table, table.num_rows, np)
    if column is None:
        table = values
    else:
        index = table.schema.get_field_index(column)
        table = table.set_column(index, column, values if isinstance(values, (pa.Array, pa.ChunkedArray))
                                 else pa.array(values))
    path = tmp_path / f"{name}.parquet"
    pq.write_table(table, path)
    return path


DEGENERATE = {
    "no-noise": lambda t, n, np: ("is_noise", np.zeros(n, bool)),
    "all-noise": lambda t, n, np: ("is_noise", np.ones(n, bool)),
    "one-row": lambda t, n, np: (None, t.slice(0, 1)),
    "integer-is-noise": lambda t, n, np: ("is_noise", np.asarray(t.column("is_noise")).astype(np.int64)),
    "integer-tokens": lambda t, n, np: ("token", np.arange(n)),
}


@pytest.mark.parametrize("name", sorted(DEGENERATE))
def test_a_degenerate_table_gives_a_whole_report(tmp_path, name):
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.reporting.exports import report_markdown, write_exports

    path = _variant(tmp_path, name, DEGENERATE[name])
    result = run_compare([path], tmp_path / "out", CompareConfig(
        bootstrap=0, heatmap_sequences=2, methods=["sft", "entropy", "position", "rarity"], stratify=["position"]),
        writer=write_exports)
    text = report_markdown(result)
    assert "## Controls" in text and (tmp_path / "out" / "heatmap.html").exists()
    if name in ("no-noise", "all-noise", "one-row"):
        assert "n/a" in text  # AUROC is undefined with one class


def test_more_strata_than_tokens_is_ordinary(tmp_path):
    from reweight_audit.evaluation.compare import run_compare
    from reweight_audit.reporting.exports import write_exports

    path = _variant(tmp_path, "t", lambda t, n, np: (None, t))
    run_compare([path], tmp_path / "out", CompareConfig(
        bootstrap=0, heatmap_sequences=1, methods=["sft", "entropy", "position", "rarity"], stratify=["position"],
        strata=100000), writer=write_exports)
    assert (tmp_path / "out" / "strata.csv").exists()


# --------------------------------------------------------------------------- impossible values are refused


IMPOSSIBLE = {
    "negative entropy": (lambda t, n, np: ("entropy", np.full(n, -0.5, np.float32)), "column entropy", "below 0"),
    "rank 0": (lambda t, n, np: ("rank", np.zeros(n, np.int64)), "column rank", "below 1"),
    "negative rank": (lambda t, n, np: ("rank", np.full(n, -3, np.int64)), "column rank", "below 1"),
    "fractional rank": (lambda t, n, np: ("rank", np.full(n, 1.5)), "column rank", "fractional"),
    "negative expected rank": (lambda t, n, np: ("expected_rank", np.full(n, -2.0)), "column expected_rank",
                               "below 1"),
    "infinite expected rank": (lambda t, n, np: ("expected_rank", np.where(np.arange(n) == 3, np.inf, 2.0)),
                               "column expected_rank", "infinite, first at row 3"),
    "null is_noise": (lambda t, n, np: ("is_noise", [None] + [False] * (n - 1)), "column is_noise",
                      "null value(s), first at row 0"),
    "is_noise 2": (lambda t, n, np: ("is_noise", np.full(n, 2)), "column is_noise", "other than 0 and 1"),
    "string entropy": (lambda t, n, np: ("entropy", ["0.5"] * n), "column entropy has type string", "numbers"),
}


@pytest.mark.parametrize("name", sorted(IMPOSSIBLE))
def test_an_impossible_value_is_one_line_naming_file_column_and_row(tmp_path, name, recwarn):
    from reweight_audit.evaluation.runs import load_run

    change, *needles = IMPOSSIBLE[name]
    path = _variant(tmp_path, name.replace(" ", "-"), change)
    with pytest.raises(AuditError) as refused:
        load_run(path)
    message = str(refused.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert all(n in message for n in needles), message
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_float32_entropy_a_hair_below_zero_is_accepted(tmp_path):
    from reweight_audit.evaluation.runs import load_run

    path = _variant(tmp_path, "hair", lambda t, n, np: ("entropy", np.full(n, -1e-7, np.float32)))
    load_run(path)


# --------------------------------------------------------------------------- corpora


def _one_record(tmp_path, row):
    import json

    from reweight_audit.injection.corpus import FieldMap, iter_records

    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps(row) + "\n")
    return list(iter_records(str(src), FieldMap()))


def test_chat_content_parts_are_flattened_as_the_templates_do(tmp_path):
    row = {"id": "a", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "text", "text": "4."}]}]}
    (record,) = _one_record(tmp_path, row)
    assert record.prompt == "What is 2+2?" and record.response == "It is 4."


def test_a_non_text_content_part_is_refused_by_its_type(tmp_path):
    row = {"id": "a", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "ok"}]}
    with pytest.raises(AuditError, match="chat.jsonl.*'image_url' is not text"):
        _one_record(tmp_path, row)


def test_a_non_text_prompt_is_reported_as_the_prompt(tmp_path):
    with pytest.raises(AuditError, match="field 'prompt' must be text, got int"):
        _one_record(tmp_path, {"id": "a", "prompt": 5, "response": "text"})


def test_numpy_warnings_do_not_print_before_the_error_line(tmp_path):
    import subprocess
    import sys

    import numpy as np

    path = _variant(tmp_path, "huge", lambda t, n, np_: ("logp", np.full(n, -1e30, np.float32)))
    res = subprocess.run([sys.executable, "-m", "reweight_audit", "compare", str(path), "-o", str(tmp_path / "o"),
                          "--bootstrap", "0", "--methods", "sft,ranktuner-approx", "-q"], capture_output=True,
                         text=True)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "infinite weights" in lines[0], lines[0]


def test_score_refuses_a_symlinked_shards_folder_and_deletes_nothing_there(tmp_path, tiny_model, noisy_rows):
    from helpers import write_noisy
    from reweight_audit.scoring.config import ScoreConfig
    from reweight_audit.scoring.engine import run_score

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "draft.tmp").write_text("mine")
    out = tmp_path / "stats.parquet"
    (tmp_path / "stats.parquet.shards").symlink_to(theirs)
    noisy = write_noisy(tmp_path / "noisy.jsonl", noisy_rows)
    with pytest.raises(AuditError, match="the shards folder is a symbolic link"):
        run_score(noisy, out, ScoreConfig(model=str(tiny_model), device="cpu", batch_tokens=40))
    assert sorted(p.name for p in theirs.iterdir()) == ["draft.tmp"] and not out.exists()


@pytest.mark.parametrize("line, needle", [
    ('{"id": ' + "9" * 5000 + ', "prompt": "p", "response": "r"}', "unreadable JSON"),
    ("[" * 100_000 + "]" * 100_000, "nested too deep"),
    ('{"id": "a\\ud800", "prompt": "p", "response": "r"}', "lone surrogate"),
])
def test_an_unreadable_record_is_one_line_naming_file_and_line(tmp_path, line, needle):
    from reweight_audit.injection.corpus import FieldMap, iter_records

    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": "ok", "prompt": "p", "response": "fine"}\n' + line + "\n")
    with pytest.raises(AuditError, match=f"bad.jsonl:2: .*{needle}"):
        list(iter_records(str(src), FieldMap()))


def test_a_long_csv_cell_is_read_and_a_json_object_without_records_is_named(tmp_path):
    from reweight_audit.injection.corpus import FieldMap, iter_records

    src = tmp_path / "long.csv"
    src.write_text("id,prompt,response\na,p," + "word " * 40_000 + "\n")
    (record,) = list(iter_records(str(src), FieldMap()))
    assert len(record.response) == 200_000
    obj = tmp_path / "obj.json"
    obj.write_text('{"name": "not records", "count": 3}')
    with pytest.raises(AuditError, match="not of records"):
        list(iter_records(str(obj), FieldMap()))


def test_sweep_pages_escape_a_hostile_label(tmp_path):
    import re

    from reweight_audit.evaluation.sweep import run_sweep
    from reweight_audit.reporting.sweep_report import write_sweep
    from helpers import make_stats, write_stats

    stats = write_stats(tmp_path / f"{HOSTILE}.parquet", make_stats(12))
    run_sweep([stats], tmp_path / "sw", SweepConfig(bootstrap=0, methods=["sft", "entropy", "position"]),
              writer=write_sweep)
    text = re.sub(r"(`+).*?\1", "", (tmp_path / "sw" / "robustness.md").read_text())
    assert "<img" not in text and "&lt;img" in text
    assert "'" + HOSTILE in (tmp_path / "sw" / "sweep.csv").read_text()
