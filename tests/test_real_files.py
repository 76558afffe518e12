"""Every real file shipped by pydicom and pydicom-data passes all ingest stages cleanly."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from batchscan.ingest.dicom import decode_record
from batchscan.ingest.discover import iter_files
from batchscan.ingest.header import StageOptions, read_header
from batchscan.ingest.preprocess import preprocess


def _ingest(root: Path, options: StageOptions) -> list:
    records = []
    for record in iter_files(root):
        read_header(record, options)
        image = decode_record(record, options)
        if image is not None:
            tensor = preprocess(image.pixels)
            assert tensor.shape == (64, 64, 3)
            record.status = "scored"
        assert record.status in {"scored", "skipped", "failed"}, record
        assert (record.reason is None) == (record.status == "scored"), record
        records.append(record)
    return records


@pytest.mark.parametrize("all_modalities", [False, True])
def test_every_real_file_gets_a_status(
    pydicom_test_files: Path, pydicom_data_files: Path, all_modalities: bool
) -> None:
    options = StageOptions(all_modalities=all_modalities)
    records = _ingest(pydicom_test_files, options) + _ingest(pydicom_data_files, options)
    by_name = {Path(r.path).name: r for r in records}
    counts = Counter(r.status for r in records)
    assert len(records) > 150
    for name in ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm"):
        assert by_name[name].status == "scored", by_name[name]
    assert by_name["MR_truncated.dcm"].reason in {"truncated_pixel_data", "modality:MR"}
    if all_modalities:
        assert counts["scored"] > 50
        assert by_name["CT_small.dcm"].status == "scored"
    else:
        assert counts["scored"] == 4  # the four RG1 chest radiographs and nothing else
        assert by_name["CT_small.dcm"].reason == "modality:CT"
        assert by_name["RG3_UNCR.dcm"].status == "skipped"
