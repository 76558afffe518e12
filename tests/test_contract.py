"""The outside interface as a contract: ``tests/contract/interface.toml`` lists every
subcommand with its options and exit codes, every file a scan and evaluate leave in
REPORT_DIR with its columns and Arrow types (or its JSON keys), and the shipped model card's
keys. These tests compare it with the code both ways: something dropped or renamed fails, and
so does something added but not listed, so that every change of the interface shows in review
as a changed line of that file. The floor that cron entries and dashboards are written
against (``../shared/docs/interface.md``) must be in the contract."""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from batchscan import options
from batchscan.results import report
from tests.conftest import ROOT

CONTRACT = ROOT / "tests" / "contract" / "interface.toml"
SHIPPED_CARD = ROOT / "batchscan" / "models" / "pneumonia_cnn_seed.json"


def _contract() -> dict[str, Any]:
    with CONTRACT.open("rb") as handle:
        return tomllib.load(handle)


def _toml(key: str, value: str) -> str:
    bare = re.fullmatch(r"[A-Za-z0-9_-]+", key) is not None
    return f"{key if bare else json.dumps(key)} = {json.dumps(value)}"


def _differences(section: str, listed: dict[str, str], code: dict[str, str]) -> list[str]:
    """What differs between the contract's `section` and the code, each as the line to
    change; the order counts too (a column moved changes a CSV's layout)."""
    found = [
        f"[{section}] not in the code (dropped or renamed?): {k}" for k in listed if k not in code
    ]
    found += [f"[{section}] add: {_toml(k, v)}" for k, v in code.items() if k not in listed]
    found += [
        f"[{section}] {k}: contract {listed[k]!r}, code {v!r}"
        for k, v in code.items()
        if k in listed and listed[k] != v
    ]
    if not found and list(listed) != list(code):
        found.append(f"[{section}] order: the code has {list(code)}")
    return found


# --- subcommands, options, exit codes ---------------------------------------------------------


def _commands() -> tuple[options.Command, ...]:
    return (options.PROGRAM, *options.COMMANDS)


def test_every_subcommand_option_and_exit_code_is_in_the_contract_and_no_other() -> None:
    contract = _contract()
    problems: list[str] = []
    names = [c.name for c in _commands()]
    if list(contract["options"]) != names or list(contract["exits"]) != names:
        problems.append(f"subcommands: the code has {names}")
    for command in _commands():
        described = {o.name: options.describe(command, o) for o in command.options}
        problems += _differences(
            f"options.{command.name}", contract["options"].get(command.name, {}), described
        )
        exits = {str(code): meaning for code, meaning in sorted(command.exits.items())}
        problems += _differences(
            f"exits.{command.name}", contract["exits"].get(command.name, {}), exits
        )
    assert not problems, "\n".join(problems)


def test_the_parser_is_the_table() -> None:
    """What argparse was given is what the contract describes: every option and positional
    of every subcommand's parser comes from the table, none added beside it."""
    import argparse

    from batchscan.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == [c.name for c in options.COMMANDS]
    for command in options.COMMANDS:
        given = [
            a.option_strings[0] if a.option_strings else a.metavar
            for a in sub.choices[command.name]._actions
            if not isinstance(a, argparse._HelpAction)
        ]
        assert given == [o.name for o in command.options]


# --- report files -----------------------------------------------------------------------------


#: The files that get a ``patient_key`` column when a pseudonym key is configured
#: (``report.write_images``, ``report.write_studies``; the written files hold this to them).
WITH_PATIENT_KEY = {"images.parquet", "studies.parquet"}


def _schemas() -> dict[str, pa.Schema]:
    """The Parquet files of REPORT_DIR by name, each with its schema (``<NAME>_SCHEMA`` of
    :mod:`batchscan.results.report`) as written with a pseudonym key."""
    schemas = {
        f"{name.removesuffix('_SCHEMA').lower()}.parquet": schema
        for name, schema in vars(report).items()
        if name.endswith("_SCHEMA") and isinstance(schema, pa.Schema)
    }
    return {
        name: report.with_patient_key(schema, name in WITH_PATIENT_KEY)
        for name, schema in schemas.items()
    }


def _column(field: pa.Field, conditional: bool) -> str:
    line = str(field.type) + ("" if field.nullable else ", not null")
    return line + (", only with a pseudonym key" if conditional else "")


def _columns(name: str, schema: pa.Schema) -> dict[str, str]:
    stem = name.removesuffix(".parquet").upper()
    plain = set(getattr(report, f"{stem}_SCHEMA").names)
    return {f.name: _column(f, f.name not in plain) for f in schema}


def test_every_report_column_is_in_the_contract_with_its_type() -> None:
    contract = _contract()
    problems: list[str] = []
    schemas = _schemas()
    if set(contract["columns"]) != set(schemas):
        problems.append(f"[columns] files: the code has {sorted(schemas)}")
    for name, schema in schemas.items():
        problems += _differences(
            f'columns."{name}"', contract["columns"].get(name, {}), _columns(name, schema)
        )
    assert not problems, "\n".join(problems)


def _writers(value: str) -> set[str]:
    """The commands that write a file, from its [files] entry (``scan, report; private``)."""
    return {w.strip() for w in value.partition(";")[0].split(",")}


def test_every_public_file_has_its_columns_or_keys_listed() -> None:
    contract = _contract()
    files = contract["files"]
    public = {n for n, v in files.items() if "private" not in v.partition(";")[2]}
    tables = {n for n in public if n.endswith(".parquet")}
    assert set(contract["columns"]) == tables
    twins = {n for n in public if n.endswith(".csv")}
    assert {n.replace(".csv", ".parquet") for n in twins} <= tables, "a CSV is a Parquet's twin"
    assert set(contract["json"]) - {"model card"} == {n for n in public if n.endswith(".json")}
    assert all(_writers(v) <= {c.name for c in options.COMMANDS} for v in files.values())


_JSON_TYPES = {
    dict: "object",
    list: "array",
    str: "string",
    bool: "boolean",
    int: "integer",
    float: "number",
    type(None): "null",
}


#: How the contract marks a key only a scan of a PACS writes (tests/test_pacs_scan.py checks it).
_PACS_ONLY = "with a PACS as the archive"


def _json_differences(name: str, listed: dict[str, str], found: dict[str, Any]) -> list[str]:
    problems = [
        f'[json."{name}"] not written (dropped or renamed?): {k}'
        for k in listed
        if k not in found and not listed[k].endswith(_PACS_ONLY)  # the contract scans a folder
    ]
    for key, value in found.items():
        kind = _JSON_TYPES[type(value)]
        if key not in listed:
            problems.append(f'[json."{name}"] add: {_toml(key, kind)}')
        elif kind not in (kinds := listed[key].partition(";")[0].split(" or ")) and not (
            kind == "integer" and "number" in kinds
        ):
            problems.append(f'[json."{name}"] {key}: contract {listed[key]!r}, written {kind}')
    return problems


def test_the_shipped_model_card_has_the_listed_keys() -> None:
    card = json.loads(SHIPPED_CARD.read_text(encoding="utf-8"))
    assert _json_differences("model card", _contract()["json"]["model card"], card) == []


@pytest.fixture(scope="module")
def full_scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """REPORT_DIR (``out``) of a scan that writes everything a scan can (a pseudonym key,
    SRs, the radiology reports), then evaluated; ``after_scan``: the files before evaluate."""
    from batchscan.cli import main
    from batchscan.synth import write_demo_archive

    root = tmp_path_factory.mktemp("contract")
    archive, out = root / "archive", root / "reports"
    write_demo_archive(archive, size=128)
    key = root / "pseudonym.key"
    key.write_text("a key of the contract test, long enough\n")
    argv = [
        "scan",
        str(archive),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-progress",
        "--sr-out",
        str(root / "sr"),
        "--reports-file",
        str(archive / "reports.csv"),
        "--pseudonym-key-file",
        str(key),
    ]
    assert main(argv) == 0
    after_scan = {p.name for p in out.iterdir()}
    assert main(["evaluate", str(out), "--labels", str(archive / "labels.csv")]) == 0
    return {"out": out, "after_scan": after_scan}


@pytest.mark.slow
def test_the_files_a_scan_and_evaluate_write_are_the_contract(full_scan: dict[str, Any]) -> None:
    files = _contract()["files"]
    after_scan = full_scan["after_scan"]
    written = {p.name for p in full_scan["out"].iterdir()}
    by_scan = {name for name, value in files.items() if "scan" in _writers(value)}
    assert after_scan == by_scan, "the files a scan leaves in REPORT_DIR"
    by_evaluate = {name for name, value in files.items() if "evaluate" in _writers(value)}
    assert written == by_scan | by_evaluate, "the files scan and evaluate leave"
    assert {n for n, v in files.items() if "report" in _writers(v)} <= by_scan


@pytest.mark.slow
def test_the_written_files_have_the_listed_columns_and_keys(full_scan: dict[str, Any]) -> None:
    out: Path = full_scan["out"]
    contract = _contract()
    problems: list[str] = []
    for name, listed in contract["columns"].items():
        schema = pq.read_schema(out / name)
        written = {f.name: _column(f, "pseudonym key" in listed.get(f.name, "")) for f in schema}
        problems += _differences(f'written "{name}"', listed, written)
        twin = out / name.replace(".parquet", ".csv")
        if name.replace(".parquet", ".csv") in contract["files"]:
            header = pacsv.read_csv(twin).schema.names
            if header != list(listed):
                problems.append(f"{twin.name}: columns {header}, not those of {name}")
    for name, listed in contract["json"].items():
        if name != "model card":
            found = json.loads((out / name).read_text(encoding="utf-8"))
            problems += _json_differences(name, listed, found)
    assert not problems, "\n".join(problems)


# --- the floor --------------------------------------------------------------------------------

#: ../shared/docs/interface.md, the floor, transcribed: what cron entries and dashboards already
#: use. The page lists ``--version`` among the scan options; it is ``batchscan --version``.
FLOOR: dict[str, Any] = {
    "commands": ["scan", "evaluate", "train", "labels", "report", "send", "adapt", "demo"],
    "options": {
        "batchscan": {"--version": ""},
        "scan": {
            "ARCHIVE_DIR": "path",
            "--out": "path",
            "--model": "path",
            "--batch-size": "int",
            "--workers": "int >= 0, default all cores",
            "--engine": "local|ray, default local",
            "--no-progress": "flag",
            "--all-modalities": "flag",
            "--config": "path",
            "--state": "path",
            "--pseudonym-key-file": "path",
            "--out-of-domain": "",
            "--sr-out": "path",
            "--shadow-model": "path",
            "--reports-file": "path",
            "--monitor-period": "",
        },
    },
    "exits": {"scan": {"0", "1", "2", "3"}, "send": {"0", "1", "2"}},
    "files": {
        "images.parquet",
        "studies.parquet",
        "studies.csv",
        "runs.parquet",
        "manifest.json",
        "report.html",
        "performance.parquet",
        "performance.csv",
        "discrepancies.parquet",
        "discrepancies.csv",
        "evaluation.json",
        "state.sqlite",
        "inputs.sqlite",
    },
    "columns": {
        "images.parquet": {
            "path": "string",
            "status": "string",
            "reason": "string",
            "study_instance_uid": "string",
            "series_instance_uid": "string",
            "sop_instance_uid": "string",
            "score": "double",
            "model_version": "string",
            "patient_age_years": "",
            "age_group": "",
            "in_domain": "",
            "ood_score": "",
            "ood": "",
            "shadow_score": "",
        },
        "studies.parquet": {
            "study_instance_uid": "string",
            "score": "double",
            "flag": "bool",
            "n_images_scored": "",
            "accession_number": "",
            "study_date": "",
            "model_version": "",
            "n_images_total": "",
            "views": "",
            "age_group": "",
            "in_domain": "",
            "modality": "",
            "manufacturer": "",
            "patient_sex": "",
            "shadow_score": "",
            "shadow_flag": "",
            "shadow_model_version": "",
        },
    },
    "model card": {
        "preprocessing",
        "threshold",
        "threshold_rule",
        "training_data",
        "test_auc",
        "test_accuracy",
        "test_sensitivity",
        "test_specificity",
    },
}
#: Words of the floor page that name no part of the interface (values, metavars, examples).
NOT_NAMES: set[str] = {
    "pip",
    "install",
    ".",
    "batchscan",
    "/",
    "scored",
    "skipped",
    "failed",
    "not_dicom",
    "modality:CT",
    "decode_error:...",
    ".json",
    ".csv",
    "PATH",
    "N",
    "local|ray",
    "column",
}


def _not_kept(prefix: str, wanted: dict[str, str], listed: dict[str, str]) -> list[str]:
    """The names of `wanted` that `listed` lacks, or lists with another start (kind, type)."""
    return [
        f"{prefix} {name}"
        for name, start in wanted.items()
        if name not in listed or not listed[name].startswith(start)
    ]


def test_the_floor_is_in_the_contract() -> None:
    contract = _contract()
    missing = [c for c in FLOOR["commands"] if c not in contract["options"]]
    for command, wanted in FLOOR["options"].items():
        missing += _not_kept(command, wanted, contract["options"][command])
    for command, codes in FLOOR["exits"].items():
        missing += [f"{command} exit {c}" for c in codes - set(contract["exits"][command])]
    missing += sorted(FLOOR["files"] - set(contract["files"]))
    for name, columns in FLOOR["columns"].items():
        missing += _not_kept(name, columns, contract["columns"][name])
    missing += sorted(FLOOR["model card"] - set(contract["json"]["model card"]))
    assert missing == []
    assert "studies.csv" in contract["files"], "the CSV twin of studies.parquet"


def _floor_page() -> Path | None:
    candidates = [
        os.environ.get("BATCHSCAN_INTERFACE"),
        ROOT.parent / "shared" / "docs" / "interface.md",
    ]
    return next((Path(c) for c in candidates if c and Path(c).is_file()), None)


def test_the_floor_page_is_transcribed_above() -> None:
    """Every name the floor page writes as code, and every column of its table, is in
    :data:`FLOOR` (or is no name), so that the transcription cannot lag the page."""
    page = _floor_page()
    if page is None:
        pytest.skip(
            "the floor page ../shared/docs/interface.md is not beside the repository "
            "(or set BATCHSCAN_INTERFACE)"
        )
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    words = {w for span in re.findall(r"`([^`]+)`", text) for w in span.split()}
    words |= {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    known = {*FLOOR["commands"], *FLOOR["files"], *FLOOR["model card"], *NOT_NAMES}
    known |= {o for wanted in FLOOR["options"].values() for o in wanted}
    known |= {c for columns in FLOOR["columns"].values() for c in columns}
    assert words - known == set()
