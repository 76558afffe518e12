"""Ages, age groups and the training-domain judgement of every image."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from pydicom.dataset import Dataset

from batchscan.domain import Domain, age_group, judge
from batchscan.header import patient_age_years
from batchscan.model import check_model
from batchscan.pipeline import ScanConfig
from batchscan.records import ImageRecord
from batchscan.scan import run_scan
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
    run_scan(ScanConfig(archive=archive, out=out, workers=1, jit_compile=False))
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
