"""The generic Registry (core/registry.py) and its users: methods (defaults from signatures, the docs table) and noise families."""
from __future__ import annotations

import importlib.metadata
import inspect
import textwrap
from pathlib import Path

import numpy as np
import pytest

import reweight_audit.methods as M
from reweight_audit.core.errors import AuditError
from reweight_audit.core.registry import Registry
from reweight_audit.injection import noise
from reweight_audit.methods import catalog, registry
from reweight_audit.methods.__main__ import main as methods_main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "methods.md"


@pytest.fixture(autouse=True)
def _isolated():
    with M.isolated_registry():
        yield


# ---------------------------------------------------------------- Registry


def test_registry_add_get_order_and_duplicates():
    r: Registry[int] = Registry("widget")
    r.add("alpha", 1)
    r.add("beta", 2)
    assert r.get("alpha") == 1 and r["beta"] == 2
    assert r.names() == ["alpha", "beta"] and r.values() == [1, 2] and r.items() == [("alpha", 1), ("beta", 2)]
    assert "alpha" in r and "gamma" not in r and len(r) == 2 and list(r) == ["alpha", "beta"]
    with pytest.raises(AuditError, match="widget 'alpha' is already registered"):
        r.add("alpha", 3)
    assert r.get("alpha") == 1  # never silently replaced


def test_registry_unknown_name_did_you_mean():
    r: Registry[int] = Registry("widget", known_label="known widgets")
    for i, name in enumerate(["focal", "nll", "entropy"]):
        r.add(name, i)
    with pytest.raises(AuditError, match=r"^unknown widget 'focl'; did you mean focal\?; known widgets: focal, nll, entropy$"):
        r.get("focl")
    with pytest.raises(AuditError, match=r"^unknown widget 'zzz'; known widgets: focal, nll, entropy$"):
        r["zzz"]
    hinted: Registry[int] = Registry("widget", hint="see `widgets --list`")
    hinted.add("focal", 0)
    assert hinted.unknown_message("focl") == "unknown widget 'focl'; did you mean focal? (see `widgets --list`)"
    assert Registry("widget").unknown_message("x") == "unknown widget 'x'; known: (none)"


def test_registry_transaction_rolls_back_a_failed_block():
    r: Registry[int] = Registry("widget")
    r.add("kept", 0)
    with pytest.raises(RuntimeError):
        with r.transaction():
            r.add("half", 1)
            raise RuntimeError("plugin broke half-way")
    assert r.names() == ["kept"]
    with r.transaction() as added:
        r.add("new", 2)
    assert added == ["new"] and r.names() == ["kept", "new"]


def test_registry_isolated_restores_entries_and_order():
    r: Registry[int] = Registry("widget")
    r.add("a", 1)
    r.add("b", 2)
    with r.isolated():
        r.remove("a")
        r.add("c", 3)
    assert r.items() == [("a", 1), ("b", 2)]
    r.remove("nope")  # unknown names are ignored


# ------------------------------------------------- methods: defaults from the signature

# name -> params of every built-in, as the code declared them (params={...}) before the
# defaults moved into the function signatures. Values and types must not change; issue 22 added
# parameters (talr.tau, focal.detach, ranktuner*.base, rho1.select/k_pct, deft.eps,
# deft-cayley.micro_batch_seqs) and ranktuner-approx-dft, each default the old behaviour.
BUILTIN_PARAMS = {
    "sft": {},
    "random": {},
    "dft": {},
    "inv-prob": {},
    "talr": {"w_min": 0.01, "tau_min": 1e-6, "tau": "per-token"},
    "entropy": {},
    "eaft": {"alpha": 1.0},
    "nll": {},
    "focal": {"gamma": 2.0, "detach": False},
    "ranktuner": {"base": "1"},
    "ranktuner-approx": {"low_entropy": "smooth", "base": "1"},
    "ranktuner-approx-dft": {"low_entropy": "smooth"},
    "ranktuner-dft": {},
    "rho1": {"select": "top-k", "k_pct": 60.0},
    "profit": {"tau": 0.1},
    "deformed-log": {"alpha": 10.0},
    "deft": {"eps": 1e-6},
    "deft-cayley": {"micro_batch_seqs": 4},
    "mile": {"gamma": 1.0},
    "position": {},
    "position-rev": {},
    "rarity": {},
}


def test_builtin_params_unchanged():
    got = {m.name: m.params for m in M.registered_methods()}
    assert got == BUILTIN_PARAMS
    for name, params in BUILTIN_PARAMS.items():
        got_params = M.get_method(name).params
        assert list(got_params) == list(params)  # same order (the listing's order)
        assert {k: type(v) for k, v in got_params.items()} == {k: type(v) for k, v in params.items()}


def test_builtin_params_come_from_the_signature():
    for m in M.registered_methods():
        assert m.params == M.signature_params(m.name, m.fn)
        assert "params=" not in inspect.getsource(inspect.getmodule(m.fn)), m.fn.__module__


def test_third_party_params_from_signature():
    @M.register("scaled", family="loss", needs=("logp",), formula="w = k·|log p|", source="test")
    def scaled(columns, *, batch=None, rng=None, k: float = 2.0, mode: str = "abs"):
        return k * np.abs(columns["logp"])

    m = M.get_method("scaled")
    assert m.params == {"k": 2.0, "mode": "abs"}
    cols = {"logp": np.array([-1.0, -2.0])}
    np.testing.assert_array_equal(M.compute_weights(m, cols), [2.0, 4.0])
    np.testing.assert_array_equal(M.compute_weights(m, cols, params={"k": 3.0}), [3.0, 6.0])
    assert M.parse_params(["scaled.k=5"]) == {"scaled": {"k": 5.0}}
    with pytest.raises(AuditError, match="method 'scaled' has no parameter 'gamma'.*k, mode"):
        M.compute_weights(m, cols, params={"gamma": 1.0})


def test_keyword_parameter_without_default_is_refused():
    with pytest.raises(AuditError, match="method 'nodefault': keyword-only parameter 'k' needs a default"):

        @M.register("nodefault", family="loss", needs=(), formula="", source="")
        def nodefault(columns, *, batch=None, rng=None, k):
            return columns
    assert "nodefault" not in [m.name for m in M.registered_methods()]


def test_params_argument_still_accepted_for_old_plugins():
    @M.register("legacy", family="loss", needs=(), params={"k": 1}, formula="", source="")
    def legacy(columns, *, batch=None, rng=None, **params):
        return np.full(len(columns["logp"]), float(params["k"]))

    assert M.get_method("legacy").params == {"k": 1}
    np.testing.assert_array_equal(M.compute_weights(M.get_method("legacy"), {"logp": np.zeros(2)}), [1.0, 1.0])


def test_unknown_method_did_you_mean():
    with pytest.raises(AuditError, match=r"unknown method 'focl'; did you mean focal\?; known methods: sft, random"):
        M.get_method("focl")
    with pytest.raises(AuditError, match=r"unknown method 'ranktuner-aprox'; did you mean ranktuner-approx "):
        M.parse_params(["ranktuner-aprox.low_entropy=smooth"])


# ------------------------------------------------- methods: failed plugins roll back

TWO_THEN_FAIL = """
import numpy as np
from reweight_audit.methods import register

@register("first-half", family="loss", needs=(), formula="", source="")
def a(columns, *, batch=None, rng=None):
    return np.ones(1)

@register("second-half", family="loss", needs=(), formula="", source="")
def b(columns, *, batch=None, rng=None, k: float = 1.0):
    return np.ones(1)

raise RuntimeError("broke after two")
"""


def test_method_file_failing_half_way_is_rolled_back(tmp_path):
    path = tmp_path / "two.py"
    path.write_text(TWO_THEN_FAIL)
    before = [m.name for m in M.registered_methods()]
    with pytest.raises(AuditError, match="method file '.*two.py': RuntimeError: broke after two"):
        M.load_method_file(path)
    assert [m.name for m in M.registered_methods()] == before


def test_entry_point_failing_half_way_is_rolled_back(tmp_path, monkeypatch):
    (tmp_path / "rwa_two_then_fail.py").write_text("def setup():\n" + textwrap.indent(TWO_THEN_FAIL, "    "))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint(name="two", value="rwa_two_then_fail:setup", group=M.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "entry_points", lambda *, group: [ep] if group == M.ENTRY_POINT_GROUP else [])
    before = [m.name for m in M.registered_methods()]
    with pytest.raises(AuditError, match="entry point 'two' .* failed to load: RuntimeError: broke after two"):
        M.load_entry_points()
    assert [m.name for m in M.registered_methods()] == before


# ---------------------------------------------------------- the docs' table


def test_docs_methods_table_is_generated_from_the_registry():
    documented = catalog.documented_table(DOCS.read_text(encoding="utf-8"))
    generated = M.methods_markdown()
    assert documented == generated, (
        "docs/methods.md's methods table differs from the registry; regenerate it with: "
        f"{catalog.REGENERATE}"
    )


def test_docs_name_every_builtin_and_family():
    text = DOCS.read_text(encoding="utf-8")
    table = catalog.documented_table(text)
    for m in M.registered_methods():
        assert f"| `{m.name}` | {m.family} |" in table
    assert len(M.registered_methods()) == 22
    assert set(M.FAMILIES) == {m.family for m in M.registered_methods()} and len(M.FAMILIES) == 7
    for family in M.FAMILIES:
        assert f"`{family}`" in text  # the "Families:" sentence of the prose


def test_markdown_groups_by_family_and_lists_a_new_method():
    @M.register("extra-prob", family="prob", needs=("logp",), formula="w = x | y", source="test")
    def extra(columns, *, batch=None, rng=None, k: int = 3):
        return np.ones(len(columns["logp"]))

    lines = M.methods_markdown().splitlines()
    rows = [line for line in lines if line.startswith("| `")]
    families = [row.split(" | ")[1] for row in rows]
    assert families == sorted(families, key=families.index)  # each family in one block
    assert "| `extra-prob` | prob | w = x \\| y | logp | k=3 | test |" in rows
    assert rows.index("| `extra-prob` | prob | w = x \\| y | logp | k=3 | test |") < families.index("entropy")


def test_methods_main_markdown_and_write_docs(tmp_path, capsys):
    assert methods_main(["--markdown"]) == 0
    assert capsys.readouterr().out == M.methods_markdown()
    stale = tmp_path / "methods.md"
    stale.write_text(f"intro\n{catalog.TABLE_START}\n| old |\n{catalog.TABLE_END}\noutro\n", encoding="utf-8")
    assert methods_main(["--write-docs", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == f"intro\n{catalog.TABLE_START}\n{M.methods_markdown()}{catalog.TABLE_END}\noutro\n"
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("no table here\n")
    assert methods_main(["--write-docs", str(no_markers)]) == 2
    assert "no generated methods table" in capsys.readouterr().err


# ------------------------------------------------------------- noise families


def test_noise_families_registry():
    assert isinstance(noise.FAMILIES, Registry)
    assert noise.known_kinds() == ["filler", "hedge", "random-word", "random-token", "repeat", "typo", "digit"]
    assert noise.get_family("typo").mode == "replace"
    assert not hasattr(noise, "describe_families")
    with pytest.raises(AuditError, match="noise kind 'filler' is already registered"):
        noise.register("filler", mode="insert", summary="", applies=lambda slots, k: True)(lambda *a: None)


def test_unknown_noise_kind_did_you_mean():
    with pytest.raises(AuditError, match=r"^--noise 'fillr,hedge': unknown noise kind 'fillr'; did you mean filler\?; known kinds: filler, hedge"):
        noise.parse_noise_spec("fillr,hedge")
    with pytest.raises(AuditError, match=r"^x: unknown noise kind 'typoo'; did you mean typo\?"):
        noise.check_noise_weights({"typoo": 1.0}, where="x")
