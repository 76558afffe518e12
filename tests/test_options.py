"""Every option is declared once (batchscan/options.py) and its other faces are made from that
declaration: the parser, the config file's keys, the example config, the help's defaults, the
exit codes each command returns. The commands run here are stood in for (``cli._RUN``): what
is tested is what reaches them."""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path
from typing import Any

import pytest

from batchscan import cli, options
from batchscan.config import load_config
from tests.conftest import ROOT


def test_a_config_key_means_one_thing_in_every_command() -> None:
    seen: dict[str, options.Option] = {}
    for command in options.COMMANDS:
        for option in command.options if command.reads_config else ():
            if option.key is not None:
                first = seen.setdefault(option.key, option)
                assert (option.kind, option.choices) == (first.kind, first.choices), option.key
    assert set(seen) == set(options.config_keys())


def test_the_example_config_is_current_and_every_key_in_it_valid(tmp_path: Path) -> None:
    example = ROOT / options.EXAMPLE_CONFIG
    assert example.read_text(encoding="utf-8") == options.example_config(), (
        f"made from options.py: python -m batchscan.options > {options.EXAMPLE_CONFIG}"
    )
    assert set(load_config(example)) == {"archive", "out"}  # what a nightly scan needs
    every = tmp_path / "every.toml"
    lines = example.read_text(encoding="utf-8").splitlines()
    every.write_text("\n".join(re.sub(r"^# (\w+ = )", r"\1", line) for line in lines))
    assert set(load_config(every)) == set(options.config_keys())


def _run(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> tuple[int, Any]:
    """main(argv) with the command stood in for; returns its status and the args it got."""
    got: list[argparse.Namespace] = []
    name = options.command_in(argv)[0]
    monkeypatch.setitem(cli._RUN, name, lambda args: got.append(args) or 0)
    try:
        status = cli.main(argv)
    except SystemExit as exc:  # argparse's refusals
        status = int(exc.code or 0)
    return status, (got[0] if got else None)


def test_every_option_of_scan_and_send_is_set_from_the_config_file_or_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file holding every key, each with a value other than its default where the option
    allows one, reaches every option of every command that reads ``--config``; an option it
    does not reach gives the reason, and only such commands have keys or reasons at all."""

    def other(option: options.Option) -> Any:
        if option.kind is options.FLAG:
            return True
        if option.choices:
            return next(c for c in reversed(option.choices) if c != option.default_value())
        value = option.example if option.example is not None else option.default_value()
        return value * 2 if value == option.default_value() else value  # 6 workers on 6 cores

    keys = options.config_keys()
    every = tmp_path / "every.toml"
    every.write_text("".join(f"{key} = {json.dumps(other(o))}\n" for key, o in keys.items()))
    values = load_config(every)
    assert set(values) == set(keys)
    for command in options.COMMANDS:
        if not command.reads_config:
            assert all(o.config is None and o.no_config is None for o in command.options)
            continue
        status, args = _run(monkeypatch, [command.name, "--config", str(every)])
        assert status == 0, command.name
        for option in command.options:
            assert option.config is None or option.no_config is None, option.name
            if option.key is None:
                assert option.no_config, f"{command.name} {option.name}: a key or a reason"
            elif option.name != "--config":
                got = getattr(args, option.dest)
                assert got == values[option.key], f"{command.name} {option.name}"
                assert got != option.default_value(), f"{option.name} took its default"


def test_one_file_serves_scan_and_send_and_out_of_domain_is_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "etc" / "batchscan.toml"
    config.parent.mkdir()
    config.write_text(
        'archive = "/mnt/archive"\nout = "../reports"\nout_of_domain = "skip"\nworkers = 0\n'
        'sr_out = "outbox"\nsend_to = "PACS@pacs:104"\ncalling_aet = "NIGHTLY"\n'
    )
    status, scan = _run(monkeypatch, ["scan", "--config", str(config), "--workers", "1"])
    assert status == 0
    assert (scan.archive, scan.out.resolve()) == (Path("/mnt/archive"), tmp_path / "reports")
    assert (scan.out_of_domain, scan.workers) == ("skip", 1)  # the command line wins
    assert scan.sr_out == config.parent / "outbox"
    status, send = _run(monkeypatch, ["send", "--config", str(config)])
    assert status == 0
    assert (send.outbox, send.send_to, send.calling_aet) == (
        config.parent / "outbox",
        "PACS@pacs:104",
        "NIGHTLY",
    )
    assert not hasattr(send, "archive"), "scan's keys are left to scan"


@pytest.mark.parametrize("command", ["scan", "send"])
def test_a_key_no_command_knows_is_refused_with_one_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "batchscan.toml"
    config.write_text('send_to = "PACS@pacs:104"\nsr_out = "o"\nout_of_domian = "skip"\n')
    assert _run(monkeypatch, [command, "--config", str(config)]) == (2, None)
    err = capsys.readouterr().err
    assert "unknown key 'out_of_domian'" in err and err.count("\n") == 1
    config.write_text('out_of_domain = "maybe"\n')
    assert _run(monkeypatch, [command, "--config", str(config)]) == (2, None)
    assert "key 'out_of_domain': must be one of score, skip" in capsys.readouterr().err


def test_a_required_value_missing_from_both_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "batchscan.toml"
    config.write_text('sr_out = "outbox"\n')
    assert _run(monkeypatch, ["send", "--config", str(config)]) == (2, None)
    err = capsys.readouterr().err
    wanted = "--to AET@HOST:PORT or --stow URL is required (on the command line or in --config)"
    assert err == f"batchscan: error: {wanted}\n"
    assert _run(monkeypatch, ["scan", "--out", str(tmp_path)]) == (2, None)
    assert "ARCHIVE_DIR is required" in capsys.readouterr().err


def test_the_help_quotes_the_code_not_a_copy() -> None:
    """train's --epochs said 30 while the code fine-tuned for 60: the figure is the code's."""
    from batchscan.site.site_training import FINE_TUNE_EPOCHS, FINE_TUNE_LEARNING_RATE

    sub = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    epochs = next(a for a in sub["train"]._actions if "--epochs" in a.option_strings)
    assert f"default {FINE_TUNE_EPOCHS} fine-tuning" in epochs.help
    rate = next(a for a in sub["train"]._actions if "--learning-rate" in a.option_strings)
    assert f"default {FINE_TUNE_LEARNING_RATE:g} fine-tuning" in rate.help
    workers = next(a for a in sub["scan"]._actions if "--workers" in a.option_strings)
    assert workers.default == options.ALL_CORES.value() and "all cores" in workers.help


def test_the_drift_reference_is_two_dates_from_either_place_and_a_bad_one_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from datetime import date

    from batchscan.site.monitoring import REFERENCE_PERIODS

    wanted = (date(2026, 1, 5), date(2026, 2, 1))
    status, args = _run(
        monkeypatch, ["scan", "/a", "--out", "/r", "--drift-reference", "2026-01-05..2026-02-01"]
    )
    assert (status, args.drift_reference, args.monitor_period) == (0, wanted, "month")
    config = tmp_path / "batchscan.toml"
    config.write_text('drift_reference = "2026-01-05..2026-02-01"\nmonitor_period = "day"\n')
    status, args = _run(monkeypatch, ["scan", "/a", "--out", "/r", "--config", str(config)])
    assert (status, args.drift_reference, args.monitor_period) == (0, wanted, "day")
    for bad in ("2026-01-05", "2026-02-01..2026-01-05", "2026-01-05..soon"):
        assert _run(monkeypatch, ["scan", "/a", "--out", "/r", "--drift-reference", bad]) == (
            2,
            None,
        )
        err = capsys.readouterr().err
        assert "--drift-reference" in err and err.strip().count("\n") <= 1, err
        config.write_text(f'drift_reference = "{bad}"\n')
        assert _run(monkeypatch, ["scan", "--config", str(config)]) == (2, None)
        assert "key 'drift_reference'" in capsys.readouterr().err
    sub = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    reference = next(a for a in sub["scan"]._actions if "--drift-reference" in a.option_strings)
    assert f"the first {REFERENCE_PERIODS['day']} days" in reference.help


def test_a_parser_for_one_command_reads_no_default_of_the_others() -> None:
    parser = cli.build_parser(commands=["send"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(sub["send"]._actions) > 1 and len(sub["train"]._actions) == 1  # -h only
    assert options.command_in(["--version"]) == () and options.command_in(["x", "scan"]) == ()


def test_an_output_that_cannot_be_written_is_no_bad_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """evaluate and labels said 2 (a bad argument) when the disk refused: it is 1."""
    from batchscan.synth import write_reports

    reports = write_reports(tmp_path / "reports.csv", [("ACC1", "No acute disease.")])
    (tmp_path / "file").write_text("")
    blocked = tmp_path / "file" / "labels.csv"  # under a file: cannot be made
    assert cli.main(["labels", str(reports), "--out", str(blocked), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("batchscan: error: cannot write the labels") and err.count("\n") == 1

    from batchscan.site import evaluate

    def refused(*_: Any) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "evaluation.json"))

    for name in ("read_labels", "evaluate", "explain_errors"):
        monkeypatch.setattr(evaluate, name, lambda *_: {})
    monkeypatch.setattr(evaluate, "write_evaluation", refused)
    assert cli.main(["evaluate", str(tmp_path), "--labels", str(reports)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("batchscan: error: cannot write the evaluation") and err.count("\n") == 1


def test_each_command_returns_only_its_declared_exit_codes() -> None:
    """The exit codes a command's function in cli.py can return are those the table declares
    for it (1 and 2 come from main and argparse for every command)."""
    tree = ast.parse((ROOT / "batchscan" / "cli.py").read_text(encoding="utf-8"))
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    constants = {"EXIT_OK": 0, "EXIT_ERROR": 1, "EXIT_USAGE": 2, "EXIT_LOCKED": 3}

    def returned(function: ast.FunctionDef) -> set[int]:
        codes: set[int] = set()
        for node in ast.walk(function):
            if not isinstance(node, ast.Return) or node.value is None:
                continue
            for part in ast.walk(node.value):
                if isinstance(part, ast.Name) and part.id in constants:
                    codes.add(constants[part.id])
                if isinstance(part, ast.Call) and getattr(part.func, "id", None) in functions:
                    helper = functions[part.func.id]  # type: ignore[attr-defined]
                    given = {a.id for a in part.args if isinstance(a, ast.Name)}
                    if not given & constants.keys():  # the helper's default status
                        codes |= {
                            constants[d.id]
                            for d in helper.args.defaults
                            if isinstance(d, ast.Name) and d.id in constants
                        }
                    codes |= returned(helper)
        return codes

    for command in options.COMMANDS:
        function = functions[cli._RUN[command.name].__name__]
        assert returned(function) | {1, 2} == set(command.exits), command.name
