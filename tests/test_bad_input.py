"""Broken input: every case a recorded reason, never an exception out of a stage; each
through the scan itself (a real ``batchscan scan``, or the scan's own per-file function)."""

from __future__ import annotations

import os
from pathlib import Path

from batchscan.engines.pipeline import prepare_record
from batchscan.ingest.discover import iter_files
from batchscan.ingest.header import StageOptions
from batchscan.synth import RadiographSpec, chest_phantom, write_radiograph
from tests.conftest import real_file, scan_rows, scan_rows_unprivileged


def test_broken_files_are_recorded(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    good = write_radiograph(archive / "good", chest_phantom(128), RadiographSpec())
    data = good.read_bytes()
    (archive / "truncated_in_pixels").write_bytes(data[: len(data) - 2000])
    (archive / "truncated_in_header").write_bytes(data[:300])
    (archive / "garbage").write_bytes(os.urandom(4096))
    (archive / "empty").write_bytes(b"")
    (archive / "text.txt").write_text("hello")
    rg1 = real_file("RG1_J2KR.dcm").read_bytes()
    (archive / "rg1_truncated").write_bytes(rg1[: len(rg1) // 2])
    result = scan_rows(archive, tmp_path / "out")
    assert result["good"] == ("scored", None)
    assert result["truncated_in_pixels"] == ("failed", "truncated_pixel_data")
    assert result["truncated_in_header"][0] == "failed"
    assert result["garbage"] == ("skipped", "not_dicom")
    assert result["empty"] == ("skipped", "empty_file")
    assert result["text.txt"] == ("skipped", "not_dicom")
    assert result["rg1_truncated"][0] == "failed"


def test_file_deleted_after_listing(tmp_path: Path) -> None:
    """Gone between the walk and the read: the scan's stability check skips it for the
    next run (the archive may still be moving it), rather than failing it."""
    path = write_radiograph(tmp_path / "gone", chest_phantom(64), RadiographSpec())
    records = list(iter_files(tmp_path))
    path.unlink()
    assert prepare_record(records[0], StageOptions()) is None
    assert (records[0].status, records[0].reason) == ("skipped", "unstable")


def test_unreadable_file(open_folder: Path) -> None:
    """A file its user may not read is failed as unreadable and the rest is scanned: the
    scan runs without privileges (as root, as in CI, it drops them: tests/conftest.py)."""
    archive = open_folder / "archive"
    archive.mkdir()
    path = write_radiograph(archive / "locked", chest_phantom(64), RadiographSpec())
    write_radiograph(archive / "ct", chest_phantom(64), RadiographSpec(modality="CT", view=None))
    (archive / "notes.txt").write_text("hello")
    archive.chmod(0o755)  # whatever umask an earlier scan in this process left
    for readable in archive.iterdir():
        readable.chmod(0o644)
    path.chmod(0)
    rows = scan_rows_unprivileged(archive, open_folder / "out")
    assert rows == {
        "locked": ("failed", "unreadable"),
        "ct": ("skipped", "modality:CT"),  # read: the user reads what it may
        "notes.txt": ("skipped", "not_dicom"),
    }


def test_rust_codec_panic_is_a_decode_error(tmp_path: Path) -> None:
    """Found by the atheris harness: RLE runs that overrun their segment make pylibjpeg-rle
    panic; pyo3's PanicException is a BaseException and must still become a reason."""
    import struct

    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    path = write_radiograph(
        tmp_path / "archive" / "rle", chest_phantom(48), RadiographSpec(transfer_syntax=RLELossless)
    )
    ds = pydicom.dcmread(path)
    segment = bytes([0x81, 0x00]) * 20  # 20 runs of 128 bytes: more than a 48 x 48 segment
    header = struct.pack("<16I", 2, 64, 64 + len(segment), *([0] * 13))
    ds.PixelData = encapsulate([header + segment + segment])
    ds.save_as(path)
    # the panic is caught and the next plugin tried: pydicom's own RLE decoder reads the
    # frame (warning about the padding); the runs paint one grey level, so the scan's blank
    # gate skips the picture with its reason: recorded, not lost, and not scored
    from batchscan.ingest.decoders.pydicom_plugins import decode

    assert decode(None, pydicom.dcmread(path), 0).decoder == "pydicom:pydicom"
    rows = scan_rows(tmp_path / "archive", tmp_path / "out")
    assert rows == {"rle": ("skipped", "blank_image")}
