"""Every real file shipped by pydicom and pydicom-data passes all the scan's stages cleanly:
a real ``batchscan scan`` over both folders (header, training domain, decode, preprocess,
the stability check, the blank gate, inference and the duplicate check), every file one row
with a status, and a reason exactly when it is not scored."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import scan_rows


@pytest.mark.parametrize("all_modalities", [False, True])
def test_every_real_file_gets_a_status(
    pydicom_test_files: Path, pydicom_data_files: Path, tmp_path: Path, all_modalities: bool
) -> None:
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "pydicom").symlink_to(pydicom_test_files, target_is_directory=True)
    (archive / "pydicom_data").symlink_to(pydicom_data_files, target_is_directory=True)
    extra = ["--all-modalities"] if all_modalities else []
    rows = scan_rows(archive, tmp_path / "out", "--workers", "2", *extra)
    assert len(rows) > 150
    for path, (status, reason) in rows.items():
        assert status in {"scored", "skipped", "failed"}, path
        assert (reason is None) == (status == "scored"), path
    by_name = {Path(path).name: row for path, row in rows.items()}
    counts = Counter(status for status, _ in rows.values())
    radiographs = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
    for name in radiographs:  # one picture in four syntaxes: one SOP instance, kept once
        status, reason = by_name[name]
        assert status == "scored" or reason.startswith("duplicate_of:pydicom_data/RG1_"), name
    assert sum(by_name[name][0] == "scored" for name in radiographs) == 3
    assert by_name["MR_truncated.dcm"][1] in {"truncated_pixel_data", "modality:MR"}
    if all_modalities:
        assert counts["scored"] > 50
        assert by_name["CT_small.dcm"][0] == "scored"
    else:
        assert counts["scored"] == 3  # the RG1 chest radiograph (three of its four files)
        assert by_name["CT_small.dcm"][1] == "modality:CT"
        assert by_name["RG3_UNCR.dcm"][0] == "skipped"
