"""``batchscan train``: examples through the scan's stages, a patient split, the card, the
cache, and ``scan --model`` scoring with the new model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.discover import iter_files
from batchscan.evaluate import read_labels
from batchscan.site_training import archive_fingerprint, collect, split_by_patient
from batchscan.synth import RadiographSpec, chest_phantom, write_labels, write_radiograph


def _archive(root: Path, patients: int = 24, studies_per_patient: int = 2) -> Path:
    """Phantoms: half the patients with a pneumonia-like opacity on every study; a lateral
    per study (not an example); children and adults."""
    rows = []
    for p in range(patients):
        sick = p % 2
        for k in range(studies_per_patient):
            accession = f"T{p:03d}{k}"
            uid = f"2.25.{7 * 10**15 + 10 * p + k}"
            for j, view in enumerate(("AP", "LL")):
                spec = RadiographSpec(
                    view=view,
                    study_uid=uid,
                    accession=accession,
                    patient_id=f"PAT{p:04d}",
                    patient_age=f"{3 + p % 40:03d}Y",
                    window=(2048, 4096),
                )
                picture = chest_phantom(96, seed=100 * p + 10 * k + j, opacity=0.9 * sick)
                write_radiograph(root / accession / f"IM{j}", picture, spec)
            rows.append((accession, sick))
    write_labels(root.parent / "labels.csv", rows)
    return root


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _archive(tmp_path_factory.mktemp("train") / "archive")


def test_split_keeps_each_patient_on_one_side(archive: Path) -> None:
    labels = read_labels(archive.parent / "labels.csv")
    records = list(iter_files(archive))
    examples = collect(
        archive,
        records,
        archive_fingerprint(records),
        labels,
        workers=0,
        pseudonym_key=None,
        seed=1,
    )
    assert len(examples.inputs) == 48  # the frontal image of each labelled study
    assert examples.accounting["not scored: view:LL"] == 48
    split = split_by_patient(examples, seed=1)
    for group in np.unique(examples.group):
        assert len(set(split[examples.group == group])) == 1
    assert len(np.unique(examples.group)) == 24  # patients, told apart without their ID
    assert set(split) == {"train", "val", "test"}
    assert split_by_patient(examples, seed=1).tolist() == split.tolist()  # seeded


@pytest.mark.slow
def test_train_writes_model_card_cache_and_scan_uses_it(
    archive: Path, tmp_path: Path, capsys
) -> None:
    labels, models = archive.parent / "labels.csv", tmp_path / "models"
    before = sorted((p, p.stat().st_mtime_ns) for p in archive.rglob("*"))
    argv = ["train", str(archive), "--labels", str(labels), "--out", str(models)]
    fast = ["--epochs", "2", "--workers", "1", "--no-progress"]
    assert main([*argv, *fast]) == 0
    printed = capsys.readouterr().out
    assert "cache written" in printed and "local test AUC" in printed
    card = json.loads((models / "site_cnn.json").read_text())
    assert card["mode"] == "fine_tune"
    assert card["base_model"]["version"].startswith("pneumonia_cnn_seed-")
    splits = card["training_data"]["splits"]
    assert sum(s["studies"] for s in splits.values()) == 48
    assert sum(s["patients"] for s in splits.values()) == 24
    assert card["split"]["seed"] == 1234 and "PAT0" not in json.dumps(card)
    assert card["domain"]["views"] == ["AP"] and card["domain"]["age_years"] == [3, 26]
    assert card["domain"]["manufacturers"] == {"BATCHSCAN": splits["train"]["images"]}
    assert {"test_auc", "test_auc_ci95", "test_sensitivity"} <= set(card["metrics"])
    assert card["training_data"]["archive_fingerprint"]
    assert (models / "site_cnn.ood.npz").is_file() and card["ood"]["file"] == "site_cnn.ood.npz"
    cache = np.load(models / "site_cnn.inputs.npz")
    assert "PAT0" not in str(cache["study"]) and cache["inputs"].shape == (48, 64, 64)
    # a second run decodes nothing
    assert main([*argv, *fast, "--from-scratch", "--name", "site_cnn"]) == 0
    assert "cache reused" in capsys.readouterr().out
    assert json.loads((models / "site_cnn.json").read_text())["mode"] == "from_scratch"
    # the new model scores
    out = tmp_path / "reports"
    model = models / "site_cnn.keras"
    assert main(["scan", str(archive), "--out", str(out), "--model", str(model)]) == 0
    images = pd.read_parquet(out / "images.parquet")
    assert set(images["model_version"]) == {f"site_cnn-{card_sha(models)}"}
    assert images.loc[images["status"] == "scored", "in_domain"].all()  # its own domain
    # the archive was only read
    assert sorted((p, p.stat().st_mtime_ns) for p in archive.rglob("*")) == before


def card_sha(models: Path) -> str:
    return json.loads((models / "site_cnn.json").read_text())["model_sha256"][:12]


def test_too_few_studies_per_class_is_refused(tmp_path: Path, capsys) -> None:
    archive = _archive(tmp_path / "archive", patients=6, studies_per_patient=1)
    argv = ["train", str(archive), "--labels", str(tmp_path / "labels.csv")]
    assert main([*argv, "--out", str(tmp_path / "m"), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "too few labelled studies to split: 3 pneumonia and 3 normal" in err
    assert err.count("\n") == 1
