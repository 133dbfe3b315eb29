"""inject --preset: named noise settings, what they set and what they refuse."""
from __future__ import annotations

import json

import pytest

from reweight_audit.core.errors import AuditError
from reweight_audit.injection.run import run_inject
from reweight_audit.injection.noise import DEFAULT_NOISE, PRESETS, NoiseConfig, preset_settings
from reweight_audit.injection.config import InjectConfig


def test_table1_is_filler_and_hedge_at_a_word_share():
    assert PRESETS["table1"] == {"noise": "filler,hedge", "target_frac": 0.023}
    assert preset_settings("table1", None, None, None) == ("filler,hedge", None, 0.023)
    assert preset_settings(None, None, None, None) == (DEFAULT_NOISE, None, None)
    assert preset_settings(None, "typo", 0.2, None) == ("typo", 0.2, None)


@pytest.mark.parametrize("given, named", [({"noise": "typo"}, "--noise"), ({"rate": 0.1}, "--rate"),
                                          ({"target_frac": 0.1}, "--target-frac")])
def test_a_preset_refuses_what_it_sets(given, named):
    args = {"noise": None, "rate": None, "target_frac": None, **given}
    with pytest.raises(AuditError, match=f"drop {named} or the preset"):
        preset_settings("table1", **args)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(AuditError, match="known presets: table1"):
        preset_settings("table2", None, None, None)
    with pytest.raises(AuditError, match="known presets"):
        NoiseConfig(preset="nope")


def test_inject_with_the_preset_records_it(tmp_path):
    src = tmp_path / "in.jsonl"
    words = " ".join(f"word{i}" for i in range(200))
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "", "response": words}) + "\n" for i in range(5)),
                   encoding="utf-8")
    result = run_inject(str(src), tmp_path / "out.jsonl", InjectConfig(preset="table1"))
    config = result.manifest["config"]
    assert config["preset"] == "table1" and config["mode"] == "target_frac" and config["target_frac"] == 0.023
    assert config["noise"] == {"filler": 1.0, "hedge": 1.0}
    assert set(result.manifest["spans_by_kind"]) == {"filler", "hedge"}
    # target mode: each sequence's noise-word share is within m / (2W) of 2.3% (m = 3, the longest hedge)
    assert abs(result.manifest["noise_word_frac"] - 0.023) <= 3 / (2 * 200)
