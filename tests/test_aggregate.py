"""Per-study aggregation: max over frontal images, fallbacks, counts."""

from __future__ import annotations

import pandas as pd

from batchscan.results.aggregate import aggregate_studies


def _rows(*rows: tuple) -> pd.DataFrame:
    columns = ["study_instance_uid", "status", "score", "view", "accession_number", "study_date"]
    return pd.DataFrame(list(rows), columns=columns)


def test_study_score_is_max_over_frontal_images() -> None:
    images = _rows(
        ("1", "scored", 0.2, "PA", "A1", "20260101"),
        ("1", "scored", 0.7, "AP", "A1", "20260101"),
        ("1", "skipped", None, "LL", "A1", "20260101"),
        ("2", "scored", 0.1, "PA", None, "20260102"),
        ("2", "scored", 0.9, "LL", None, "20260102"),  # a lateral under --all-modalities
        ("3", "scored", 0.6, "unknown", "A3", None),
        ("4", "skipped", None, "LL", "A4", None),  # nothing scored: no study row
        (None, "failed", None, None, None, None),
    )
    studies = aggregate_studies(images, threshold=0.5, model_version="m-1").set_index(
        "study_instance_uid"
    )
    assert list(studies.index) == ["1", "2", "3"]
    assert studies.loc["1", "score"] == 0.7 and studies.loc["1", "flag"]
    assert studies.loc["1", "n_images_scored"] == 2 and studies.loc["1", "n_images_total"] == 3
    assert studies.loc["1", "views"] == "AP,LL,PA"
    assert studies.loc["2", "score"] == 0.1 and not studies.loc["2", "flag"]
    assert studies.loc["2", "score_basis"] == "frontal"
    assert studies.loc["3", "score"] == 0.6 and studies.loc["3", "score_basis"] == "all_scored"
    assert studies.loc["1", "accession_number"] == "A1"
    assert (studies["model_version"] == "m-1").all()


def test_flag_at_threshold_is_inclusive() -> None:
    images = _rows(("1", "scored", 0.5, "PA", None, None))
    assert aggregate_studies(images, 0.5, "m")["flag"].iloc[0]


def test_no_scored_images_gives_empty_table() -> None:
    images = _rows(("1", "skipped", None, "LL", None, None))
    assert aggregate_studies(images, 0.5, "m").empty
