"""One config per stage: the command line's options, the API's keywords and the config's fields agree."""
from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reweight_audit import api, cli
from reweight_audit.core.config import specs
from reweight_audit.core.errors import AuditError
from reweight_audit.demo import DemoConfig
from reweight_audit.evaluation.config import CompareConfig, SweepConfig
from reweight_audit.injection.config import InjectConfig
from reweight_audit.scoring.config import ScoreConfig
from reweight_audit.training.config import TrainConfig

REQUIRED = {TrainConfig: {"input": Path("in.jsonl"), "output": Path("out")}}
TRAIN_METHODS = ({"methods": ["sft"]}, {"method": "sft"})  # one of the two names a method
# command -> (config, the command's own parameters: inputs, -o, -q)
COMMANDS = {
    "inject": (InjectConfig, ("input", "output", "quiet")),
    "score": (ScoreConfig, ("input", "output", "quiet")),
    "compare": (CompareConfig, ("stats", "output", "verbose", "quiet")),
    "sweep": (SweepConfig, ("stats", "output", "quiet")),
    "train": (TrainConfig, ("input", "output", "quiet")),
    "demo": (DemoConfig, ("output", "quiet")),
}
API = {"inject": (InjectConfig, ("corpus", "output")), "score": (ScoreConfig, ("noisy", "output")),
       "compare": (CompareConfig, ("stats", "output"))}


def _same_config(config_cls: type, name: str, value) -> bool:
    """Giving an option its shown default builds the default config."""
    required = dict(REQUIRED.get(config_cls, {}))
    if config_cls is TrainConfig:
        required.update(TRAIN_METHODS[name == "methods"])
    return config_cls(**{**required, name: value}) == config_cls(**required)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_the_command_line_options_are_the_configs_fields(command):
    config_cls, own = COMMANDS[command]
    params = {n: p for n, p in inspect.signature(getattr(cli, command)).parameters.items() if n not in own}
    options = [s for s in specs(config_cls) if s.option.cli]
    assert list(params) == [s.name for s in options]
    for spec in options:
        parameter = params[spec.name]
        typer_option = typing.get_args(parameter.annotation)[1]  # Option("--flag", ...): the flag is its default
        assert typer_option.default == spec.flag and typer_option.help == spec.option.help, spec.name
        assert _same_config(config_cls, spec.name, parameter.default), spec.name


@pytest.mark.parametrize("function", list(API))
def test_the_api_keywords_are_the_configs_fields(function):
    config_cls, own = API[function]
    params = {n: p for n, p in inspect.signature(getattr(api, function)).parameters.items() if n not in own}
    assert list(params) == [s.name for s in specs(config_cls) if s.option.cli]
    for name, parameter in params.items():
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
        assert _same_config(config_cls, name, parameter.default), name


def test_the_configs_use_the_command_lines_names():
    assert "bootstrap" in CompareConfig.__dataclass_fields__ and "strata" in CompareConfig.__dataclass_fields__
    assert "n_boot" not in CompareConfig.__dataclass_fields__ and "n_strata" not in SweepConfig.__dataclass_fields__
    record = CompareConfig(bootstrap=5, methods="sft,dft").record()
    assert record["bootstrap"] == 5 and record["methods"] == ["sft", "dft"] and "heatmap_sequences" in record


@pytest.mark.parametrize("build, message", [
    (lambda: CompareConfig(k=0), "--k 0: the cut is a percentage in (0, 100], e.g. --k 10 for the top 10%"),
    (lambda: CompareConfig(bootstrap=-1), "--bootstrap -1: give 0 (no intervals) or a positive number of resamples"),
    (lambda: CompareConfig(seed="0"), "--seed '0': give a whole number"),
    (lambda: CompareConfig(rank_by="votes"), "--rank-by 'votes' is not known; use one of weight, loss, grad"),
    (lambda: CompareConfig(methods=[3]), "--methods [3]: give a comma list or a list of names or None"),
    (lambda: CompareConfig(records="r.jsonl"), "--records r.jsonl: it is read only with --by-meta FIELD"),
    (lambda: CompareConfig(batch_seqs=0), "--batch-seqs 0: give a positive number of sequences per batch"),
    (lambda: SweepConfig(k=["1,x"]), "--k 1,x: give cuts in percent, e.g. --k 1,2,5,10"),
    (lambda: SweepConfig(k=[0]), "--k 0: every cut is a percentage in (0, 100]"),
    (lambda: InjectConfig(limit=0), "--limit must be a positive number of records"),
    (lambda: InjectConfig(rate=True), "--rate True: give a number or None"),
    (lambda: ScoreConfig(chunk_rows=0), "--chunk-rows 0: give a positive number of rows"),
    (lambda: ScoreConfig(batch_tokens=2.5), "--batch-tokens 2.5: give a whole number"),
    (lambda: DemoConfig(real_errors=-1), "--real-errors -1: give 0 (no real-error part) or a number of solutions"),
    (lambda: TrainConfig(**REQUIRED[TrainConfig], methods=["sft"], every=0), "--every 0: give a positive number"),
    (lambda: TrainConfig(**REQUIRED[TrainConfig]), "train: give --method NAME or --methods a,b,c"),
    (lambda: api.compare("s.parquet", n_boot=0), "compare: no option 'n_boot'; the options are methods, k,"),
])
def test_a_bad_option_is_one_line_naming_its_flag(build, message):
    with pytest.raises(AuditError) as caught:
        build()
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value), str(caught.value)


def test_train_every_zero_is_refused_by_the_command_line_too(tmp_path):
    noisy = tmp_path / "n.jsonl"
    noisy.write_text("{}\n")
    result = CliRunner().invoke(cli.app, ["train", str(noisy), "-o", str(tmp_path / "o"), "--methods", "sft",
                                          "--every", "0"])
    assert isinstance(result.exception, AuditError) and str(result.exception).startswith("--every 0: give a positive")


def test_the_audit_callback_refuses_every_zero_as_train_does():
    from reweight_audit.training.loss import AuditCallback

    with pytest.raises(AuditError, match="every=0; give a number of steps >= 1"):
        AuditCallback("probe.jsonl", every=0)


def test_the_train_config_merges_method_and_methods():
    config = TrainConfig(**REQUIRED[TrainConfig], method="sft", methods="dft,eaft", probe_records=0)
    assert config.methods == ["sft", "dft", "eaft"] and config.probe_records is None
    with pytest.raises(AuditError, match="a method is named twice"):
        TrainConfig(**REQUIRED[TrainConfig], method="sft", methods=["sft"])
