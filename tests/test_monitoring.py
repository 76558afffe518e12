"""Monitoring against the radiologists' reports: performance per period, the warning when a
period stops agreeing, discrepancies, and a bad reports file, on a generated archive of 120
one-image studies over three months, scanned for real."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.site import monitoring
from batchscan.site.label_cache import LABELS_DB
from batchscan.synth import DEMO_REPORTS, chest_phantom, write_labelled_studies, write_reports
from tests.conftest import nightly
from tests.test_input_store import Opened

MONTHS = ("202601", "202602", "202603")
PER_MONTH = 40


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An archive of 120 studies (40 a month, January to March 2026), scanned once; its
    ``archive``, a scanned ``out`` to copy, and the study scores by accession."""
    root = tmp_path_factory.mktemp("hospital")
    archive = root / "archive"
    n = PER_MONTH * len(MONTHS)
    pictures = [
        (chest_phantom(64, seed=i, opacity=0.6 * (i % 3 == 0)) * 255).astype(np.uint8)
        for i in range(n)
    ]
    dates = [f"{MONTHS[i // PER_MONTH]}{1 + i % 28:02d}" for i in range(n)]
    write_labelled_studies(
        archive, pictures, [0] * n, prefix="MON", ages=["045Y"] * n, study_dates=dates
    )
    out = root / "out"
    assert main(["scan", str(archive), "--out", str(out), "--no-progress", "--workers", "0"]) == 0
    return {"archive": archive, "out": out}


def scores(out: Path) -> pd.Series:
    studies = pd.read_parquet(out / "studies.parquet")
    return studies.set_index("accession_number")["score"].sort_index()


def reports(score: pd.Series, shuffled_month: str | None = None) -> list[tuple[str, str]]:
    """Reports that agree with the films (pneumonia for the higher half of each month's
    scores), except in `shuffled_month`, where the labels are drawn at random."""
    normal, pneumonia = DEMO_REPORTS[0][0], DEMO_REPORTS[1][0]
    rng = np.random.default_rng(5)
    rows = []
    for m, month in enumerate(MONTHS):
        part = score[[k for k in score.index if PER_MONTH * m <= int(k[3:]) < PER_MONTH * (m + 1)]]
        positive = part >= part.median()
        if month == shuffled_month:
            positive = pd.Series(rng.permutation(positive.to_numpy()), index=part.index)
        rows += [(k, pneumonia if p else normal) for k, p in positive.items()]
    return rows


def run(archive: Path, out: Path, reports_file: Path, capsys) -> tuple[int, str, str, dict]:
    capsys.readouterr()
    argv = ["scan", str(archive), "--out", str(out), "--no-progress", "--workers", "0"]
    status = main([*argv, "--reports-file", str(reports_file)])
    printed = capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    return status, printed.out, printed.err, manifest


def test_agreeing_reports_do_not_warn_and_a_month_that_stops_agreeing_does(
    hospital: dict[str, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive, out = hospital["archive"], tmp_path / "out"
    shutil.copytree(hospital["out"], out)
    score = scores(out)
    export = write_reports(tmp_path / "ris.csv", reports(score))

    status, printed, _, manifest = run(archive, out, export, capsys)
    assert status == 0 and "WARNING: performance" not in printed
    facts = manifest["monitoring"]
    assert facts["reports_labelled_this_run"] == facts["reports"] == len(score)
    perf = pd.read_parquet(out / "performance.parquet")
    assert [str(d) for d in perf["period_start"]] == ["2026-01-01", "2026-02-01", "2026-03-01"]
    assert (perf["n_labelled"] == PER_MONTH).all() and (perf["n_pneumonia"] == PER_MONTH // 2).all()
    assert (perf["auc"] > 0.99).all() and (perf["auc_low"] <= perf["auc"]).all()
    assert list(pd.read_csv(out / "performance.csv").columns) == list(
        monitoring.PERFORMANCE_COLUMNS
    )
    flags = pd.read_parquet(out / "studies.parquet").set_index("accession_number")["flag"]
    said = {k: text == DEMO_REPORTS[1][0] for k, text in reports(score)}
    expected = sum(flags[k] != p for k, p in said.items())
    assert len(pd.read_parquet(out / "discrepancies.parquet")) == expected > 0

    # March's reports are rewritten and no longer agree; no film is new
    export = write_reports(tmp_path / "ris.csv", reports(score, shuffled_month="202603"))
    with Opened(archive, monkeypatch) as opened:
        status, printed, _, manifest = run(archive, out, export, capsys)
    assert status == 0 and opened.beyond_pictures == set()
    assert manifest["files_processed"] == 0
    changed = manifest["monitoring"]["reports_labelled_this_run"]
    assert 0 < changed < PER_MONTH, "only the changed reports are labelled again"
    warning = [line for line in printed.splitlines() if line.startswith("WARNING: performance")]
    assert len(warning) == 1 and "2026-03-01" in warning[0], printed
    march = pd.read_parquet(out / "performance.parquet").iloc[-1]
    assert abs(march["auc"] - 0.5) < 0.25 and march["auc_high"] < 0.99
    found = pd.read_parquet(out / "discrepancies.parquet")
    assert set(found["discrepancy"]) == {monitoring.FLAGGED_NORMAL, monitoring.MISSED_PNEUMONIA}
    flagged = found[found["discrepancy"] == monitoring.FLAGGED_NORMAL]["score"]
    assert flagged.is_monotonic_decreasing and (found["report_label"] != "uncertain").all()
    assert not {"report", "text", "evidence"} & set(found.columns), "no report text"
    page = (out / "report.html").read_text()
    assert (
        "Performance against the radiologists' reports" in page and "WARNING: performance" in page
    )


def test_a_small_bad_period_does_not_warn() -> None:
    rng = np.random.default_rng(0)
    good = pd.DataFrame(
        {
            "study_date": ["2026-01-10"] * 60,
            "label": [0, 1] * 30,
            "score": np.r_[[0.1, 0.9] * 30] + rng.normal(0, 0.01, 60),
        }
    )
    bad = pd.DataFrame(  # February: inverted, but 6 studies
        {"study_date": ["2026-02-10"] * 6, "label": [0, 1] * 3, "score": [0.9, 0.1] * 3}
    )
    assert monitoring.performance_warning(pd.concat([good, bad]), "month") is None
    worse = pd.DataFrame(
        {"study_date": ["2026-02-10"] * 30, "label": [0, 1] * 15, "score": [0.9, 0.1] * 15}
    )
    assert monitoring.performance_warning(pd.concat([good, worse]), "month") is not None
    weeks = monitoring.period_starts(pd.Series(["2026-01-04", "2026-01-05", "bad"]), "week")
    assert [str(d.date()) if pd.notna(d) else None for d in weeks] == [
        "2025-12-29",
        "2026-01-05",
        None,
    ]


def test_a_bad_reports_file_keeps_the_last_good_files_and_exits_1(
    hospital: dict[str, Path], tmp_path: Path, capsys
) -> None:
    archive, out = hospital["archive"], tmp_path / "out"
    shutil.copytree(hospital["out"], out)
    folder = tmp_path / "ris"
    folder.mkdir()
    write_reports(folder / "2026-01.csv", reports(scores(out)))
    assert run(archive, out, folder, capsys)[0] == 0
    kept = {name: (out / name).read_bytes() for name in ("performance.csv", "discrepancies.csv")}
    bad = folder / "2026-02.csv"
    bad.write_text('accession_number,report\nMON000001,"unterminated\n', encoding="utf-8")
    status, _, err, manifest = run(archive, out, folder, capsys)
    assert status == 1
    assert err.count("\n") == 1 and "2026-02.csv" in err and "line 2" in err, err
    assert manifest["monitoring"]["error"] and manifest["counts_by_status"]["scored"] == 120
    assert {name: (out / name).read_bytes() for name in kept} == kept
    assert "could not be used" in (out / "report.html").read_text()
    assert main(["scan", str(archive), "--out", str(out), "--reports-file", "/nonexistent"]) == 2


def test_the_cron_wrapper_mails_the_performance_warning(
    hospital: dict[str, Path], tmp_path: Path
) -> None:
    archive, out = hospital["archive"], tmp_path / "out"
    shutil.copytree(hospital["out"], out)
    export = write_reports(tmp_path / "ris.csv", reports(scores(out), shuffled_month="202603"))
    config = tmp_path / "batchscan.toml"
    config.write_text(
        f'archive = "{archive}"\nout = "{out}"\nworkers = 0\nreports_file = "{export}"\n'
    )
    done = nightly(config, tmp_path / "log")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("WARNING: performance") and done.stdout.count("\n") == 1


def monitor_studies(
    tmp_path: Path, frame: pd.DataFrame, said: np.ndarray, period: str
) -> monitoring.Monitored:
    """:func:`monitoring.monitor` on studies (``accession_number``, ``study_date``,
    ``score``; flagged at 0.5) whose reports say pneumonia where `said` is true, with the
    real labeler."""
    normal, pneumonia = DEMO_REPORTS[0][0], DEMO_REPORTS[1][0]
    rows = [
        (a, pneumonia if p else normal)
        for a, p in zip(frame["accession_number"], said, strict=True)
    ]
    studies = [
        (f"1.2.826.0.1.39.{i}", r.accession_number, r.study_date, r.score, r.score >= 0.5)
        for i, r in enumerate(frame.itertuples())
    ]
    return monitoring.monitor(
        write_reports(tmp_path / "ris.csv", rows),
        tmp_path / LABELS_DB,
        studies,
        period=period,
        threshold=0.5,
        model_version="test",
    )


def test_a_month_that_has_just_begun_does_not_silence_the_warning(tmp_path: Path) -> None:
    """The check that found the defect: 400 CR studies, March's reports agreeing with the
    films, April's shuffled among April's studies, and April's dates running to 3 May, so
    that the newest month holds a handful of studies. The warning judges April, the most
    recent month that holds enough studies, and says so."""
    rng = np.random.default_rng(39)
    n = 400
    score = rng.uniform(0.0, 1.0, n)
    march = [f"2026-03-{1 + i % 31:02d}" for i in range(n // 2)]
    april = [  # 1 April to 3 May: the last 6 % of April's studies fall in May
        (pd.Timestamp("2026-04-01") + pd.Timedelta(days=int(33 * i / (n // 2)))).date().isoformat()
        for i in range(n // 2)
    ]
    frame = pd.DataFrame(
        {
            "accession_number": [f"CR{i:06d}" for i in range(n)],
            "study_date": march + april,
            "score": score,
        }
    )
    agree = score >= np.median(score)
    said = agree.copy()
    said[n // 2 :] = rng.permutation(agree[n // 2 :])
    done = monitor_studies(tmp_path, frame, said, "month")
    perf = done.performance.set_index(done.performance["period_start"].astype(str))
    assert list(perf.index) == ["2026-03-01", "2026-04-01", "2026-05-01"]
    assert perf.loc["2026-05-01", "n_labelled"] < 2 * monitoring.MIN_PER_CLASS
    assert perf.loc["2026-04-01", "auc"] <= 0.70 < perf.loc["2026-03-01", "auc"]
    assert done.warning is not None, "a month that has just begun silenced the warning"
    assert done.warning.startswith("WARNING: performance: the month from 2026-04-01 ")
    assert "the month from 2026-05-01 holds fewer" in done.warning, done.warning


def _daily(days: int, per_day: int, wrong_share: list[float], seed: int = 0) -> pd.DataFrame:
    """Labelled studies of `days` days from 1 March 2026, `per_day` a day, of which the
    share `wrong_share[day]` is flagged against its report label."""
    rng = np.random.default_rng(seed)
    rows = []
    for day in range(days):
        label = rng.integers(0, 2, per_day)
        wrong = rng.random(per_day) < wrong_share[day]
        flagged = (label == 1) != wrong
        score = np.where(flagged, 0.75, 0.25) + rng.uniform(-0.2, 0.2, per_day)
        date = (pd.Timestamp("2026-03-01") + pd.Timedelta(days=day)).date().isoformat()
        rows += [(date, int(y), float(s)) for y, s in zip(label, score, strict=True)]
    return pd.DataFrame(rows, columns=["study_date", "label", "score"])


def test_the_disagreement_alarm_needs_seven_days_in_a_row_above_the_band() -> None:
    steady = [0.10] * 50
    table = monitoring.disagreement(_daily(50, 100, steady), "day", threshold=0.5)
    assert table["reference"].sum() == monitoring.REFERENCE_PERIODS["day"] == 28
    assert table.loc[~table["reference"], "band"].between(0.15, 0.25).all()
    assert monitoring.disagreement_warning(table, "day") is None

    run, before = monitoring.DISAGREEMENT_RUN, 30
    shifted = [0.10] * before + [0.35] * run
    table = monitoring.disagreement(_daily(before + run, 100, shifted), "day", threshold=0.5)
    assert table["above"].tail(run).all()
    assert table["above"].head(before).sum() <= 3, "a day above the band by chance is no alarm"
    warning = monitoring.disagreement_warning(table, "day")
    assert warning is not None and warning.startswith("WARNING: performance: ")
    assert f"in {run} consecutive days" in warning and "2026-03-31 to 2026-04-06" in warning
    one_short = monitoring.disagreement(
        _daily(before + run - 1, 100, shifted), "day", threshold=0.5
    )
    assert monitoring.disagreement_warning(one_short, "day") is None

    # a day of few labelled studies (a Sunday) neither breaks the run nor extends it
    frame = _daily(before + run, 100, shifted)
    sunday = (pd.Timestamp("2026-04-05")).date().isoformat()
    kept = frame[(frame["study_date"] != sunday) | (frame.index % 10 == 0)]
    table = monitoring.disagreement(kept, "day", threshold=0.5)
    assert monitoring.disagreement_warning(table, "day") is None, "only six counted days"
    table = monitoring.disagreement(
        pd.concat([kept, _daily(before + run + 1, 100, [*shifted, 0.35])[-100:]]), "day", 0.5
    )
    assert monitoring.disagreement_warning(table, "day") is not None


def test_monitoring_prints_the_disagreement_alarm_beside_the_auc_alarm(tmp_path: Path) -> None:
    frame = _daily(40, 60, [0.1] * 30 + [0.45] * 10, seed=3)
    frame["accession_number"] = [f"D{i:06d}" for i in range(len(frame))]
    done = monitor_studies(tmp_path, frame, frame["label"].to_numpy() == 1, "day")
    assert done.disagreement_warning is not None
    assert done.warnings == tuple(w for w in (done.warning, done.disagreement_warning) if w)
    perf = done.performance
    assert {"disagreement", "disagreement_band"} <= set(perf.columns)
    assert (perf["disagreement"].tail(10) > perf["disagreement_band"].tail(10)).all()
