"""The trainer's command lines: flags built from the settings dataclasses, each with an environment fallback."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from chronorec.trainer import cli, evaluate
from chronorec.trainer.cli import ExportBaseSettings
from chronorec.trainer.flags import add_settings_flags, env_name, setting, settings_from_args
from chronorec.trainer.pipeline import RunJob, RunSettings

TRAIN_VARIABLES = "CHRONOREC_TRAIN_"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No fallback from the machine running the tests leaks into the parsers."""
    import os

    for name in list(os.environ):
        if name.startswith(TRAIN_VARIABLES) or name.startswith("CHRONOREC_EVAL_"):
            monkeypatch.delenv(name)


def subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


def run_settings(argv: list[str]) -> tuple[RunJob, RunSettings]:
    args = cli.build_parser().parse_args(["run", *argv])
    return settings_from_args(RunJob, args), settings_from_args(RunSettings, args)


def test_every_run_setting_is_a_flag_with_its_help_and_its_variable():
    help_text = " ".join(subparser("run").format_help().split())
    for spec in dataclasses.fields(RunSettings) + dataclasses.fields(RunJob):
        flag = "--" + spec.name.replace("_", "-")
        assert flag in help_text, flag
        assert f"CHRONOREC_TRAIN_{spec.name.upper()}" in help_text, spec.name
        assert " ".join(spec.metadata["help"].split()) in help_text, spec.name
    # The flag the server's settings made redundant is gone: the prepare step reads them from the repository.
    assert "--prepare-int8" not in help_text


def test_without_flags_a_run_has_exactly_the_dataclass_defaults():
    job, settings = run_settings(["--db", "events.db", "--models", "models"])
    assert settings == RunSettings()
    assert job == RunJob(db="events.db", models="models")


def test_flags_set_the_settings_and_booleans_have_both_forms():
    _, settings = run_settings(["--db", "d", "--models", "m", "--steps", "100", "--train-layers", "2",
                                "--lr", "2e-4", "--no-prepare", "--whole-window", "--no-tune", "--no-progress",
                                "--train-days", "3.5", "--int8"])
    assert settings == RunSettings(steps=100, train_layers=2, lr=2e-4, prepare=False, whole_window=True, tune=False,
                                   progress=False, train_days=3.5, int8=True)


def test_every_flag_falls_back_to_its_environment_variable(monkeypatch):
    monkeypatch.setenv("CHRONOREC_TRAIN_DB", "from-env.db")
    monkeypatch.setenv("CHRONOREC_TRAIN_MODELS", "from-env-models")
    monkeypatch.setenv("CHRONOREC_TRAIN_STEPS", "7")
    monkeypatch.setenv("CHRONOREC_TRAIN_TRAIN_DAYS", "2.5")
    monkeypatch.setenv("CHRONOREC_TRAIN_PREPARE", "0")
    monkeypatch.setenv("CHRONOREC_TRAIN_FORCE", "yes")
    monkeypatch.setenv("CHRONOREC_TRAIN_DEVICE", "cpu")
    monkeypatch.setenv("CHRONOREC_TRAIN_EVERY", "30m")
    # Required flags are satisfied by their variables.
    job, settings = run_settings([])
    assert job == RunJob(db="from-env.db", models="from-env-models", every="30m")
    assert settings == RunSettings(steps=7, train_days=2.5, prepare=False, force=True, device="cpu")
    # A flag given on the command line wins over its variable.
    _, settings = run_settings(["--steps", "9", "--prepare", "--no-force"])
    assert (settings.steps, settings.prepare, settings.force) == (9, True, False)


def test_a_variable_that_does_not_parse_is_named_in_the_error(monkeypatch, capsys):
    monkeypatch.setenv("CHRONOREC_TRAIN_BATCH_SIZE", "thirty-two")
    with pytest.raises(SystemExit) as stopped:
        cli.build_parser()
    assert stopped.value.code == 2
    assert "CHRONOREC_TRAIN_BATCH_SIZE='thirty-two'" in capsys.readouterr().err
    monkeypatch.setenv("CHRONOREC_TRAIN_BATCH_SIZE", "32")
    monkeypatch.setenv("CHRONOREC_TRAIN_FORCE", "maybe")
    with pytest.raises(SystemExit):
        cli.build_parser()
    assert "CHRONOREC_TRAIN_FORCE='maybe'" in capsys.readouterr().err


def test_a_missing_required_flag_says_which_variable_would_do(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--models", "m"])
    err = capsys.readouterr().err
    assert "--db" in err
    assert "required unless CHRONOREC_TRAIN_DB is set" in " ".join(subparser("run").format_help().split())


def test_export_base_and_the_verbose_flag_have_fallbacks_too(monkeypatch):
    monkeypatch.setenv("CHRONOREC_TRAIN_MODELS", "repo")
    monkeypatch.setenv("CHRONOREC_TRAIN_ACTIVATE", "false")
    monkeypatch.setenv("CHRONOREC_TRAIN_VERBOSE", "1")
    args = cli.build_parser().parse_args(["export-base", "--max-length", "64"])
    assert args.verbose is True
    assert settings_from_args(ExportBaseSettings, args) == ExportBaseSettings(models="repo", activate=False,
                                                                               max_length=64)


def test_the_eval_flags_fall_back_to_chronorec_eval_variables(monkeypatch):
    monkeypatch.setenv("CHRONOREC_EVAL_DATA", "ml-100k")
    monkeypatch.setenv("CHRONOREC_EVAL_OUT", "reports")
    monkeypatch.setenv("CHRONOREC_EVAL_PLUGIN", "a.b, c.d")
    monkeypatch.setenv("CHRONOREC_EVAL_PROTOCOL", "loo")
    monkeypatch.setenv(evaluate.SETTINGS_ENV, '{"max_length": 64}')
    for parser, argv in ((evaluate.build_parser(), []), (cli.build_parser(), ["eval"])):
        command = settings_from_args(evaluate.EvalCommand, parser.parse_args(argv))
        assert command == evaluate.EvalCommand(data="ml-100k", out="reports", plugin=["a.b", "c.d"], protocol="loo",
                                               settings='{"max_length": 64}')
        # A repeated flag replaces the variable's list instead of adding to it.
        command = settings_from_args(evaluate.EvalCommand, parser.parse_args([*argv, "--plugin", "x", "--plugin", "y"]))
        assert command.plugin == ["x", "y"]
    monkeypatch.setenv("CHRONOREC_EVAL_PROTOCOL", "sideways")
    with pytest.raises(SystemExit):
        evaluate.build_parser()


@dataclasses.dataclass
class Example:
    name: str = setting(help="a required name")
    ratio: float = setting(0.5, group="numbers", help="100% means all")
    limit: int | None = setting(None, group="numbers", help="at most this many")
    fast: bool = setting(True, help="go fast")
    mode: str = setting("a", choices=("a", "b"), help="which mode")


def test_the_flags_module_on_a_dataclass_of_its_own():
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, Example, env_prefix="X", environ={"X_LIMIT": "4", "X_FAST": "off"})
    parsed = settings_from_args(Example, parser.parse_args(["--name", "n", "--mode", "b"]))
    assert parsed == Example(name="n", limit=4, fast=False, mode="b")
    help_text = " ".join(parser.format_help().split())
    assert "100% means all (default 0.5; env X_RATIO)" in help_text and "numbers:" in help_text
    assert env_name("X", dataclasses.fields(Example)[1]) == "X_RATIO"
    with pytest.raises(SystemExit):
        parser.parse_args(["--name", "n", "--mode", "c"])
