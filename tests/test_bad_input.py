"""Broken input: every case a recorded reason, never an exception out of a stage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchscan.ingest.dicom import decode_record
from batchscan.ingest.discover import iter_files
from batchscan.ingest.header import StageOptions, read_header
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph
from tests.conftest import real_file


def _run(root: Path) -> dict[str, tuple[str, str | None]]:
    out = {}
    for record in iter_files(root):
        read_header(record, StageOptions())
        if decode_record(record, StageOptions()) is not None:
            record.status = "scored"
        out[record.path] = (record.status, record.reason)
    return out


def test_broken_files_are_recorded(tmp_path: Path) -> None:
    good = write_radiograph(tmp_path / "good", chest_phantom(128), RadiographSpec())
    data = good.read_bytes()
    (tmp_path / "truncated_in_pixels").write_bytes(data[: len(data) - 2000])
    (tmp_path / "truncated_in_header").write_bytes(data[:300])
    (tmp_path / "garbage").write_bytes(os.urandom(4096))
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "text.txt").write_text("hello")
    rg1 = real_file("RG1_J2KR.dcm").read_bytes()
    (tmp_path / "rg1_truncated").write_bytes(rg1[: len(rg1) // 2])
    result = _run(tmp_path)
    assert result["good"] == ("scored", None)
    assert result["truncated_in_pixels"] == ("failed", "truncated_pixel_data")
    assert result["truncated_in_header"][0] == "failed"
    assert result["garbage"] == ("skipped", "not_dicom")
    assert result["empty"] == ("skipped", "empty_file")
    assert result["text.txt"] == ("skipped", "not_dicom")
    assert result["rg1_truncated"][0] == "failed"


def test_file_deleted_after_listing(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "gone", chest_phantom(64), RadiographSpec())
    records = list(iter_files(tmp_path))
    path.unlink()
    read_header(records[0], StageOptions())
    assert (records[0].status, records[0].reason) == ("failed", "unreadable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read mode-000 files")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write_radiograph(tmp_path / "locked", chest_phantom(64), RadiographSpec())
    path.chmod(0)
    assert _run(tmp_path)["locked"] == ("failed", "unreadable")


def test_rust_codec_panic_is_a_decode_error(tmp_path: Path) -> None:
    """Found by the atheris harness: RLE runs that overrun their segment make pylibjpeg-rle
    panic; pyo3's PanicException is a BaseException and must still become a reason."""
    import struct

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    path = write_radiograph(
        tmp_path / "rle", chest_phantom(48), RadiographSpec(transfer_syntax=RLELossless)
    )
    ds = pydicom.dcmread(path)
    segment = bytes([0x81, 0x00]) * 20  # 20 runs of 128 bytes: more than a 48 x 48 segment
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])
    ds.save_as(path)
    # the panic is caught and the next plugin tried: pydicom's own RLE decoder reads the
    # frame (warning about the padding), so the file is scored rather than lost
    from batchscan.ingest.decoders.pydicom_plugins import decode

    assert decode(None, pydicom.dcmread(path), 0).decoder == "pydicom:pydicom"
    assert _run(tmp_path)["rle"] == ("scored", None)
