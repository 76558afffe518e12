"""report.html: every section, numbers equal to the Parquet reports, pictures of what the
model saw, no outside URL and no patient identifier; ``batchscan report`` remakes it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.results import report_html
from batchscan.results.report_html import FIGURES_FILE, ReportInputs
from batchscan.site import drift
from batchscan.synth import write_demo_archive

SECTIONS = (
    "Top flagged studies",
    "What the model saw",
    "Scores",
    "Drift of the films against the reference",
    "Studies per week",
    "By device",
    "By model version",
    "Accounting: every file found",
    "Run history",
    "Random sample for quality control",
    "Model card",
)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("report")
    archive, out = root / "archive", root / "reports"
    write_demo_archive(archive, size=256, studies=6)
    assert main(["scan", str(archive), "--out", str(out), "--workers", "0"]) == 0
    return archive, out


@pytest.mark.slow
def test_report_has_every_section_and_the_reports_numbers(scanned) -> None:
    _, out = scanned
    page = (out / "report.html").read_text()
    for section in SECTIONS:
        assert f">{section}" in page, section
    studies = pd.read_parquet(out / "studies.parquet")
    images = pd.read_parquet(out / "images.parquet")
    flagged = studies[studies["flag"]].sort_values("score", ascending=False)
    assert f"<b>{len(studies)} studies, {int(studies['flag'].sum())} flagged</b>" in page
    for status, n in images["status"].value_counts().items():
        assert f'<td>{status}</td><td class="n">{n}</td>' in page
    for reason, n in images["reason"].value_counts().items():
        assert f'<td>{reason}</td><td class="n">{n}</td>' in page
    order = [page.index(f"<td>{a}</td>") for a in flagged["accession_number"]]
    assert order == sorted(order)  # highest score first
    top_images = images[
        images["study_instance_uid"].isin(flagged["study_instance_uid"])
        & (images["status"] == "scored")
    ]
    sheet = page[page.index(">What the model saw") : page.index(">Scores")]
    assert sheet.count('src="data:image/png;base64,') == len(top_images)
    for device in studies["manufacturer"].unique():
        assert device in page
    week = studies["study_date"].min()
    assert str(week.year) in page


@pytest.mark.slow
def test_report_is_self_contained_and_names_no_patient(scanned) -> None:
    _, out = scanned
    page = (out / "report.html").read_text()
    text = re.sub(r"data:image/(?:png|jpeg);base64,[A-Za-z0-9+/=]+", "", page)  # inline
    urls = set(re.findall(r"(?:https?:|file:|//)[^\s\"'<>)]*", text))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}
    assert "<script" not in page and "<link" not in page
    for secret in ("DEMO^PATIENT", "PATIENT0", "DEMO0000", "19700101", "1970-01-01"):
        assert secret not in page


@pytest.mark.slow
def test_report_command_remakes_the_page(scanned, tmp_path: Path, capsys) -> None:
    _, out = scanned
    copy = tmp_path / "reports"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    page = (copy / "report.html").read_text()
    assert all(f">{section}" in page for section in SECTIONS)
    assert "not available" not in page  # the archive is still there: pictures made again
    # the maps come from the figure cache: with the model gone, the page still has them
    maps = page.count('class="map"')
    assert maps >= 1 and maps == len(json.loads((copy / FIGURES_FILE).read_text()))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model"]["path"] = str(tmp_path / "gone.keras")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "report.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.html").read_text().count('class="map"') == maps
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "holds no batchscan reports" in capsys.readouterr().err


@pytest.mark.slow
def test_report_without_the_archive_still_has_its_numbers(tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "reports"
    write_demo_archive(archive, size=128, studies=2)
    assert main(["scan", str(archive), "--out", str(out), "--workers", "0"]) == 0
    shutil.rmtree(archive)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "not available" in page and ">Top flagged studies" in page


def _drift_page(tmp_path: Path, frame: pd.DataFrame | None, facts: dict) -> str:
    manifest = {"arguments": {"monitor_period": "day"}, "drift": facts}
    return report_html._section_drift(ReportInputs(tmp_path, manifest, None, None, drift=frame))


def test_the_drift_section_draws_each_signal_and_says_what_moved(tmp_path: Path) -> None:
    from tests.test_drift import SHIFT_DAY, timeline

    images, studies, sample = timeline(SHIFT_DAY + 5, 150, "device")
    found = drift.judge(images, studies, "day", sample)
    facts = {**found.facts, "warning": found.warning, "error": None}
    page = _drift_page(tmp_path, found.frame, facts)
    assert page.startswith("<h2>Drift of the films against the reference (no reports needed)")
    assert page.count("<svg") == 1 and "<script" not in page
    for signal in drift.SIGNALS:
        if signal in set(found.frame["signal"]):
            assert f">{signal}<" in page, signal  # a panel each
    box = page[page.index("<div class='warn'>") : page.index("</div>")]
    assert "<b>The day from 2026-04-04 differs from the reference (the 28 days" in box
    assert "<li>manufacturer and model ACME DR-9: 0 % -&gt; " in box and "drift.csv" not in box
    alarms = found.frame[found.frame["alarm"]]
    assert f"What moved where a signal alarmed ({len(alarms)} alarms)" in page
    assert page.count("<td>device</td>") == len(alarms)  # newest first, each with its detail
    assert page.index("<td>2026-04-04</td>") < page.index("<td>2026-04-01</td>")

    images, studies, sample = timeline(SHIFT_DAY + 5, 150)
    quiet = drift.judge(images, studies, "day", sample)
    facts = {**quiet.facts, "warning": None, "weekly_rhythm": {"Sat": ["view", "score"]}}
    page = _drift_page(tmp_path, quiet.frame, facts)
    assert "No signal has alarmed." in page and "class='warn'" not in page
    assert "A weekly rhythm in the reference (Sat: view, score)" in page
    empty = pd.DataFrame(columns=list(drift.DRIFT_COLUMNS))
    page = _drift_page(tmp_path, empty, {"reference": "too few scored images for a reference"})
    assert "No period judged yet" in page and "<svg" not in page
    assert _drift_page(tmp_path, None, {}) == "", "no drift.parquet yet: no section"
    failed = {"error": "RuntimeError: a fault", "warning": None}
    page = _drift_page(tmp_path, quiet.frame, failed)
    assert "could not run this time</b> (RuntimeError: a fault)" in page and "<svg" in page
