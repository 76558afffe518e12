"""The drift monitor: synthetic shifts of each kind alarm, stable data does not, a shift of
one day does not (persistence), a small or empty period warns about nothing, and on a real
state and input store it reads the stored inputs once and keeps what it made of them."""

from __future__ import annotations

from datetime import date
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from batchscan.ingest.preprocess import preprocess
from batchscan.ingest.records import SCORED, ImageRecord
from batchscan.results.aggregate import aggregate_studies
from batchscan.results.report import write_frame
from batchscan.results.state import StateStore
from batchscan.scoring.input_store import InputStore
from batchscan.site import drift
from batchscan.synth import chest_phantom

START = pd.Timestamp("2026-03-01")
SHIFT_DAY = 20


def timeline(
    days: int, per_day: int, shift: str | None = None, *, seed: int = 0, shift_days: int = 99
) -> tuple[pd.DataFrame, pd.DataFrame, drift.Sample]:
    """Images, studies and a sample of `days` days of `per_day` one-image studies from
    1 March 2026, drawn from one hospital; from day :data:`SHIFT_DAY` on (for
    `shift_days` days) with `shift`."""
    rng = np.random.default_rng(seed)
    n = days * per_day
    day = np.repeat(np.arange(days), per_day)
    shifted = (day >= SHIFT_DAY) & (day < SHIFT_DAY + shift_days) if shift else np.zeros(n, bool)
    images = pd.DataFrame(
        {
            "path": [f"{i:07d}.dcm" for i in range(n)],
            "size": 1000,
            "mtime_ns": 1,
            "study_date": (START + pd.to_timedelta(day, unit="D")).strftime("%Y-%m-%d"),
            "manufacturer": rng.choice(["Globex", "Initech"], n, p=[0.6, 0.4]),
            "manufacturer_model": "DR-1",
            "view": rng.choice(["PA", "AP"], n, p=[0.7, 0.3]),
            "patient_age_years": rng.uniform(1.0, 5.0, n),
            "modality": "CR",
            "rows": 2000,
            "columns": 2500,
            "transfer_syntax_uid": rng.choice(
                ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"], n, p=[0.8, 0.2]
            ),
            "score": rng.beta(2.0, 5.0, n),
            "ood": rng.random(n) < 0.01,
        }
    )
    statistics = rng.normal(size=(n, len(drift.IMAGE_STATISTICS)))
    mixing = rng.normal(size=(16, 16))
    features = np.maximum(rng.normal(size=(n, 16)) @ mixing, 0.0)
    if shift == "device":
        new = shifted & (rng.random(n) < 0.38)
        images.loc[new, ["manufacturer", "manufacturer_model"]] = ["ACME", "DR-9"]
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
    images, studies, sample = timeline(60, 150)
    found = drift.judge(images, studies, "day", sample)
    frame = found.frame
    assert set(frame["signal"]) == set(drift.SIGNALS)
    assert frame["period_start"].nunique() == 60 and frame["reference"].sum() == 4 * len(
        drift.SIGNALS
    )
    assert alarms(found).empty and found.warning is None
    assert frame["significant"].sum() <= 2, "about 0.01 of the 56 judged days, by design"
    assert list(frame.columns) == list(drift.DRIFT_SCHEMA.names)
    assert found.facts["reference"] == "the 4 days from 2026-03-01 to 2026-03-04"


@pytest.mark.parametrize(
    ("shift", "signals", "said"),
    [
        ("device", {"device"}, "manufacturer and model ACME DR-9: 0 % -> 3"),
        ("contrast", {"image"}, "image statistics of the stored inputs: contrast"),
        ("features", {"features"}, "the model's penultimate features: principal component"),
        ("prevalence", {"score", "flag_rate"}, "model score: median"),
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
    assert found.warning is not None and "the day from 2026-03-23 " in found.warning
    empty = images.iloc[:0]
    nothing = drift.judge(empty, studies.iloc[:0], "day", None)
    assert nothing.frame.empty and nothing.warning is None
    undated = images.assign(study_date=None)
    assert drift.judge(undated, studies, "day", sample).frame.empty


def test_a_pinned_reference_is_the_studies_of_those_dates() -> None:
    images, studies, sample = timeline(SHIFT_DAY + 5, 150, "device")
    pinned = (date(2026, 3, 21), date(2026, 3, 25))  # the shifted days themselves
    found = drift.judge(images, studies, "day", sample, reference=pinned)
    frame = found.frame
    assert set(frame.loc[frame["reference"], "period_start"].astype(str)) == {
        f"2026-03-{d}" for d in range(21, 26)
    }
    before = frame[(frame["signal"] == "device") & ~frame["reference"]]
    assert before["significant"].all(), "against the new mix every earlier day differs"
    assert before["alarm"].iloc[1:].all() and not before["alarm"].iloc[0], "persistence"
    assert found.warning is None, "the latest day is part of the reference"
    assert found.facts["reference"] == "studies dated 2026-03-21 to 2026-03-25"


def test_the_frame_goes_through_the_report_writer(tmp_path: Path) -> None:
    images, studies, sample = timeline(SHIFT_DAY + 3, 150, "device")
    frame = drift.judge(images, studies, "day", sample).frame
    written = write_frame(frame, drift.DRIFT_SCHEMA, tmp_path, "drift", "run1")
    (parquet_tmp, _), (csv_tmp, _) = written
    back = pd.read_parquet(parquet_tmp)
    assert len(back) == len(frame) and back["alarm"].dtype == bool
    assert list(pd.read_csv(csv_tmp).columns) == list(drift.DRIFT_SCHEMA.names)


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
    kwargs = {"period": "day", "input_key": "input-key", "model_key": "m", "features": features}
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
