"""``batchscan evaluate``: labels files, the figures, the pages, and the card's test AUC
reproduced through the whole pipeline."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.scoring.model import check_model
from batchscan.site import metrics
from batchscan.site.evaluate import (
    LabelsError,
    group_metrics,
    read_labels,
    summary,
    threshold_for_sensitivity,
)
from batchscan.site.metrics import roc_auc
from batchscan.synth import write_demo_archive, write_labelled_studies, write_labels


def _labels(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_labels_in_every_spelling_with_duplicates_and_conflicts(tmp_path: Path) -> None:
    labels = read_labels(
        _labels(
            tmp_path,
            "Accession_Number,label,comment\nA1,1,x\nA2, Normal ,\nA3,PNEUMONIA,\n"
            "A1,1,again\nA4,0,\nA4,1,changed mind\n\n",
        )
    )
    assert labels.key == "accession_number" and labels.rows == 6
    assert labels.values == {"A1": 1, "A2": 0, "A3": 1}
    assert labels.duplicates == ["A1"] and labels.conflicts == ["A4"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty file"),
        ("accession_number,label\n", "no labels"),
        ("patient,label\nP1,1\n", "line 1: the header must name"),
        ("accession_number,study_instance_uid,label\nA,1.2,1\n", "exactly one"),
        ("accession_number,label\nA1,1\nA2,maybe\n", "line 3: label 'maybe'"),
        ("accession_number,label\nA1,1\nA2,0,extra\n", "line 3: 3 fields"),
        ("study_instance_uid,label\n ,1\n", "line 2: empty study_instance_uid"),
    ],
)
def test_bad_labels_files_are_refused_with_the_line(
    tmp_path: Path, text: str, problem: str
) -> None:
    with pytest.raises(LabelsError, match=re.escape(problem)):
        read_labels(_labels(tmp_path, text))


def test_not_utf8_labels_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_bytes(b"accession_number,label\nA1,1\nCAF\xe9,0\n")
    with pytest.raises(LabelsError, match="line 3: not UTF-8"):
        read_labels(path)


def test_figures_at_a_threshold_and_for_a_target_sensitivity() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.2, 0.1, 0.05])
    g = group_metrics(y, s, threshold=0.5, target=0.75)
    assert (g.sensitivity, g.specificity) == (0.75, 5 / 6)
    assert (g.ppv, g.npv) == (0.75, 5 / 6)
    assert g.auc == metrics.roc_auc(y, s)
    assert g.target_threshold == 0.6 and g.target_sensitivity_reached == 0.75
    assert threshold_for_sensitivity(y, s, 1.0) == 0.3
    assert threshold_for_sensitivity(y, s, 0.9) == 0.3  # 0.9 x 4 positives: all four
    one_class = group_metrics(np.zeros(3), np.array([0.1, 0.2, 0.9]), 0.5, 0.9)
    assert one_class.auc is None and one_class.sensitivity is None
    assert one_class.specificity == 2 / 3


@pytest.mark.slow
def test_evaluate_the_demo_from_the_command_line(tmp_path: Path, capsys) -> None:
    archive, reports, out = tmp_path / "archive", tmp_path / "reports", tmp_path / "eval"
    write_demo_archive(archive, size=256, studies=6)
    labels = archive / "labels.csv"
    with labels.open("a") as handle:  # a label for no study, and a conflict
        handle.write("ACC9999,1\nACC1000,1\n")
    assert main(["scan", str(archive), "--out", str(reports), "--workers", "0"]) == 0
    capsys.readouterr()
    code = main(["evaluate", str(reports), "--labels", str(labels), "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "evaluation.json").read_text())
    studies = pd.read_parquet(reports / "studies.parquet")
    assert result["overall"]["n"] == 5  # ACC1000 has both labels: left out
    assert result["labels"]["conflicts"] == ["ACC1000"]
    assert result["labels"]["matching_no_scored_study"] == ["ACC9999"]
    assert result["scored_studies"] == len(studies)
    flags = studies.set_index("accession_number")["flag"]
    truth = {f"ACC{1000 + i}": i % 2 for i in range(1, 6)}
    tp = sum(bool(flags[a]) and t == 1 for a, t in truth.items())
    assert result["overall"]["sensitivity"] == tp / sum(truth.values())
    assert "labels matching no scored study: 1" in printed
    page = (out / "evaluation.html").read_text()
    for section in ("Overall", "Subgroups", "by manufacturer", "Accounting of the labels"):
        assert section in page
    assert page.count("<svg") == 3  # ROC, calibration, histograms
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls <= {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}  # XML names
    for secret in ("DEMO^PATIENT", "DEMO0000", "19700101"):
        assert secret not in page and secret not in json.dumps(result)
    # bad labels and a folder with no reports: one line, exit 2
    bad = _labels(tmp_path, "accession_number,label\nA,2\n")
    assert main(["evaluate", str(reports), "--labels", str(bad)]) == 2
    assert "line 2" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no batchscan reports" in err
    bad_target = ["--target-sensitivity", "1.5"]
    assert main(["evaluate", str(reports), "--labels", str(labels), *bad_target]) == 2
    # The loop from reports: the demo's reports give its labels, the hedged one uncertain.
    from_reports = tmp_path / "from_reports.csv"
    assert main(["labels", str(archive / "reports.csv"), "--out", str(from_reports)]) == 0
    assert "6 reports: 2 pneumonia, 3 normal, 1 uncertain" in capsys.readouterr().out
    made = pd.read_csv(from_reports).set_index("accession_number")
    assert made.loc["ACC1003", "label"] == "uncertain"
    for i in (0, 1, 2, 4, 5):
        assert made.loc[f"ACC{1000 + i}", "label"] == ("pneumonia" if i % 2 else "normal")
    assert main(["evaluate", str(reports), "--labels", str(from_reports), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 labelled scored studies (2 pneumonia, 3 normal)" in printed
    assert "uncertain labels: 1 rows, left out (1 of them scored studies)" in printed
    ones = ["--uncertain", "pneumonia", "--out", str(out)]
    assert main(["evaluate", str(reports), "--labels", str(from_reports), *ones]) == 0
    assert "6 labelled scored studies (3 pneumonia, 3 normal)" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.shared_data
def test_evaluate_reproduces_the_card_test_auc_through_dicom(
    npz_path: Path, tmp_path: Path, capsys
) -> None:
    """The PneumoniaMNIST test split written as one-image DICOM studies, scanned and
    evaluated by its accession numbers, gives the AUC the card quotes (within 0.01)."""
    with np.load(npz_path) as data:
        images, labels = data["test_images"], data["test_labels"].reshape(-1)
    archive, reports = tmp_path / "archive", tmp_path / "reports"
    rows = write_labelled_studies(archive, images, labels, prefix="PM", ages=["003Y"] * len(labels))
    labels_file = write_labels(tmp_path / "labels.csv", rows)
    assert main(["scan", str(archive), "--out", str(reports), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(reports), "--labels", str(labels_file)]) == 0
    result = json.loads((reports / "evaluation.json").read_text())
    card = check_model().card
    assert result["overall"]["n"] == len(labels) == card["metrics"]["test_n"]
    assert abs(result["overall"]["auc"] - card["test_auc"]) <= 0.01
    assert abs(result["overall"]["sensitivity"] - card["test_sensitivity"]) <= 0.02
    assert abs(result["overall"]["specificity"] - card["test_specificity"]) <= 0.02
    assert set(result["subgroups"]["in_domain"]) == {"true"}  # AP, CR, age 3


def test_shortcut_checks_warn_when_the_view_predicts_the_labels() -> None:
    from batchscan.site.evaluate import render_html, shortcut_checks

    rng = np.random.default_rng(0)
    n = 400
    y = rng.random(n) < 0.5
    # sick patients filmed AP far more often: the view alone predicts the label
    ap = np.where(y, rng.random(n) < 0.75, rng.random(n) < 0.25)
    scores = 0.6 * ap + 0.4 * rng.random(n)  # a model that mostly read the view
    studies = pd.DataFrame(
        {
            "view": np.where(ap, "AP", "PA"),
            "modality": "DX",
            "manufacturer": rng.choice(["A", "B"], n),
            "manufacturer_model": None,
            "patient_sex": rng.choice(["F", "M"], n),
            "age_group": "adult",
        }
    )
    overall = roc_auc(y, scores)
    checks = shortcut_checks(studies, y.astype(int), scores, overall)
    view = checks["attributes"]["view"]
    assert view["attribute_auc"] == pytest.approx(0.75, abs=0.05)
    assert view["within_auc"] == pytest.approx(0.5, abs=0.08)
    assert view["warning"]
    assert len(checks["warnings"]) == 2  # the view alone, and the drop within views
    assert not checks["attributes"]["patient_sex"]["warning"]
    assert checks["attributes"]["modality"]["attribute_auc"] == 0.5
    assert checks["attributes"]["manufacturer_model"]["values"] == 1  # all unknown
    result = {
        "report_dir": "r",
        "model": {"version": "m", "threshold": 0.5, "threshold_rule": "t"},
        "scan_run_id": "x",
        "target_sensitivity": 0.9,
        "labels": {
            "key": "accession_number",
            "rows": n,
            "distinct_keys": n,
            "duplicates": [],
            "conflicts": [],
            "matching_no_scored_study": [],
            "matching_several_studies": [],
        },
        "scored_studies": n,
        "scored_studies_without_label": [],
        "overall": asdict(group_metrics(y, scores, 0.5, 0.9)),
        "subgroups": {},
        "shortcuts": checks,
        "points": {"label": y.astype(int).tolist(), "score": scores.tolist()},
    }
    page = render_html(result)
    assert '<div class="warn"><h2>Shortcut check: warning</h2>' in page
    assert page.count('<tr class="flag">') == 1
    printed = summary(result)
    assert printed.count("WARNING: ") == 2 and "view alone predicts the labels" in printed


def test_shortcut_warnings_need_evidence() -> None:
    """A figure from few studies, or from an attribute whose values each hold a handful of
    studies, is printed but does not warn (issue: "manufacturer alone predicts the labels
    at AUC 1.000" from 5 studies)."""
    from batchscan.site.evaluate import shortcut_checks

    few = pd.DataFrame(
        {"view": "PA", "modality": "CR", "manufacturer": list("ABCDE"),
         "manufacturer_model": None, "patient_sex": "M", "age_group": "adult"}
    )  # fmt: skip
    y = np.array([1, 1, 0, 0, 0])
    checks = shortcut_checks(few, y, np.array([0.9, 0.8, 0.3, 0.2, 0.1]), 1.0)
    assert checks["attributes"]["manufacturer"]["attribute_auc"] == 1.0
    assert checks["warnings"] == [] and not checks["enough_to_warn"]
    result = {"shortcuts": checks}
    assert "too few labelled studies to warn" in "\n".join(_shortcut_lines(result))

    rng = np.random.default_rng(1)
    n = 400
    labels = (rng.random(n) < 0.5).astype(int)
    many = pd.DataFrame(
        {"view": rng.choice(["AP", "PA"], n), "modality": "DX",
         "manufacturer": [f"serial {i}" for i in rng.integers(0, 150, n)],
         "manufacturer_model": None, "patient_sex": rng.choice(["F", "M"], n),
         "age_group": "adult"}
    )  # fmt: skip
    scores = rng.random(n)
    checks = shortcut_checks(many, labels, scores, roc_auc(labels, scores))
    assert checks["attributes"]["manufacturer"]["attribute_auc"] > 0.7  # in sample, by chance
    assert checks["warnings"] == [], checks["warnings"]


def _shortcut_lines(result: dict) -> list[str]:
    from batchscan.site.evaluate import summary as evaluate_summary

    full = {
        "report_dir": "r",
        "model": {"version": "m", "threshold": 0.5, "threshold_rule": "t"},
        "scan_run_id": "x",
        "target_sensitivity": 0.9,
        "labels": {"key": "accession_number", "rows": 5, "distinct_keys": 5, "duplicates": [],
                   "conflicts": [], "matching_no_scored_study": [],
                   "matching_several_studies": []},
        "scored_studies": 5,
        "scored_studies_without_label": [],
        "overall": asdict(group_metrics(np.array([1, 0]), np.array([0.9, 0.1]), 0.5, 0.9)),
        "subgroups": {},
        "points": {"label": [], "score": []},
        **result,
    }  # fmt: skip
    return evaluate_summary(full).splitlines()
