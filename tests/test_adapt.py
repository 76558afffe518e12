"""``batchscan adapt``: from a scan's REPORT_DIR and its reports to a site model and a
verdict, on the demo archive and on a simulated hospital built from the shared data; nothing
dated after ``--until`` is learned from."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from common import levers
from common.hospitals import REPORT_TEXTS, kermany_hospital

from batchscan.cli import main
from batchscan.scoring.model import check_model, load_model
from batchscan.site import adapt
from batchscan.site.evaluate import SHORTCUT_ATTRIBUTES
from batchscan.synth import write_reports
from tests.conftest import ROOT
from tests.test_input_store import Opened

KERMANY = ROOT.parent / "shared" / "data" / "kermany_224"
UNTIL = "2025-12-31"


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo archive with 60 studies (dated through 2026), scanned with its reports."""
    root = tmp_path_factory.mktemp("adapt_demo")
    archive, out = root / "archive", root / "reports"
    assert main(["demo", str(archive), "--studies", "60", "--size", "128"]) == 0
    argv = ["scan", str(archive), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main([*argv, "--reports-file", str(archive / "reports.csv")]) == 0
    return {"archive": archive, "out": out, "root": root}


def test_adapt_runs_on_the_demo_and_says_too_few_later_studies(
    demo_scan: dict[str, Path], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    capsys.readouterr()
    with Opened(demo_scan["archive"], monkeypatch) as opened:
        status = main(
            ["adapt", str(demo_scan["out"]), "--until", "2026-08-31", "--out", str(models),
             "--epochs", "3", "--no-progress"]
        )  # fmt: skip
    printed = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    assert opened.beyond_pictures == set(), "every input comes from the scan's input store"
    assert printed[-1].startswith("adapt: do not deploy site_cnn-")
    assert "too few later studies" in printed[-1]
    result = json.loads((models / "adaptation.json").read_text())
    assert result["verdict"]["deploy"] is False
    assert result["periods"]["training"]["last_date"] <= "2026-08-31"
    assert result["periods"]["later"]["first_date"] > "2026-08-31"
    card = check_model(models / "site_cnn.keras").card
    assert card["training_data"]["study_dates"]["until"] == "2026-08-31"
    assert card["training_data"]["study_dates"]["latest_used"] <= "2026-08-31"
    assert card["training_data"]["studies"] == result["periods"]["training"]["studies"] > 20
    page = (models / "adaptation.html").read_text()
    assert "do not deploy" in page and "<svg" in page
    for outside in ('src="http', 'href="http', "<script"):  # offline: nothing fetched
        assert outside not in page


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "M"], "--until"),
        (["--until", "2026-13-01", "--out", "M"], "not a date"),
        (["--until", "2026-01-01", "--out", "M", "--reports-file", "nowhere.csv"], "not found"),
    ],
)
def test_bad_arguments_are_refused_with_one_line(
    demo_scan: dict[str, Path], tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    argv = [str(tmp_path / a) if a in ("M", "nowhere.csv") else a for a in argv]
    with pytest.raises(SystemExit) as raised:
        raise SystemExit(main(["adapt", str(demo_scan["out"]), *argv]))
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and message in err[0], err


def test_a_folder_without_a_scan_or_without_labels_is_refused(
    demo_scan: dict[str, Path], tmp_path: Path, capsys
) -> None:
    assert (
        main(["adapt", str(tmp_path), "--until", "2026-01-01", "--out", str(tmp_path / "m")]) == 2
    )
    assert "holds no finished batchscan scan" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(demo_scan["out"], unlabelled)
    (unlabelled / "report_labels.sqlite").unlink()
    assert (
        main(["adapt", str(unlabelled), "--until", "2026-08-31", "--out", str(tmp_path / "m")]) == 2
    )
    assert "no report labels" in capsys.readouterr().err
    inside = ["--until", "2026-08-31", "--out", str(demo_scan["archive"] / "models")]
    assert main(["adapt", str(demo_scan["out"]), *inside]) == 2
    assert "inside the archive" in capsys.readouterr().err
    assert not (demo_scan["archive"] / "models").exists()
    # the labels can come from a reports file given to adapt itself
    too_early = ["--until", "2026-01-31", "--out", str(tmp_path / "m")]
    assert main(["adapt", str(unlabelled), *too_early, "--reports-file",
                 str(demo_scan["archive"] / "reports.csv")]) == 2  # fmt: skip
    assert "too few labelled studies" in capsys.readouterr().err


def test_the_verdict_needs_a_gain_beyond_chance_overall_and_within_views() -> None:
    rng = np.random.default_rng(0)
    n = 200
    y = rng.random(n) < 0.5
    views = np.where(rng.random(n) < 0.5, "AP", "PA")
    later = pd.DataFrame({"label": y.astype(int), "view": views, "score": rng.random(n)})
    for name in SHORTCUT_ATTRIBUTES:
        if name != "view":
            later[name] = "x"
    models = ({"version": "old", "threshold": 0.5}, {"version": "new", "threshold": 0.5})
    good = np.clip(y * 0.4 + rng.random(n) * 0.6, 0, 1)
    measured = adapt.measure(later, good, *models)
    assert adapt.verdict(measured, "new")["deploy"] is True
    noise = rng.random(n)
    said = adapt.verdict(adapt.measure(later, noise, *models), "new")
    assert said["deploy"] is False and "not better than the model in use" in said["line"]
    # a new model that only ranks the views, where the view tracks the label
    views = np.where(y, "AP", "PA")
    views[:40] = np.where(y[:40], "PA", "AP")
    by_view = later.assign(view=views)
    said = adapt.verdict(adapt.measure(by_view, (views == "AP") * 0.5 + noise * 0.1, *models), "n")
    assert said["deploy"] is False and "within views" in said["line"]
    few = adapt.verdict(adapt.measure(later.iloc[:30], good[:30], *models), "new")
    assert few["deploy"] is False and "too few later studies" in few["line"]


# -- a simulated hospital from the shared data -------------------------------------------


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shifted hospital of jobs/common/hospitals.py (inverted, flattened Kermany films the
    shipped model reads backwards), 150 studies in 2025 and 150 in 2026, scanned with its
    reports and a pseudonym key."""
    if not (KERMANY / "labels.csv").is_file():
        pytest.skip(f"needs the shared data at {KERMANY}; CI has it")
    root = tmp_path_factory.mktemp("hospital")
    archive, reports = kermany_hospital(KERMANY, "shifted", root, limit=150)
    key = root / "key"
    key.write_bytes(b"k" * 32)
    out = root / "reports"
    assert main(["scan", str(archive), "--out", str(out), "--reports-file", str(reports),
                 "--pseudonym-key-file", str(key), "--no-progress"]) == 0  # fmt: skip
    return {"archive": archive, "reports": reports, "out": out, "root": root}


def _texts(reports: Path) -> dict[str, str]:
    with reports.open(newline="", encoding="utf-8") as handle:
        return {row["accession_number"]: row["report"] for row in csv.DictReader(handle)}


def _later(out: Path) -> set[str]:
    studies = pd.read_parquet(out / "studies.parquet")
    dates = pd.to_datetime(studies["study_date"])
    return set(studies.loc[dates > pd.Timestamp(UNTIL), "accession_number"])


def _adapt(hospital: dict[str, Path], models: Path, reports: Path | None, capsys) -> list[str]:
    capsys.readouterr()
    argv = ["adapt", str(hospital["out"]), "--until", UNTIL, "--out", str(models),
            "--epochs", "12", "--no-progress", "--workers", "0"]  # fmt: skip
    assert main([*argv, *(["--reports-file", str(reports)] if reports else [])]) == 0
    return capsys.readouterr().out.strip().splitlines()


def _weights(models: Path) -> list[np.ndarray]:
    return load_model(models / "site_cnn.keras").keras_model.get_weights()


@pytest.mark.shared_data
@pytest.mark.slow
def test_adaptation_that_helps_is_deployed_and_nothing_after_the_date_is_learned(
    hospital: dict[str, Path], tmp_path: Path, capsys
) -> None:
    printed = _adapt(hospital, tmp_path / "a", None, capsys)
    assert printed[-1].startswith("adapt: deploy site_cnn-"), printed
    result = json.loads((tmp_path / "a" / "adaptation.json").read_text())
    c = result["measured"]["comparison"]
    assert c["model_in_use"]["auc"] < 0.5 < 0.7 < c["shadow"]["auc"]
    assert set(result["measured"]["by_view"]) == {"AP", "PA"}
    # Kermany's file names give some patients studies in both periods: those later
    # studies are left out of the measurement, so every later study counted is a new patient
    left_out = result["accounting"]["later images of patients in the training period (left out)"]
    assert result["patients_known"] and result["measured"]["n"] + left_out == 150

    # every later report says the opposite now: the same weights are learned (the later
    # studies are only measured), and measured against reversed labels the model is no
    # longer better than the one in use
    texts, later = _texts(hospital["reports"]), _later(hospital["out"])
    normal, pneumonia = set(REPORT_TEXTS[0]), set(REPORT_TEXTS[1])
    opposite = {t: REPORT_TEXTS[0][0] for t in pneumonia} | {t: REPORT_TEXTS[1][0] for t in normal}
    flipped = [(a, opposite[t] if a in later else t) for a, t in texts.items()]
    assert later and all(t in normal | pneumonia for t in texts.values())
    reports = write_reports(tmp_path / "flipped.csv", flipped)
    printed = _adapt(hospital, tmp_path / "b", reports, capsys)
    for a, b in zip(_weights(tmp_path / "a"), _weights(tmp_path / "b"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert printed[-1].startswith("adapt: do not deploy"), printed[-1]


@pytest.mark.shared_data
@pytest.mark.slow
def test_adaptation_on_shuffled_labels_is_not_deployed(
    hospital: dict[str, Path], tmp_path: Path, capsys
) -> None:
    texts = _texts(hospital["reports"])
    order = np.random.default_rng(3).permutation(len(texts))
    values = list(texts.values())
    shuffled = [(a, values[i]) for a, i in zip(texts, order, strict=True)]
    reports = write_reports(tmp_path / "shuffled.csv", shuffled)
    printed = _adapt(hospital, tmp_path / "m", reports, capsys)
    assert printed[-1].startswith("adapt: do not deploy"), printed[-1]
    assert "not better than the model in use" in printed[-1]


def test_the_ensemble_lever_makes_one_model_file_that_scans_explains_and_adapts_again(
    demo_scan: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """An ensemble of two (``Levers.ensemble`` of jobs/common/levers.py, the lever
    jobs/experiments/adapt_levers.py measures): one file of two seed CNNs that the scan, its
    OOD check and its maps take as they take one; the lever adapts again from it member by
    member and refuses to pretrain it; ``batchscan adapt``, which trains the seed
    architecture only, refuses it as a base with one line."""
    models = tmp_path / "models"
    request = adapt.AdaptRequest(
        report_dir=demo_scan["out"],
        until=adapt.parse_until("2026-08-31"),
        out=models,
        epochs=2,
        workers=0,
    )
    levers.adapt(request, levers.Levers(ensemble=2))
    card = check_model(models / "site_cnn.keras").card
    assert card["architecture"]["members"] == 2
    assert [m["seed"] for m in card["ensemble"]["runs"]] == [1234, 2234]
    assert card["ensemble"]["members"] == 2
    assert load_model(models / "site_cnn.keras").keras_model.get_layer("conv2").groups == 2
    out = tmp_path / "rescan"
    scan = ["scan", str(demo_scan["archive"]), "--out", str(out), "--workers", "0"]
    assert main([*scan, "--no-progress", "--model", str(models / "site_cnn.keras")]) == 0
    images = pd.read_parquet(out / "images.parquet")
    scored = images[images["score"].notna()]
    assert len(scored) > 50 and scored["model_version"].str.startswith("site_cnn-").all()
    assert scored["ood_score"].notna().all()
    page = (out / "report.html").read_text()
    assert page.count("data:image/jpeg;base64") >= 1, "the top flagged studies carry maps"
    again = dataclasses.replace(request, base=models / "site_cnn.keras", out=tmp_path / "m2")
    levers.adapt(again)
    assert check_model(tmp_path / "m2" / "site_cnn.keras").card["architecture"]["members"] == 2
    with pytest.raises(adapt.AdaptError, match="is an ensemble of 2"):
        levers.adapt(dataclasses.replace(again, pretrain=True, out=tmp_path / "m3"))
    capsys.readouterr()
    argv = ["--until", "2026-08-31", "--epochs", "2", "--no-progress", "--workers", "0"]
    refused = [*argv, "--base", str(models / "site_cnn.keras"), "--out", str(tmp_path / "m4")]
    assert main(["adapt", str(demo_scan["out"]), *refused]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not the seed architecture" in err[0], err
    assert not (tmp_path / "m4" / "site_cnn.keras").exists()
