"""Reports: ``images.parquet``, ``studies.parquet``, ``studies.csv`` and ``manifest.json``.

Dashboards poll REPORT_DIR, so a reader must never see a half-written file: every report is
written to a hidden temporary file in REPORT_DIR named by the run
(:func:`batchscan.storage.files.temporary_path`), and the scan publishes them all at the
end (:func:`batchscan.storage.files.publish`: fsync, mode, an atomic rename, fsync of the
folder). The rows come from the incremental state (:mod:`batchscan.results.state`) in
chunks and stream into the temporary files in row groups, so memory does not grow with the
archive; the previous reports stay in place until the run ends. ``runs.parquet`` holds the
run history, one row per run.

The Arrow schemas are explicit: every column has its type, none is ``object``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any, Final

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batchscan import VERSION_COLUMNS
from batchscan.storage.files import temporary_path

IMAGES_SCHEMA: Final = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("path_bytes", pa.binary()),
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
        pa.field("modality_source", pa.string()),
        pa.field("decoder", pa.string()),
        pa.field("decode_scale", pa.int32()),
        pa.field("accession_number", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("patient_age_years", pa.float64()),
        pa.field("patient_sex", pa.string()),
        pa.field("manufacturer", pa.string()),
        pa.field("manufacturer_model", pa.string()),
        pa.field("age_group", pa.string()),
        pa.field("in_domain", pa.bool_()),
        pa.field("size", pa.int64()),
        pa.field("mtime_ns", pa.int64()),
        pa.field("score", pa.float64()),
        pa.field("ood_score", pa.float64()),
        pa.field("ood", pa.bool_()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("shadow_score", pa.float64()),
        # added after the columns dashboards read by position, so no position moves
        pa.field("photometric", pa.string()),
        pa.field("pixel_spacing_mm", pa.float64()),
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
        pa.field("age_group", pa.string()),
        pa.field("in_domain", pa.bool_()),
        pa.field("accession_number", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("modality", pa.string()),
        pa.field("manufacturer", pa.string()),
        pa.field("manufacturer_model", pa.string()),
        pa.field("patient_sex", pa.string()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("shadow_score", pa.float64()),
        pa.field("shadow_flag", pa.bool_()),
        pa.field("shadow_model_version", pa.string()),
    ]
)

RUNS_SCHEMA: Final = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("started_at", pa.string(), nullable=False),
        pa.field("finished_at", pa.string()),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("files_found", pa.int64()),
        pa.field("files_processed", pa.int64()),
        pa.field("files_reused", pa.int64()),
        pa.field("files_removed", pa.int64()),
        pa.field("scored", pa.int64()),
        pa.field("skipped", pa.int64()),
        pa.field("failed", pa.int64()),
        pa.field("images_scored_this_run", pa.int64()),
        pa.field("images_per_second", pa.float64()),
        pa.field("seconds", pa.float64()),
        pa.field("model_version", pa.string()),
        pa.field("code_version", pa.string()),
        pa.field("studies", pa.int64()),
        pa.field("studies_flagged", pa.int64()),
        pa.field("studies_in_domain", pa.int64()),
        pa.field("studies_out_of_domain", pa.int64()),
        pa.field("studies_domain_unknown", pa.int64()),
        pa.field("device", pa.string()),
        *(pa.field(name, pa.string()) for name in VERSION_COLUMNS),
        pa.field("row_keys", pa.string()),
    ]
)

#: performance.parquet/csv (``--reports-file``): the model against the reports, per period.
PERFORMANCE_SCHEMA: Final = pa.schema(
    [
        pa.field("period_start", pa.date32(), nullable=False),
        pa.field("n_labelled", pa.int64(), nullable=False),
        pa.field("n_pneumonia", pa.int64(), nullable=False),
        pa.field("auc", pa.float64()),
        pa.field("auc_low", pa.float64()),
        pa.field("auc_high", pa.float64()),
        pa.field("sensitivity", pa.float64()),
        pa.field("specificity", pa.float64()),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("disagreement", pa.float64()),
        pa.field("disagreement_band", pa.float64()),
    ]
)
#: discrepancies.parquet/csv: studies the model and the report disagree on (no report text).
DISCREPANCIES_SCHEMA: Final = pa.schema(
    [
        pa.field("discrepancy", pa.string(), nullable=False),
        pa.field("accession_number", pa.string()),
        pa.field("study_date", pa.date32()),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("flag", pa.bool_(), nullable=False),
        pa.field("report_label", pa.string(), nullable=False),
        pa.field("report_reason", pa.string()),
        pa.field("study_instance_uid", pa.string(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)
#: drift.parquet/csv (:mod:`batchscan.site.drift`): each period of study date against the
#: reference, one row per signal. ``statistic`` is a share's change or a KS distance,
#: ``threshold`` the value it had to exceed at this ``n`` (the Bonferroni level, or the
#: smallest change that matters), ``p_value`` Bonferroni-corrected over the signal's tests,
#: ``significant`` past the threshold in this period, ``alarm`` also in the periods before
#: it that persistence asks for, ``reference`` a period of the reference.
DRIFT_SCHEMA: Final = pa.schema(
    [
        pa.field("period_start", pa.date32(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),
        pa.field("statistic", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("p_value", pa.float64()),
        pa.field("n", pa.int64(), nullable=False),
        pa.field("significant", pa.bool_(), nullable=False),
        pa.field("alarm", pa.bool_(), nullable=False),
        pa.field("reference", pa.bool_(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

IMAGES_FILE: Final = "images.parquet"
STUDIES_FILE: Final = "studies.parquet"
STUDIES_CSV: Final = "studies.csv"
MANIFEST_FILE: Final = "manifest.json"
RUNS_FILE: Final = "runs.parquet"


def with_patient_key(schema: pa.Schema, enabled: bool) -> pa.Schema:
    """`schema` with a ``patient_key`` column before ``model_version`` when pseudonymisation
    is configured; without a key the column does not exist at all."""
    if not enabled:
        return schema
    position = schema.get_field_index("model_version")
    return schema.insert(position, pa.field("patient_key", pa.string()))


def _write_parquet(
    parts: Iterable[dict[str, list[Any]]], schema: pa.Schema, final: Path, run_id: str
) -> tuple[Path, Path]:
    """Stream column chunks into a temporary Parquet file; returns (temporary, final)."""
    temporary = temporary_path(final, run_id)
    with pq.ParquetWriter(temporary, schema, compression="zstd") as writer:
        for part in parts:
            writer.write_table(_table(part, schema))
    return temporary, final


def _table(part: dict[str, list[Any]], schema: pa.Schema) -> pa.Table:
    columns = {}
    for field in schema:
        values = part[field.name]
        if field.type == pa.date32():  # stored as ISO text; anything else is no date
            values = [_date(v) for v in values]
        columns[field.name] = values
    return pa.Table.from_pydict(columns, schema=schema)


def _date(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def write_images(
    parts: Iterable[dict[str, list[Any]]], out_dir: Path, run_id: str, *, patient_key: bool
) -> tuple[Path, Path]:
    """Write ``images.parquet`` (to a temporary file) from column chunks of file rows.

    Streams: memory holds one chunk, whatever the size of the archive.
    """
    schema = with_patient_key(IMAGES_SCHEMA, patient_key)
    return _write_parquet(parts, schema, out_dir / IMAGES_FILE, run_id)


def _write_parquet_and_csv(
    parts: Iterable[dict[str, list[Any]]], schema: pa.Schema, out_dir: Path, stem: str, run_id: str
) -> list[tuple[Path, Path]]:
    """Stream column chunks into ``<stem>.parquet`` and ``<stem>.csv`` (same rows, same
    columns) as temporary files; returns their (temporary, final) pairs."""
    parquet_final, csv_final = out_dir / f"{stem}.parquet", out_dir / f"{stem}.csv"
    parquet_tmp, csv_tmp = temporary_path(parquet_final, run_id), temporary_path(csv_final, run_id)
    with (
        pq.ParquetWriter(parquet_tmp, schema, compression="zstd") as parquet,
        pacsv.CSVWriter(csv_tmp, schema) as csv,
    ):
        for part in parts:
            table = _table(part, schema)
            parquet.write_table(table)
            csv.write_table(table)
    return [(parquet_tmp, parquet_final), (csv_tmp, csv_final)]


def write_studies(
    parts: Iterable[dict[str, list[Any]]], out_dir: Path, run_id: str, *, patient_key: bool
) -> list[tuple[Path, Path]]:
    """Write the studies as Parquet and CSV (same rows, same columns) to temporary files;
    returns their (temporary, final) pairs."""
    flags = ("flag", "shadow_flag")  # SQLite keeps 0/1
    return _write_parquet_and_csv(
        (
            dict(part, **{n: [None if f is None else bool(f) for f in part[n]] for n in flags})
            for part in parts
        ),
        with_patient_key(STUDIES_SCHEMA, patient_key),
        out_dir,
        STUDIES_FILE.removesuffix(".parquet"),
        run_id,
    )


def write_frame(
    frame: pd.DataFrame, schema: pa.Schema, out_dir: Path, stem: str, run_id: str
) -> list[tuple[Path, Path]]:
    """Write a small report table as ``<stem>.parquet`` and ``<stem>.csv`` (same rows, same
    columns) to temporary files; returns their (temporary, final) pairs."""
    values = frame[list(schema.names)].astype(object)
    values = values.where(values.notna(), None)
    columns = {
        field.name: [  # dates go in as ISO text, as the state keeps them
            str(v) if v is not None and field.type == pa.date32() else v for v in values[field.name]
        ]
        for field in schema
    }
    return _write_parquet_and_csv([columns], schema, out_dir, stem, run_id)


def write_runs(columns: dict[str, list[Any]], out_dir: Path, run_id: str) -> tuple[Path, Path]:
    """Write the run history ``runs.parquet`` to a temporary file."""
    return _write_parquet([columns], RUNS_SCHEMA, out_dir / RUNS_FILE, run_id)


def write_manifest(manifest: dict[str, Any], out_dir: Path, run_id: str) -> tuple[Path, Path]:
    """Write the run manifest JSON to a temporary file; returns (temporary, final)."""
    final = out_dir / MANIFEST_FILE
    temporary = temporary_path(final, run_id)
    temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return temporary, final


def period_label(start: date, period: str) -> str:
    """How a monitoring period (:mod:`batchscan.site.monitoring`) is named on report.html
    (``2026-01-15``, ``2026-W03`` or ``2026-01``)."""
    if period == "day":
        return start.isoformat()
    if period == "week":
        year, week, _ = start.isocalendar()
        return f"{year}-W{week:02d}"
    return f"{start.year}-{start.month:02d}"
