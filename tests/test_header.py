"""Header pass: eligibility rules and their reasons, on generated files."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from batchscan.ingest.header import StageOptions, read_header
from batchscan.ingest.records import ImageRecord
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph
from tests.conftest import real_file

DEFAULT = StageOptions()
ALL = StageOptions(all_modalities=True)


def _classify(path: Path, options: StageOptions = DEFAULT) -> ImageRecord:
    return read_header(ImageRecord(path=path.name, abs_path=str(path)), options)


@pytest.fixture(scope="module")
def picture():
    return chest_phantom(64, seed=3)


@pytest.mark.parametrize(
    ("spec", "status", "reason", "view"),
    [
        (RadiographSpec(modality="CR", view="PA"), "pending", None, "PA"),
        (RadiographSpec(modality="DX", view="AP"), "pending", None, "AP"),
        (RadiographSpec(modality="DX", view="LL"), "skipped", "view:LL", "LL"),
        (RadiographSpec(modality="CT", view=None), "skipped", "modality:CT", None),
        (RadiographSpec(body_part="KNEE"), "skipped", "body_part:KNEE", None),
        (RadiographSpec(view=None, study_description="RÖ THORAX"), "pending", None, "unknown"),
        (
            RadiographSpec(view=None, body_part=None, study_description="CHEST LAT"),
            "skipped",
            "view:LAT",
            "LAT",
        ),
        (
            RadiographSpec(body_part=None, study_description="Hand links"),
            "skipped",
            "body_part:unknown",
            None,
        ),
    ],
)
def test_default_rules(tmp_path: Path, picture, spec, status, reason, view) -> None:
    record = _classify(write_radiograph(tmp_path / "f", picture, spec))
    assert (record.status, record.reason) == (status, reason)
    if view is not None:
        assert record.view == view
    assert record.study_instance_uid == spec.study_uid
    assert record.sop_instance_uid == spec.sop_uid


def test_view_from_view_code_sequence(tmp_path: Path, picture) -> None:
    spec = RadiographSpec(view=None, study_description="X")
    path = write_radiograph(tmp_path / "f", picture, spec)
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "R-10214", "SRT"
    item.CodeMeaning = "postero-anterior"
    ds.ViewCodeSequence = [item]
    ds.save_as(path)
    record = _classify(path)
    assert (record.status, record.view, record.view_source) == ("pending", "PA", "ViewCodeSequence")


def test_all_modalities_takes_ct_and_laterals(tmp_path: Path, picture) -> None:
    ct = write_radiograph(tmp_path / "ct", picture, RadiographSpec(modality="CT", view=None))
    lat = write_radiograph(tmp_path / "lat", picture, RadiographSpec(view="LL"))
    assert _classify(ct, ALL).status == "pending"
    assert _classify(lat, ALL).status == "pending"


def test_colour_and_multiframe_rules(pydicom_test_files: Path, pydicom_data_files: Path) -> None:
    rgb = _classify(pydicom_data_files / "SC_rgb.dcm", ALL)
    assert (rgb.status, rgb.reason) == ("skipped", "color:RGB")
    palette = _classify(pydicom_data_files / "OT-PAL-8-face.dcm", ALL)
    assert (palette.status, palette.reason) == ("skipped", "color:PALETTE_COLOR")
    multi = _classify(real_file("emri_small.dcm"), ALL)
    assert (multi.status, multi.reason) == ("skipped", "multiframe:10")


def test_dicomdir_and_non_images(pydicom_test_files: Path) -> None:
    assert _classify(pydicom_test_files / "dicomdirtests" / "DICOMDIR", ALL).reason == "dicomdir"
    sr = _classify(pydicom_test_files / "test-SR.dcm", ALL)
    assert (sr.status, sr.reason) == ("skipped", "not_an_image")


def test_too_large_is_refused_before_decoding(tmp_path: Path, picture) -> None:
    path = write_radiograph(tmp_path / "f", picture, RadiographSpec())
    record = _classify(path, StageOptions(max_pixel_bytes=1000))
    assert (record.status, record.reason) == ("failed", "too_large")


def test_absurd_geometry(tmp_path: Path, picture) -> None:
    path = write_radiograph(tmp_path / "f", picture, RadiographSpec())
    ds = pydicom.dcmread(path)
    ds.Rows = 0
    ds.save_as(path)
    assert (_classify(path).status, _classify(path).reason) == ("failed", "bad_header:rows_columns")
    ds.Rows, ds.BitsAllocated = 64, 0
    ds.save_as(path)
    assert _classify(path).reason == "bad_header:bits_allocated"
    ds.BitsAllocated, ds.BitsStored = 16, 17
    ds.save_as(path)
    assert _classify(path).reason == "bad_header:bits_stored"
    ds.BitsStored = 12
    ds.Rows, ds.Columns = 65535, 65535
    ds.save_as(path)
    record = _classify(path)
    assert (record.status, record.reason) == ("failed", "too_large")


def test_raw_dataset_without_preamble_is_read(pydicom_test_files: Path) -> None:
    for name in ("ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"):
        record = _classify(pydicom_test_files / name, ALL)
        assert record.reason != "not_dicom", name
        assert record.sop_instance_uid, name
    # a file with a stray byte before its first element is unreadable even for pydicom
    assert _classify(pydicom_test_files / "no_meta.dcm", ALL).reason == "not_dicom"


def test_study_dates_become_iso_or_nothing() -> None:
    from batchscan.ingest.header import iso_date

    assert iso_date("20260413") == "2026-04-13"
    assert iso_date("2026.04.13") == "2026-04-13"  # ACR-NEMA
    assert [iso_date(v) for v in ("", "20261340", "2026041", "garbage", "20260230")] == [None] * 5


def test_photometric_and_pixel_spacing_are_read_and_hostile_values_become_none(
    tmp_path: Path, picture
) -> None:
    """The two header facts the drift monitor watches: PixelSpacing before
    ImagerPixelSpacing, and a value no radiograph has (zero, text, 1e9) is None, never an
    error: the file is still read."""
    path = write_radiograph(tmp_path / "f", picture, RadiographSpec())
    ds = pydicom.dcmread(path)
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.save_as(path)
    record = _classify(path)
    assert (record.status, record.photometric, record.pixel_spacing_mm) == (
        "pending",
        ds.PhotometricInterpretation,
        0.139,
    )
    ds.PixelSpacing = [0.2, 0.2]
    ds.save_as(path)
    assert _classify(path).pixel_spacing_mm == 0.2
    ds.pop("ImagerPixelSpacing")
    for bad in (b"0", b"1e9", b"abc", b"-0.2"):  # written as the bytes a broken device sends
        ds["PixelSpacing"] = RawDataElement(Tag(0x00280030), "DS", len(bad), bad, 0, True, True)
        ds.save_as(path)
        record = _classify(path)
        assert (record.status, record.pixel_spacing_mm) == ("pending", None), bad
