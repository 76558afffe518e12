"""Ages, age groups and the training-domain judgement of every image."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pydicom.dataset import Dataset

from batchscan.engines.pipeline import ScanConfig
from batchscan.ingest.domain import Domain, age_group, judge
from batchscan.ingest.header import patient_age_years
from batchscan.ingest.records import ImageRecord
from batchscan.scan import run_scan
from batchscan.scoring.model import check_model
from batchscan.synth import RadiographSpec, build_dataset, chest_phantom, stored_values

CARD_DOMAIN = Domain.from_card(check_model().card)


def _ds(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("age", "years"),
    [("003D", 0.01), ("006W", 0.11), ("018M", 1.5), ("004Y", 4.0), ("045Y", 45.0), ("095Y", 90.0)],
)
def test_age_from_patient_age_in_every_unit(age: str, years: float) -> None:
    assert patient_age_years(_ds(PatientAge=age)) == years


def test_age_from_birth_and_study_dates() -> None:
    assert patient_age_years(_ds(PatientBirthDate="20210615", StudyDate="20260614")) == 5.0
    assert patient_age_years(_ds(PatientBirthDate="19200101", StudyDate="20260101")) == 90.0
    assert patient_age_years(_ds(PatientBirthDate="20300101", StudyDate="20260101")) is None
    assert patient_age_years(_ds(PatientBirthDate="garbage", StudyDate="20260101")) is None
    assert patient_age_years(_ds(PatientAge="4 years")) is None  # not an AS value
    # PatientAge wins over the dates
    assert patient_age_years(_ds(PatientAge="002Y", PatientBirthDate="19500101")) == 2.0


def test_age_groups() -> None:
    assert [age_group(a) for a in (None, 0.5, 17.99, 18.0, 90.0)] == [
        None,
        "child",
        "child",
        "adult",
        "adult",
    ]


def _record(modality: str | None, view: str | None, age: float | None) -> ImageRecord:
    record = ImageRecord(path="x", abs_path="x", modality=modality, view=view)
    record.patient_age_years = age
    return judge(record, CARD_DOMAIN)


def test_in_domain_against_the_shipped_card() -> None:
    assert CARD_DOMAIN is not None and CARD_DOMAIN.max_age == 5.0
    assert "AP" in CARD_DOMAIN.views and "CR" in CARD_DOMAIN.modalities
    assert _record("CR", "AP", 3.0).in_domain is True
    assert _record("DX", "AP", 5.9).in_domain is True  # whole years: 5
    assert _record("CR", "AP", 45.0).in_domain is False  # an adult
    assert _record("CR", "PA", 3.0).in_domain is False  # a view it never saw
    assert _record("CT", "AP", 3.0).in_domain is False  # --all-modalities
    assert _record("CR", "AP", None).in_domain is None  # cannot be decided
    assert _record("CR", "unknown", 3.0).in_domain is None
    assert _record("CR", "unknown", 45.0).in_domain is False  # outside whatever the view
    adult = _record("CR", "AP", 45.0)
    assert adult.age_group == "adult"
    no_card = judge(ImageRecord(path="x", abs_path="x", modality="CR", view="AP"), None)
    assert no_card.in_domain is None


@pytest.mark.slow
def test_scan_reports_age_and_domain(tmp_path: Path) -> None:
    archive, out = tmp_path / "archive", tmp_path / "out"
    archive.mkdir()
    cases = {"child": ("AP", "004Y"), "adult": ("PA", "052Y"), "unknown": ("AP", "")}
    for name, (view, age) in cases.items():
        spec = RadiographSpec(view=view, accession=name)
        ds = build_dataset(stored_values(chest_phantom(256, seed=1), spec), spec)
        ds.PatientAge = age
        ds.PatientBirthDate = ""  # only PatientAge tells
        ds.save_as(archive / name, enforce_file_format=True)
    result = run_scan(ScanConfig(archive=archive, out=out, workers=1, jit_compile=False))
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert images.loc["child", ["patient_age_years", "age_group", "in_domain"]].tolist() == [
        4.0,
        "child",
        True,
    ]
    assert images.loc["adult", ["age_group", "in_domain"]].tolist() == ["adult", False]
    assert pd.isna(images.loc["unknown", "in_domain"])
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "images.parquet")
    assert str(schema.field("in_domain").type) == "bool"
    assert str(schema.field("patient_age_years").type) == "double"
    assert "PatientBirthDate" not in images.columns

    # study rows, the counts of the summary line, the manifest and runs.parquet
    studies = pd.read_parquet(out / "studies.parquet").set_index("accession_number")
    assert studies.loc["child", ["age_group", "in_domain"]].tolist() == ["child", True]
    assert studies.loc["adult", ["age_group", "in_domain"]].tolist() == ["adult", False]
    assert pd.isna(studies.loc["unknown", "in_domain"])
    assert str(pq.read_schema(out / "studies.parquet").field("in_domain").type) == "bool"
    counts = {k: result.manifest[k] for k in ("studies_in_domain", "studies_out_of_domain")}
    assert counts == {"studies_in_domain": 1, "studies_out_of_domain": 1}
    assert result.manifest["studies_domain_unknown"] == 1
    assert "1 in the model's training domain, 1 outside, 1 undecided" in result.summary
    runs = pd.read_parquet(out / "runs.parquet")
    assert runs.iloc[-1][["studies", "studies_in_domain", "studies_out_of_domain"]].tolist() == [
        3,
        1,
        1,
    ]
    csv = pd.read_csv(out / "studies.csv").set_index("accession_number")
    assert csv.loc["adult", "in_domain"] in (False, "false")

    # --out-of-domain skip: the adult is skipped with its reason; the others are as before
    skipped = run_scan(
        ScanConfig(archive=archive, out=out, workers=1, jit_compile=False, out_of_domain="skip")
    )
    images = pd.read_parquet(out / "images.parquet").set_index("path")
    assert images.loc["adult", ["status", "reason"]].tolist() == ["skipped", "out_of_domain:view"]
    assert "age 52 years" in images.loc["adult", "detail"]
    assert images.loc["child", "status"] == "scored"
    assert skipped.manifest["studies_out_of_domain"] == 0 and skipped.manifest["studies"] == 2


def test_study_in_domain_rests_on_the_scored_images() -> None:
    from batchscan.results.aggregate import aggregate_studies

    columns = ["study_instance_uid", "status", "score", "view", "accession_number"]
    rows = [
        ("1", "scored", 0.2, "AP", "A", True, "child"),
        ("1", "scored", 0.9, "AP", "A", False, "child"),  # one outside: the study is
        ("1", "skipped", None, "LL", "A", False, "child"),
        ("2", "scored", 0.2, "AP", "B", True, None),
        ("2", "scored", 0.4, "LL", "B", False, None),  # not what the score rests on
        ("3", "scored", 0.2, "AP", "C", None, "adult"),
    ]
    images = pd.DataFrame(rows, columns=[*columns, "in_domain", "age_group"])
    images["study_date"] = None
    studies = aggregate_studies(images, 0.5, "m").set_index("study_instance_uid")
    assert studies["in_domain"].tolist() == [False, True, None]
    assert studies["age_group"].tolist() == ["child", None, "adult"]


def test_state_of_an_older_batchscan_gets_the_new_columns(tmp_path: Path) -> None:
    import sqlite3

    from batchscan.results.state import RUN_COLUMNS, StateStore

    path = tmp_path / "state.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE studies (study_instance_uid TEXT PRIMARY KEY, score REAL NOT NULL, "
        "flag INTEGER NOT NULL, score_basis TEXT NOT NULL, n_images_scored INTEGER NOT NULL,"
        " n_images_total INTEGER NOT NULL, views TEXT, accession_number TEXT, study_date TEXT,"
        " patient_key TEXT, model_version TEXT NOT NULL) WITHOUT ROWID;"
        "CREATE TABLE runs (run_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, "
        "started_at TEXT NOT NULL, outcome TEXT NOT NULL) WITHOUT ROWID;"
        "INSERT INTO runs VALUES ('old', 1, '2026-01-01', 'ok');"
    )
    db.commit()
    db.close()
    state = StateStore(path)
    assert state.study_counts()["studies_in_domain"] == 0
    assert list(state.run_rows()) == list(RUN_COLUMNS)
    assert state.run_rows()["studies_in_domain"] == [None]
    state.close()
