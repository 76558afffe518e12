"""The drift monitor: synthetic shifts of each kind alarm, stable data does not, a shift of
one day does not (persistence), a small or empty period warns about nothing, and on a real
state and input store it reads the stored inputs once and keeps what it made of them."""

from __future__ import annotations

import json
import shutil
from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.cli import main
from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import SCORED, ImageRecord
from batchscan.results.aggregate import aggregate_studies
from batchscan.results.report import DRIFT_SCHEMA, write_frame
from batchscan.results.report_html import DRIFT_TITLE
from batchscan.results.state import StateStore
from batchscan.scoring.input_store import InputStore
from batchscan.site import drift, monitoring
from batchscan.synth import chest_phantom, write_shifting_archive
from tests.conftest import nightly
from tests.test_input_store import Opened

START = pd.Timestamp("2026-03-01")  # a Sunday
#: The first shifted day: after the default reference of day periods (four weeks).
SHIFT_DAY = 30


def timeline(
    days: int,
    per_day: int,
    shift: str | None = None,
    *,
    seed: int = 0,
    shift_days: int = 99,
    weekend: tuple[int, float] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, drift.Sample]:
    """Images, studies and a sample of `days` days of `per_day` one-image studies from
    1 March 2026, drawn from one hospital; from day :data:`SHIFT_DAY` on (for
    `shift_days` days) with `shift`. 30 % of films are AP (bedside): they look otherwise
    and score higher. `weekend`: (studies a Saturday or Sunday, its share of AP films)."""
    rng = np.random.default_rng(seed)
    dates = START + pd.to_timedelta(np.arange(days), unit="D")
    at_weekend = dates.day_of_week >= 5
    per = [weekend[0] if weekend and end else per_day for end in at_weekend]
    day = np.repeat(np.arange(days), per)
    n = len(day)
    ap_share = np.where(at_weekend[day], weekend[1] if weekend else 0.3, 0.3)
    ap = rng.random(n) < ap_share
    shifted = (day >= SHIFT_DAY) & (day < SHIFT_DAY + shift_days) if shift else np.zeros(n, bool)
    images = pd.DataFrame(
        {
            "path": [f"{i:07d}.dcm" for i in range(n)],
            "size": 1000,
            "mtime_ns": 1,
            "study_date": dates[day].strftime("%Y-%m-%d"),
            "manufacturer": rng.choice(["Globex", "Initech"], n, p=[0.6, 0.4]),
            "manufacturer_model": "DR-1",
            "view": np.where(ap, "AP", "PA"),
            "patient_age_years": rng.uniform(1.0, 5.0, n),
            "modality": "CR",
            "rows": 2000,
            "columns": 2500,
            "transfer_syntax_uid": rng.choice(
                ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"], n, p=[0.8, 0.2]
            ),
            "photometric": "MONOCHROME2",
            "score": np.where(ap, rng.beta(3.0, 4.0, n), rng.beta(2.0, 5.0, n)),
            "ood": rng.random(n) < 0.01,
        }
    )
    statistics = rng.normal(size=(n, len(drift.IMAGE_STATISTICS)))
    statistics[ap, :3] += (-0.8, 0.8, -0.6)  # bedside films: darker, more contrast
    mixing = rng.normal(size=(16, 16))
    features = np.maximum(rng.normal(size=(n, 16)) @ mixing, 0.0)
    features[ap] += 0.8 * features.std(axis=0)
    # each device's detector pitch (drawn from no random numbers: the timelines stay as they were)
    images["pixel_spacing_mm"] = np.where(images["manufacturer"] == "Globex", 0.1, 0.139)
    if shift == "device":
        new = shifted & (rng.random(n) < 0.38)
        images.loc[new, ["manufacturer", "manufacturer_model"]] = ["ACME", "DR-9"]
    elif shift == "detector":  # the same devices, a new detector plate of another pitch
        new = shifted & (rng.random(n) < 0.38)
        images.loc[new, ["pixel_spacing_mm", "photometric"]] = [0.2, "MONOCHROME1"]
    elif shift == "contrast":
        statistics[shifted, 1] += 0.8
    elif shift == "features":
        features[shifted] += 0.8 * features.std(axis=0)
    elif shift == "prevalence":
        sick = shifted & (rng.random(n) < 0.3)
        images.loc[sick, "score"] = rng.beta(5.0, 2.0, int(sick.sum()))
    elif shift == "ood":
        images.loc[shifted, "ood"] = rng.random(int(shifted.sum())) < 0.15
    studies = pd.DataFrame({"study_date": images["study_date"], "flag": images["score"] >= 0.5})
    sample = drift.Sample(images["study_date"], statistics, features)
    return images, studies, sample


def alarms(found: drift.Drifted) -> pd.DataFrame:
    frame = found.frame
    return frame[frame["alarm"]]


def test_stable_data_does_not_alarm() -> None:
    images, studies, sample = timeline(88, 150)
    found = drift.judge(images, studies, "day", sample)
    frame = found.frame
    assert set(frame["signal"]) == set(drift.SIGNALS)
    days = monitoring.REFERENCE_PERIODS["day"]
    assert days == 28, "four weeks of days: four of each weekday"
    assert frame["period_start"].nunique() == 88
    assert frame["reference"].sum() == days * len(drift.SIGNALS)
    assert alarms(found).empty and found.warning is None
    assert frame["significant"].sum() <= 2, "about 0.01 of the 60 judged days, by design"
    assert list(frame.columns) == list(DRIFT_SCHEMA.names)
    assert found.facts["reference"] == "the 28 days from 2026-03-01 to 2026-03-28"
    chance = sum(len(signals) for signals in found.facts["weekly_rhythm"].values())
    assert chance <= 3, "no weekly rhythm: one by chance in 84 weekday-signal pairs at 0.01"
    weekly = drift.judge(images, studies, "week", sample)
    assert weekly.facts["reference"] == "the 4 weeks from 2026-02-23 to 2026-03-22"


def test_a_weekly_rhythm_does_not_alarm_at_day_periods() -> None:
    """A hospital's weekend: a third of the studies, and 65 % bedside (AP) films where the
    week has 30 %, which look otherwise and score higher. Against the whole reference each
    weekend day differs in its view mix, pictures and scores; against the reference's days
    of its weekday it does not, for twelve weeks. A shift still alarms, weekend or not."""
    images, studies, sample = timeline(28 + 84, 150, weekend=(50, 0.65))
    weekend = pd.to_datetime(images["study_date"]).dt.day_of_week >= 5
    reference = pd.to_datetime(images["study_date"]) < START + pd.Timedelta(days=28)
    ap = images["view"] == "AP"
    rhythm = ap[weekend & ~reference].mean() - ap[reference].mean()
    assert rhythm > 0.25, "the weekend's view mix is far from the reference's, pooled"
    found = drift.judge(images, studies, "day", sample)
    frame = found.frame
    assert frame["period_start"].nunique() == 112
    assert alarms(found).empty and found.warning is None
    saturday = frame[(frame["period_start"] == date(2026, 5, 30)) & (frame["signal"] == "view")]
    assert saturday["n"].iloc[0] == 50 and "of images" in saturday["detail"].iloc[0]
    assert frame["significant"].sum() <= 3, "about 0.01 of the 84 judged days, by design"
    rhythm = found.facts["weekly_rhythm"]
    assert set(rhythm) == {"Sat", "Sun"} and all(
        {"view", "features"} <= set(v) for v in rhythm.values()
    )

    images, studies, sample = timeline(SHIFT_DAY + 7, 150, "device", weekend=(50, 0.65))
    raised = alarms(drift.judge(images, studies, "day", sample))
    assert (raised["period_start"].min() - START.date()).days == SHIFT_DAY + 1
    assert set(raised["signal"]) == {"device"}
    assert {d.weekday() for d in raised["period_start"]} >= {5, 6}, "the weekend's too"


@pytest.mark.parametrize(
    ("shift", "signals", "said"),
    [
        ("device", {"device"}, "manufacturer and model ACME DR-9: 0 % -> 3"),
        ("detector", {"spacing", "photometric"}, "pixel spacing band 0.200-0.225 mm: 0 % -> 3"),
        (
            "contrast",
            {"image"},
            "image statistics of the stored inputs: contrast (standard deviation of the grey "
            "levels): ",
        ),
        ("features", {"features"}, "the model's penultimate features: principal component"),
        ("prevalence", {"score", "flag_rate"}, "model score: "),
        ("ood", {"ood_rate"}, "images beyond the training set (ood): "),
    ],
)
def test_each_kind_of_shift_alarms_on_its_second_day(
    shift: str, signals: set[str], said: str
) -> None:
    images, studies, sample = timeline(SHIFT_DAY + 5, 150, shift)
    found = drift.judge(images, studies, "day", sample)
    raised = alarms(found)
    first = (raised["period_start"].min() - START.date()).days
    assert first == SHIFT_DAY + 1, "significant on the first day, alarms on the second"
    # images beyond the reference's range may come with any shift of the pictures
    assert signals <= set(raised["signal"]) <= signals | {"unusual"}, raised
    assert found.warning is not None and found.warning.startswith("WARNING: drift: the day from ")
    assert said in found.warning and found.warning.count("\n") == 0
    assert (raised["statistic"] > raised["threshold"]).all()
    if shift in ("contrast", "features", "prevalence"):  # what a KS distance says
        assert " of images at or below " in found.warning and "(KS distance 0." in found.warning


def test_a_shift_of_one_day_does_not_alarm_but_a_week_of_it_may() -> None:
    images, studies, sample = timeline(SHIFT_DAY + 5, 150, "device", shift_days=1)
    found = drift.judge(images, studies, "day", sample)
    assert alarms(found).empty and found.warning is None
    one_day = found.frame[found.frame["significant"]]
    assert set(one_day["signal"]) == {"device"}
    weekly = drift.judge(images, studies, "week", sample)
    assert drift.PERSISTENCE["week"] == 1 and weekly.frame["alarm"].sum() <= 1


def test_a_small_or_empty_period_warns_about_nothing() -> None:
    images, studies, sample = timeline(SHIFT_DAY + 3, 150, "device")
    # the newest day holds a handful of studies, all of the new device
    late = images.tail(1).copy()
    few = pd.concat([late] * (drift.MIN_IMAGES - 1), ignore_index=True)
    few["path"] = [f"late{i}" for i in range(len(few))]
    few["study_date"] = "2026-04-30"
    images = pd.concat([images, few], ignore_index=True)
    studies = pd.concat(
        [studies, pd.DataFrame({"study_date": few["study_date"], "flag": True})],
        ignore_index=True,
    )
    found = drift.judge(images, studies, "day", sample)
    assert "2026-04-30" not in set(found.frame["period_start"].astype(str))
    assert found.warning is not None and "the day from 2026-04-02 " in found.warning
    empty = images.iloc[:0]
    nothing = drift.judge(empty, studies.iloc[:0], "day", None)
    assert nothing.frame.empty and nothing.warning is None
    undated = images.assign(study_date=None)
    assert drift.judge(undated, studies, "day", sample).frame.empty


def test_a_pinned_reference_is_the_studies_of_those_dates() -> None:
    images, studies, sample = timeline(SHIFT_DAY + 5, 150, "device")
    pinned = (date(2026, 3, 31), date(2026, 4, 4))  # the shifted days themselves
    found = drift.judge(images, studies, "day", sample, reference=pinned)
    frame = found.frame
    assert set(frame.loc[frame["reference"], "period_start"].astype(str)) == {
        "2026-03-31",
        *(f"2026-04-0{d}" for d in range(1, 5)),
    }
    before = frame[(frame["signal"] == "device") & ~frame["reference"]]
    assert before["significant"].all(), "against the new mix every earlier day differs"
    assert before["alarm"].iloc[1:].all() and not before["alarm"].iloc[0], "persistence"
    assert found.warning is None, "the latest day is part of the reference"
    assert found.facts["reference"] == "studies dated 2026-03-31 to 2026-04-04"


def test_the_frame_goes_through_the_report_writer(tmp_path: Path) -> None:
    images, studies, sample = timeline(SHIFT_DAY + 3, 150, "device")
    frame = drift.judge(images, studies, "day", sample).frame
    written = write_frame(frame, DRIFT_SCHEMA, tmp_path, "drift", "run1")
    (parquet_tmp, _), (csv_tmp, _) = written
    back = pd.read_parquet(parquet_tmp)
    assert len(back) == len(frame) and back["alarm"].dtype == bool
    assert list(pd.read_csv(csv_tmp).columns) == list(DRIFT_SCHEMA.names)


def test_image_statistics_see_contrast_gamma_collimation_and_a_turned_film() -> None:
    films = [chest_phantom(224, seed=i) for i in range(40)]
    inputs = np.stack([preprocess(f) for f in films])
    base = drift.image_statistics(inputs)
    assert base.shape == (40, len(drift.IMAGE_STATISTICS)) and base.dtype == np.float32
    names = list(drift.IMAGE_STATISTICS)

    def moved(change) -> np.ndarray:
        after = drift.image_statistics(np.stack([preprocess(change(f)) for f in films]))
        return np.median(after - base, axis=0)

    flat = moved(lambda f: np.clip(0.5 + 0.6 * (f - 0.5), 0, 1))
    assert flat[names.index("contrast")] < -0.02
    darker = moved(lambda f: f**1.6)
    assert darker[names.index("midtone")] < -0.05
    collimated = moved(lambda f: np.pad(f[28:-28, 28:-28], 28))
    assert collimated[names.index("border")] < -0.1
    turned = moved(lambda f: np.rot90(f))
    assert turned[names.index("asymmetry")] > 0.01


def _hospital(root: Path, days: int, per_day: int, contrast_from: int) -> tuple[Path, Path]:
    """A state and an input store as a scan leaves them: `days` days of one-image studies,
    whose films lose contrast from day `contrast_from` on."""
    state = StateStore(root / "state.sqlite")
    store = InputStore(root / "inputs.sqlite")
    state.begin_run("r1", "2026-04-01T00:00:00", "m", "test")
    records, entries = [], []
    for i in range(days * per_day):
        day = i // per_day
        film = chest_phantom(96, seed=i, opacity=0.5 * (i % 4 == 0))
        if day >= contrast_from:
            film = np.clip(0.5 + 0.55 * (film - 0.5), 0.0, 1.0)
        path = f"s{i:05d}.dcm"
        records.append(
            ImageRecord(
                path=path,
                abs_path=f"/archive/{path}",
                size=1000 + i,
                mtime_ns=7,
                status=SCORED,
                study_instance_uid=f"1.2.39.{i}",
                sop_instance_uid=f"1.2.39.{i}.1",
                modality="CR",
                view="PA",
                rows=2000,
                columns=2500,
                study_date=(START + pd.Timedelta(days=day)).date().isoformat(),
                manufacturer="Globex",
                manufacturer_model="DR-1",
                patient_age_years=3.0,
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                photometric="MONOCHROME2",
                pixel_spacing_mm=0.139,
                score=0.2 + 0.6 * (i % 4 == 0),
                ood_score=1.0,
                ood=False,
            )
        )
        entries.append(((path, 1000 + i, 7), "input-key", preprocess(film)))
    state.save(records, "r1", "h.input-key.d.m.s", "m")
    state.finish("r1", partial(aggregate_studies, threshold=0.5, model_version="m"))
    store.put(entries)
    state.close()
    store.close()
    return root / "state.sqlite", root / "inputs.sqlite"


def test_the_monitor_reads_the_state_and_store_once_and_keeps_what_it_made(
    tmp_path: Path,
) -> None:
    from batchscan.scoring.infer import Scorer
    from batchscan.scoring.model import load_model

    scorer = Scorer(load_model(), batch_size=64, jit_compile=False)
    calls: list[int] = []

    def features(inputs: np.ndarray) -> np.ndarray:
        calls.append(len(inputs))
        return scorer.features(inputs)

    state_path, store_path = _hospital(tmp_path, days=7, per_day=30, contrast_from=5)
    state, store = StateStore(state_path), InputStore(store_path)
    kwargs = {
        "period": "day",
        "input_key": "input-key",
        "model_key": "m",
        "features": features,
        "reference": (date(2026, 3, 1), date(2026, 3, 4)),  # a week holds no four weeks
    }
    try:
        capped = drift.monitor_drift(state, store, max_new=150, **kwargs)
        assert capped.facts["vectors_made"] == 150 and capped.facts["vectors_waiting"] == 60
        pictured = capped.frame.loc[capped.frame["signal"] == "image", "period_start"]
        assert [d.day for d in pictured] == [1, 2, 3, 4, 7], "the reference first, then the newest"
        first = drift.monitor_drift(state, store, **kwargs)
        assert first.facts["vectors_made"] == 60 and first.facts["vectors_waiting"] == 0
        again = drift.monitor_drift(state, store, **kwargs)
        assert again.facts["vectors_made"] == 0 and sum(calls) == 210, "each made once"
        other_model = drift.monitor_drift(state, store, **{**kwargs, "model_key": "m2"}, max_new=9)
        assert other_model.facts["vectors_made"] == 9, "another model's features are made again"
    finally:
        state.close()
        store.close()
    frame = again.frame
    assert frame["period_start"].nunique() == 7 and again.facts["sampled"] == 210
    raised = frame[frame["alarm"]]
    assert set(raised["signal"]) >= {"image"} and set(raised["period_start"].astype(str)) == {
        "2026-03-07"
    }
    assert again.warning is not None and "image statistics of the stored inputs" in again.warning
    assert scorer.features(np.zeros((3, 64, 64, 3), np.float32)).shape == (3, 64)


def test_the_store_keeps_derived_vectors_by_identity_input_and_model(tmp_path: Path) -> None:
    store = InputStore(tmp_path / "inputs.sqlite")
    vector = np.arange(5, dtype=np.float32)
    store.put_derived(
        [(("a.dcm", 10, 1), "in", "m", vector), (("b.dcm", 10, 1), "in", "m", vector)]
    )
    store.commit()
    found = store.derived([("a.dcm", 10, 1), ("b.dcm", 10, 1)], "in", "m")
    assert set(found) == {"a.dcm", "b.dcm"} and np.array_equal(found["a.dcm"], vector)
    assert not store.derived([("a.dcm", 10, 2)], "in", "m"), "the file changed"
    assert not store.derived([("a.dcm", 10, 1)], "other input", "m")
    assert not store.derived([("a.dcm", 10, 1)], "in", "another model")
    store.delete(["a.dcm"])  # a vanished file takes its vector with it
    assert set(store.derived([("a.dcm", 10, 1), ("b.dcm", 10, 1)], "in", "m")) == {"b.dcm"}
    store.close()
    reader = InputStore(tmp_path / "inputs.sqlite", readonly=True)
    assert set(reader.derived([("b.dcm", 10, 1)], "in", "m")) == {"b.dcm"}
    reader.put_derived([(("c.dcm", 1, 1), "in", "m", vector)])  # read-only: nothing written
    reader.close()
    assert not InputStore(tmp_path / "inputs.sqlite").derived([("c.dcm", 1, 1)], "in", "m")


# -- in a scan ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shifting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six weeks of one-image studies, 35 a week; from the fifth week half of them come from
    a new detector whose films are processed otherwise (:func:`write_shifting_archive`)."""
    root = tmp_path_factory.mktemp("shifting") / "archive"
    write_shifting_archive(root, weeks=6, per_week=35, shift_week=5, size=96)
    return root


def _scan(archive: Path, out: Path, *more: str) -> int:
    return main(["scan", str(archive), "--out", str(out), "--workers", "0", "--no-progress", *more])


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_a_scan_watches_the_films_from_the_state_and_store_and_opens_no_archive_file(
    shifting: Path,
    tmp_path: Path,
    other_model: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    archive = tmp_path / "archive"
    shutil.copytree(shifting, archive)
    out = tmp_path / "out"
    assert _scan(archive, out, "--monitor-period", "week") == 0
    printed = capsys.readouterr().out.splitlines()
    facts = _manifest(out)["drift"]
    assert facts["vectors_made"] == facts["sampled"] == facts["images"] == 210
    assert facts["reference"] == "the 4 weeks from 2026-01-05 to 2026-02-01"
    warning = facts["warning"]
    assert warning.startswith("WARNING: drift: the week from 2026-02-09 differs from the ")
    assert "manufacturer and model ACME DR-9: 0 % -> " in warning and facts["error"] is None
    assert "modality DX: 0 % -> " in warning, "the value that came, not the one that shrank"
    assert [line for line in printed if line.startswith("WARNING: drift")] == [warning]
    frame = pd.read_parquet(out / "drift.parquet")
    assert list(frame.columns) == list(DRIFT_SCHEMA.names)
    assert list(pd.read_csv(out / "drift.csv").columns) == list(DRIFT_SCHEMA.names)
    raised = frame[frame["alarm"]]
    assert set(raised["period_start"].astype(str)) == {"2026-02-02", "2026-02-09"}
    assert {"device", "transfer_syntax", "modality", "image"} <= set(raised["signal"])
    page = (out / "report.html").read_text(encoding="utf-8")
    assert f"<h2>{DRIFT_TITLE}</h2>" in page and "ACME DR-9: 0 %" in page

    # another model: rescored and watched again from the store; no archive file opened
    with Opened(archive, monkeypatch) as opened:
        assert _scan(archive, out, "--monitor-period", "week", "--model", str(other_model)) == 0
    assert opened.beyond_pictures == set(), "the drift monitor opened archive files"
    again = _manifest(out)
    assert again["files_processed"] == 0 and again["files_rescored"] == 210
    assert again["drift"]["vectors_made"] == 210, "the new model's features, from the store"
    with Opened(archive, monkeypatch) as opened:  # a night with nothing new: all kept
        assert _scan(archive, out, "--monitor-period", "week", "--model", str(other_model)) == 0
    assert opened.beyond_pictures == set() and _manifest(out)["drift"]["vectors_made"] == 0

    # as cron runs it: the wrapper prints the drift warning although the run succeeded
    config = tmp_path / "batchscan.toml"
    config.write_text(
        f'archive = "{archive}"\nout = "{out}"\nworkers = 0\nmonitor_period = "week"\n'
        f'model = "{other_model}"\n'
    )
    done = nightly(config, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("WARNING: drift: the week from 2026-02-09 ")
    assert done.stdout.count("\n") == 1, done.stdout


def test_a_failing_drift_monitor_keeps_the_last_good_files_and_exits_1(
    shifting: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert _scan(shifting, out, "--monitor-period", "week") == 0
    good = {name: (out / name).read_bytes() for name in ("drift.parquet", "drift.csv")}
    capsys.readouterr()

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a fault in the monitor")

    monkeypatch.setattr(drift, "judge", broken)
    assert _scan(shifting, out, "--monitor-period", "week") == 1
    captured = capsys.readouterr()
    assert (
        "batchscan: error: drift not updated (the last good drift files stay): "
        "RuntimeError: a fault in the monitor" in captured.err
    )
    assert "WARNING: drift" not in captured.out and "batchscan run " in captured.out
    assert {name: (out / name).read_bytes() for name in good} == good
    manifest = _manifest(out)
    assert manifest["drift"]["error"] == "RuntimeError: a fault in the monitor"
    assert "could not run this time" in (out / "report.html").read_text(encoding="utf-8")
    runs = pd.read_parquet(out / "runs.parquet")
    assert list(runs["outcome"]) == ["ok", "ok"], "the run itself published"
