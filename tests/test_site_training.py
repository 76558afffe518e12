"""``batchscan train``: examples through the scan's stages, a patient split, the card, the
cache, and ``scan --model`` scoring with the new model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.ingest.discover import iter_files
from batchscan.site.evaluate import read_labels
from batchscan.site.site_training import (
    Examples,
    archive_fingerprint,
    balance_weights,
    by_view,
    collect,
    split_by_patient,
)
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
    assert "local test AUC by view: AP n=" in printed
    assert card["balance"]["by"] is None and set(card["test_by_view"]["views"]) == {"AP"}
    # a second run decodes nothing
    balanced = ["--from-scratch", "--name", "site_cnn", "--balance", "view"]
    assert main([*argv, *fast, *balanced]) == 0
    printed = capsys.readouterr().out
    assert "cache reused" in printed and "examples balanced by view" in printed
    card = json.loads((models / "site_cnn.json").read_text())
    assert card["mode"] == "from_scratch" and card["balance"]["by"] == "view"
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


def _examples(labels: list[int], views: list[str]) -> Examples:
    n = len(labels)
    return Examples(
        inputs=np.zeros((n, 64, 64), np.float32),
        label=np.array(labels),
        group=np.arange(n),
        study=[f"S{i}" for i in range(n)],
        age=np.full(n, 40.0),
        view=views,
        modality=["DX"] * n,
        manufacturer=["A"] * n,
        fingerprint="f",
        files=n,
    )


def test_split_is_stratified_by_label_and_view() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(600) < 0.5).astype(int).tolist()
    # normals mostly AP, pneumonia mostly PA: the view tracks the label
    views = ["AP" if rng.random() < (0.8 if y == 0 else 0.3) else "PA" for y in labels]
    split = split_by_patient(_examples(labels, views), seed=3)
    y, v = np.array(labels), np.array(views)
    for cls in (0, 1):
        share_ap = (v[y == cls] == "AP").mean()
        for side in ("train", "val", "test"):
            mask = (split == side) & (y == cls)
            assert abs((v[mask] == "AP").mean() - share_ap) < 0.03, (cls, side)


def test_balance_weights_make_the_view_say_nothing_about_the_label() -> None:
    labels = np.array([0] * 8 + [1] * 2 + [0] * 2 + [1] * 8)
    views = ["AP"] * 10 + ["PA"] * 10
    w = balance_weights(labels, views)
    for view in ("AP", "PA"):
        mask = np.array(views) == view
        assert w[mask & (labels == 0)].sum() == pytest.approx(w[mask & (labels == 1)].sum())
        assert w[mask].sum() == pytest.approx(mask.sum())
    assert np.all(balance_weights(np.array([1, 1, 0]), ["AP", "AP", "PA"]) == 1.0)


def test_by_view_gives_each_view_and_the_pooled_within_view_auc() -> None:
    labels = np.array([1, 0, 1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.4, 0.6, 0.8, 0.7])
    result = by_view(labels, scores, ["AP", "AP", "PA", "PA", "LL", "LL"])
    assert result["views"]["AP"] == {"n": 2, "pneumonia": 1, "auc": 1.0}
    assert result["views"]["PA"]["auc"] == 0.0 and result["views"]["LL"]["auc"] is None
    assert result["within_view_auc"] == 0.5 and result["within_view_pairs"] == 2


def test_examples_come_from_a_scans_input_store_without_opening_the_archive(
    archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_input_store import Opened

    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    out = tmp_path / "scan"
    scanned = ["scan", str(archive), "--out", str(out), "--workers", "0", "--no-progress"]
    assert main([*scanned, "--pseudonym-key-file", str(key)]) == 0
    labels = read_labels(archive.parent / "labels.csv")

    def examples(**extra: object) -> Examples:
        records = list(iter_files(archive))  # the stages mark records: fresh ones each time
        return collect(
            archive,
            records,
            archive_fingerprint(records),
            labels,
            workers=0,
            pseudonym_key=b"k" * 32,
            seed=1,
            **extra,  # type: ignore[arg-type]
        )

    fresh = examples()
    with Opened(archive, monkeypatch) as opened:
        stored = examples(from_scan=out)
    assert not opened.beyond_pictures, "no archive file is opened"
    assert stored.accounting["labelled example from the scan's input store"] == 48
    assert stored.accounting["not scored: view:LL"] == 48  # the scan's decision, unread
    assert np.abs(stored.inputs - fresh.inputs).max() < 1e-4
    assert stored.label.tolist() == fresh.label.tolist() and stored.view == fresh.view
    assert len(np.unique(stored.group)) == 24, "grouped by the scan's patient key"
    # a file changed since the scan is read again, the others still come from the store
    changed = sorted(p for p in archive.rglob("IM0"))[0]
    changed.touch()
    with Opened(archive, monkeypatch) as opened:
        again = examples(from_scan=out)
    assert opened.beyond_pictures == {os.path.realpath(changed)}, "that file alone is read"
    assert again.accounting["labelled example from the scan's input store"] == 47
    with pytest.raises(Exception, match="holds no batchscan scan"):
        examples(from_scan=tmp_path / "nothing")
