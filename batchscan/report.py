"""Reports: ``images.parquet``, ``studies.parquet``, ``studies.csv`` and ``manifest.json``.

Dashboards poll REPORT_DIR, so a reader must never see a half-written file: every report is
written to a hidden temporary file in REPORT_DIR (same filesystem), flushed to disk and then
moved over the old one with ``os.replace``, which is atomic on POSIX. The image rows stream
into their temporary Parquet file in row groups while the run goes on, so memory does not
grow with the archive; the previous reports stay in place until the run ends.

The Arrow schemas are explicit: every column has its type, none is ``object``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchscan.records import ImageRecord

IMAGES_SCHEMA: Final = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
        pa.field("study_instance_uid", pa.string()),
        pa.field("series_instance_uid", pa.string()),
        pa.field("sop_instance_uid", pa.string()),
        pa.field("sop_class_uid", pa.string()),
        pa.field("modality", pa.string()),
        pa.field("body_part", pa.string()),
        pa.field("view", pa.string()),
        pa.field("view_source", pa.string()),
        pa.field("transfer_syntax_uid", pa.string()),
        pa.field("rows", pa.int32()),
        pa.field("columns", pa.int32()),
        pa.field("voi_source", pa.string()),
        pa.field("decode_scale", pa.int32()),
        pa.field("accession_number", pa.string()),
        pa.field("study_date", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("score", pa.float64()),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

STUDIES_SCHEMA: Final = pa.schema(
    [
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("flag", pa.bool_(), nullable=False),
        pa.field("score_basis", pa.string(), nullable=False),
        pa.field("n_images_scored", pa.int64(), nullable=False),
        pa.field("n_images_total", pa.int64(), nullable=False),
        pa.field("views", pa.string()),
        pa.field("accession_number", pa.string()),
        pa.field("study_date", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

IMAGES_FILE: Final = "images.parquet"
STUDIES_FILE: Final = "studies.parquet"
STUDIES_CSV: Final = "studies.csv"
MANIFEST_FILE: Final = "manifest.json"

_RECORD_FIELDS: Final = {f.name for f in fields(ImageRecord)}
_IMAGE_COLUMNS: Final = [name for name in IMAGES_SCHEMA.names if name != "model_version"]
assert set(_IMAGE_COLUMNS) <= _RECORD_FIELDS


def temporary_path(final: Path, run_id: str) -> Path:
    """The hidden temporary file that becomes `final` when the run ends."""
    return final.with_name(f".{final.name}.{run_id}.tmp")


def remove_temporaries(out_dir: Path, run_id: str | None = None) -> None:
    """Delete the temporary report files of `run_id` (of every run when None).

    Called with the REPORT_DIR lock held: at the start of a run it clears what a killed run
    left behind; after a failure it clears this run's own.
    """
    pattern = f".*.{run_id}.tmp" if run_id else ".*.tmp"
    for path in out_dir.glob(pattern):
        path.unlink(missing_ok=True)


def publish(temporary: Path, final: Path) -> None:
    """Flush `temporary` to disk and move it over `final` atomically."""
    with temporary.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class ImagesWriter:
    """Streams image rows into a temporary Parquet file, in row groups.

    Parameters
    ----------
    out_dir:
        REPORT_DIR.
    run_id:
        Names the temporary file, so two runs never share one.
    model_version:
        Written on every row.
    row_group:
        Rows buffered before a row group is written.
    """

    def __init__(self, out_dir: Path, run_id: str, model_version: str, row_group: int = 8192):
        self.final = out_dir / IMAGES_FILE
        self.temporary = temporary_path(self.final, run_id)
        self.model_version = model_version
        self.row_group = row_group
        self._rows: list[ImageRecord] = []
        self._writer = pq.ParquetWriter(self.temporary, IMAGES_SCHEMA, compression="zstd")
        self.rows_written = 0

    def add(self, records: Iterable[ImageRecord]) -> None:
        """Queue finished records; writes a row group when enough are queued."""
        self._rows.extend(records)
        if len(self._rows) >= self.row_group:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        columns: dict[str, list[Any]] = {
            name: [getattr(r, name) for r in self._rows] for name in _IMAGE_COLUMNS
        }
        columns["model_version"] = [self.model_version] * len(self._rows)
        self._writer.write_table(pa.Table.from_pydict(columns, schema=IMAGES_SCHEMA))
        self.rows_written += len(self._rows)
        self._rows = []

    def close(self) -> Path:
        """Write what is queued and close; returns the temporary file (not yet published)."""
        self._flush()
        self._writer.close()
        return self.temporary

    def abort(self) -> None:
        """Close and delete the temporary file (the previous report stays)."""
        try:
            self._writer.close()
        finally:
            self.temporary.unlink(missing_ok=True)


def study_table(studies: pd.DataFrame) -> pa.Table:
    """The studies frame as an Arrow table of :data:`STUDIES_SCHEMA`."""
    return pa.Table.from_pandas(studies, schema=STUDIES_SCHEMA, preserve_index=False)


def write_studies(table: pa.Table, out_dir: Path, run_id: str) -> list[tuple[Path, Path]]:
    """Write the studies as Parquet and CSV to temporary files; returns (temporary, final)."""
    parquet_final, csv_final = out_dir / STUDIES_FILE, out_dir / STUDIES_CSV
    parquet_tmp, csv_tmp = temporary_path(parquet_final, run_id), temporary_path(csv_final, run_id)
    pq.write_table(table, parquet_tmp, compression="zstd")
    pacsv.write_csv(table, csv_tmp)
    return [(parquet_tmp, parquet_final), (csv_tmp, csv_final)]


def write_manifest(manifest: dict[str, Any], out_dir: Path, run_id: str) -> tuple[Path, Path]:
    """Write the run manifest JSON to a temporary file; returns (temporary, final)."""
    final = out_dir / MANIFEST_FILE
    temporary = temporary_path(final, run_id)
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return temporary, final


def read_images(path: Path, columns: list[str] | None = None) -> pd.DataFrame:
    """Read an images report (or its temporary file) back as pandas."""
    return pq.read_table(path, columns=columns).to_pandas()
