"""io: output paths, atomic files and folders, manifests, JSON."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from reweight_audit import __version__
from reweight_audit.core.errors import AuditError
from reweight_audit.core.io import (
    atomic_directory,
    atomic_file,
    atomic_files,
    dump_json,
    json_safe,
    manifest_header,
    manifest_path,
    prepare_output_dir,
    prepare_output_file,
    read_manifest,
    write_json_atomic,
)


class Boom(Exception):
    pass


def test_manifest_path_sits_beside_the_file(tmp_path):
    assert manifest_path(tmp_path / "stats.parquet") == tmp_path / "stats.parquet.manifest.json"
    assert manifest_path("a/noisy.jsonl").name == "noisy.jsonl.manifest.json"


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise Boom
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing changes before the block ends
    assert target.read_text() == "new" and list(tmp_path.iterdir()) == [target]


def test_atomic_files_drop_a_stale_manifest_before_the_data_moves(tmp_path):
    data, man = tmp_path / "d.jsonl", tmp_path / "d.jsonl.manifest.json"
    data.write_text("old data")
    man.write_text("old manifest")
    with pytest.raises(Boom):
        with atomic_files(data, man) as (tmp, man_tmp):
            tmp.write_text("new data")
            man_tmp.write_text("new manifest")
            raise Boom
    assert (data.read_text(), man.read_text()) == ("old data", "old manifest")
    with atomic_files(data, man) as (tmp, man_tmp):
        tmp.write_text("new data")
        man_tmp.write_text("new manifest")
    assert (data.read_text(), man.read_text()) == ("new data", "new manifest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "d.jsonl.manifest.json"]


def test_atomic_directory_keeps_the_old_files_when_a_write_fails(tmp_path):
    out = tmp_path / "report"
    with atomic_directory(out) as tmp:
        (tmp / "a.csv").write_text("1")
        (tmp / "b.csv").write_text("1")
        assert not out.exists()  # a new folder appears whole, at the end
    (out / "input.jsonl").write_text("mine")
    with pytest.raises(Boom):
        with atomic_directory(out) as tmp:
            (tmp / "a.csv").write_text("2")
            raise Boom
    assert (out / "a.csv").read_text() == "1"
    with atomic_directory(out) as tmp:
        (tmp / "a.csv").write_text("3")
    assert (out / "a.csv").read_text() == "3" and (out / "b.csv").read_text() == "1"
    assert (out / "input.jsonl").read_text() == "mine"  # files the run did not write stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left


def test_output_paths_are_checked_before_any_work(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    with pytest.raises(AuditError, match="overwrite the input"):
        prepare_output_file(src, source=src)
    with pytest.raises(AuditError, match="is a directory"):
        prepare_output_file(tmp_path)
    assert prepare_output_file(tmp_path / "new" / "o.jsonl", source=src).parent.is_dir()
    assert not (tmp_path / "later").exists() and prepare_output_file(tmp_path / "later" / "o", create=False)
    with pytest.raises(AuditError, match="not a folder"):
        prepare_output_dir(src)
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(AuditError, match="cannot create the output folder"):
        prepare_output_file(blocked / "sub" / "o.jsonl")


def test_json_is_strict_and_plain():
    value = {"a": float("nan"), "b": np.float32(0.5), "c": (np.int64(3), np.bool_(True)), 4: math.inf}
    assert json_safe(value) == {"a": None, "b": 0.5, "c": [3, True], "4": None}
    text = dump_json({"x": "·", "y": [1.0]})
    assert text.endswith("\n") and "·" in text and json.loads(text) == {"x": "·", "y": [1.0]}
    assert "\\u00b7" in dump_json({"x": "·"}, ensure_ascii=True)


def test_manifests_read_back_and_share_one_header(tmp_path):
    data = tmp_path / "stats.parquet"
    assert read_manifest(data) is None
    header = manifest_header("score", input=tmp_path / "noisy.jsonl", input_digest="sha256:0", output=data)
    assert list(header) == ["tool", "version", "stage", "input", "input_digest", "output"]
    assert header["version"] == __version__ and header["output"] == "stats.parquet"
    write_json_atomic(manifest_path(data), header)
    assert read_manifest(data) == header
    manifest_path(data).write_text("{oops")
    with pytest.raises(AuditError, match="not valid JSON"):
        read_manifest(data)
