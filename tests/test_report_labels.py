"""batchscan labels: every written case, the reports file's refusals, the outputs, and the
labels file as evaluate and train read it."""

from __future__ import annotations

import argparse
import csv
import json
import stat
from pathlib import Path

import pytest

from batchscan.cli import build_parser, main
from batchscan.site.evaluate import LabelsError, read_labels
from batchscan.site.report_labels import (
    REASONS,
    ReportLabeler,
    ReportsError,
    read_reports,
    run_labels,
)

CASES_FILE = Path(__file__).parent / "data" / "report_cases.txt"


def _cases() -> list[tuple[str, str, str]]:
    cases = []
    for line in CASES_FILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        label, reason, text = (part.strip() for part in line.split("|", 2))
        cases.append((label, reason, text.replace("\\n", "\n")))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def labeler() -> ReportLabeler:
    return ReportLabeler()


def test_the_case_file_covers_the_rules() -> None:
    assert len(CASES) >= 300
    reasons = {reason for _, reason, _ in CASES}
    assert reasons >= set(REASONS) - {"too_long"}


@pytest.mark.parametrize(("label", "reason", "text"), CASES, ids=[c[2][:60] for c in CASES])
def test_case(labeler: ReportLabeler, label: str, reason: str, text: str) -> None:
    decision = labeler.label(text)
    assert (decision.label, decision.reason) == (label, reason)


def test_batch_equals_one_by_one(labeler: ReportLabeler) -> None:
    texts = [c[2] for c in CASES]
    batched = list(labeler.label_many(texts, batch_size=7))
    assert [(d.label, d.reason) for d in batched] == [(c[0], c[1]) for c in CASES]


def test_airspace_policy() -> None:
    strict = ReportLabeler(airspace="uncertain")
    decision = strict.label("Right lower lobe consolidation.")
    assert (decision.label, decision.reason) == ("uncertain", "airspace")
    assert strict.label("Right lower lobe pneumonia.").label == "pneumonia"


def test_evidence_is_the_deciding_sentence(labeler: ReportLabeler) -> None:
    text = "INDICATION: Fever.\nFINDINGS: Heart is normal. There is right lower lobe pneumonia."
    decision = labeler.label(text)
    assert decision.evidence == ("There is right lower lobe pneumonia.",)
    assert labeler.label("Heart size normal.").evidence == ()


def test_too_long_and_null(labeler: ReportLabeler) -> None:
    assert labeler.label("No pneumonia. " * 20_000).reason == "too_long"
    assert labeler.label(None).reason == "empty_report"


# ------------------------------------------------------------------------------------------
# Reading the reports file
# ------------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_csv_with_multiline_quoted_text(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "r.csv",
        "accession_number,report,other\n"
        'A1,"FINDINGS:\nRight lower lobe ""dense"" pneumonia.\n\nIMPRESSION: Pneumonia.",x\n'
        "A2,No pneumonia.,y\n",
    )
    reports = read_reports(path)
    assert [(r.key, r.line) for r in reports] == [("A1", 2), ("A2", 6)]
    assert '"dense"' in reports[0].text


def test_json_lines(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "r.jsonl",
        json.dumps({"study_instance_uid": "1.2.3", "text": "No pneumonia."})
        + "\n\n"
        + json.dumps({"study_instance_uid": 45, "text": None})
        + "\n",
    )
    reports = read_reports(path, key="study_instance_uid", text_column="text")
    assert [(r.key, r.text, r.line) for r in reports] == [
        ("1.2.3", "No pneumonia.", 1),
        ("45", None, 3),
    ]


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("r.csv", "accession,report\nA1,x\n", "line 1: no key column 'accession_number'"),
        ("r.csv", "accession_number,text\nA1,x\n", "line 1: no text column 'report'"),
        ("r.csv", "accession_number,report\nA1,x\nA2,x,extra\n", "line 3: 3 fields"),
        ("r.csv", 'accession_number,report\nA1,"open quote\nA2,x\n', "line 2: malformed CSV"),
        ("r.csv", "accession_number,report\nA1,x\n ,y\n", "line 3: empty accession_number"),
        ("r.csv", "", "empty file"),
        ("r.jsonl", '{"accession_number": "A1", "report": "x"}\n{broken\n', "line 2: not JSON"),
        ("r.jsonl", '{"accession_number": "A1"}\n', "line 1: no 'report' field"),
        ("r.jsonl", '["A1", "x"]\n', "line 1: not a JSON object"),
        ("r.jsonl", '{"accession_number": "A1", "report": 3}\n', "line 1: report is not text"),
    ],
)
def test_bad_reports_files(tmp_path: Path, name: str, content: str, problem: str) -> None:
    with pytest.raises(ReportsError, match=problem):
        read_reports(_write(tmp_path, name, content))


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "r.csv", b"accession_number,report\nA1,ok\nA2,caf\xe9 pneumonia\n")
    with pytest.raises(ReportsError, match="line 3: not UTF-8"):
        read_reports(path)


def test_errors_never_quote_the_report(tmp_path: Path) -> None:
    secret = "Patient Jane Roe has pneumonia"
    path = _write(tmp_path, "r.csv", f"accession_number,report\nA1,{secret},extra\n")
    with pytest.raises(ReportsError) as caught:
        read_reports(path)
    assert "Jane" not in str(caught.value)


# ------------------------------------------------------------------------------------------
# The run and its outputs
# ------------------------------------------------------------------------------------------

REPORTS_CSV = (
    "accession_number,report\n"
    'A1,"FINDINGS: Right lower lobe consolidation.\nIMPRESSION: Right lower lobe pneumonia."\n'
    "A2,No focal consolidation.\n"
    "A3,Possible pneumonia.\n"
    "A4,\n"
    "A2,Right lower lobe pneumonia.\n"
)


def test_run_writes_one_row_per_report(tmp_path: Path) -> None:
    reports = _write(tmp_path, "reports.csv", REPORTS_CSV)
    run = run_labels(reports, tmp_path / "labels.csv", audit=tmp_path / "audit.csv")
    with (tmp_path / "labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["accession_number", "label", "reason"],
        ["A1", "pneumonia", "positive"],
        ["A2", "normal", "negated"],
        ["A3", "uncertain", "uncertain"],
        ["A4", "uncertain", "empty_report"],
        ["A2", "pneumonia", "positive"],
    ]
    assert run.duplicates == ["A2"]
    assert "1 accession_number values given more than once" in run.summary()
    with (tmp_path / "audit.csv").open(newline="", encoding="utf-8") as handle:
        audit = list(csv.DictReader(handle))
    assert audit[0]["evidence"] == "Right lower lobe pneumonia."
    assert audit[0]["line"] == "2"
    assert audit[3]["evidence"] == ""
    # The labels file holds no report text; only the audit quotes sentences.
    assert "lobe" not in (tmp_path / "labels.csv").read_text()
    for name in ("labels.csv", "audit.csv"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode & 0o007 == 0, oct(mode)


def test_run_refuses_to_overwrite_the_reports(tmp_path: Path) -> None:
    reports = _write(tmp_path, "reports.csv", REPORTS_CSV)
    with pytest.raises(ReportsError, match="never written"):
        run_labels(reports, reports)
    assert reports.read_text() == REPORTS_CSV


def test_labels_file_as_evaluate_reads_it(tmp_path: Path) -> None:
    reports = _write(tmp_path, "reports.csv", REPORTS_CSV)
    run_labels(reports, tmp_path / "labels.csv")
    dropped = read_labels(tmp_path / "labels.csv")
    # A2 is given twice, normal and pneumonia: a conflict, left out; A3 and A4 are uncertain.
    assert dropped.values == {"A1": 1}
    assert dropped.conflicts == ["A2"]
    assert dropped.uncertain == 2
    assert dropped.uncertain_policy == "drop"
    as_positive = read_labels(tmp_path / "labels.csv", uncertain="pneumonia")
    assert as_positive.values == {"A1": 1, "A3": 1, "A4": 1}
    as_negative = read_labels(tmp_path / "labels.csv", uncertain="normal")
    assert as_negative.values == {"A1": 1, "A3": 0, "A4": 0}
    with pytest.raises(LabelsError, match="uncertain"):
        read_labels(tmp_path / "labels.csv", uncertain="maybe")  # type: ignore[arg-type]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write(tmp_path, "reports.csv", REPORTS_CSV)
    out = tmp_path / "labels.csv"
    args = ["labels", str(tmp_path / "reports.csv"), "--out", str(out), "--no-progress"]
    assert main([*args, "--audit", str(tmp_path / "a.csv")]) == 0
    printed = capsys.readouterr()
    assert "5 reports: 2 pneumonia, 1 normal, 2 uncertain" in printed.out
    assert "lobe" not in printed.out + printed.err
    _write(tmp_path, "bad.csv", "accession_number,report\nA1,Right lower lobe pneumonia,x\n")
    bad = tmp_path / "l2.csv"
    assert main(["labels", str(tmp_path / "bad.csv"), "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "line 2" in err and "pneumonia" not in err
    assert not bad.exists()
    assert main(["labels", str(tmp_path / "nowhere.csv"), "--out", str(bad)]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        main(["labels", str(tmp_path / "reports.csv"), "--out", str(bad), "--key", "mrn"])
    assert refused.value.code == 2


def test_every_option_has_help() -> None:
    """README and --help are how a site learns an option: none may be left without a line."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [
        f"{name} {action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert missing == []
