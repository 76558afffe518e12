#!/usr/bin/env python3
"""How early the drift monitor sees shifts made from real films, against the two
report-based alarms on the same timelines (docs/site/lifecycle.md quotes the table).

Usage:
    nice -n 10 python jobs/experiments/drift_check.py [--data DIR] [--split report]
        [--seeds 3] [--rates 50,200] [--horizon 28] [--stable-days 365] [--subset 1200]

A simulated paediatric hospital (``kermany_224``: two devices, 25 % pneumonia, ages 1 to 5,
one film a study, a Poisson number of studies a day, 30 % AP films; a Saturday or Sunday has
40 % of a weekday's studies, 60 % AP films and 35 % pneumonia) runs for six weeks, then one
shift begins and lasts ``--horizon`` days; a stable hospital runs for ``--stable-days`` days.
The shifts: one device's films processed differently (contrast, gamma, sharpening,
collimation), a new device named in the header, non-chest images leaking in (pydicom-data's
extremity radiograph, CT and MR pictures, cropped and turned), films stored turned by 90
degrees (a stand-in for laterals, of which the data hold none), adults appearing
(``adult_normal_rsna_128``, with and without ages in the headers), the pneumonia share
doubling, and a gamma that drifts over four weeks.

What runs is the production code: every film goes through ``batchscan.ingest.preprocess``
(the one preprocessing function), the shipped model's scores, OOD distances and penultimate
features come from ``batchscan.scoring.infer.Scorer``, the image statistics from
``drift.image_statistics``, the sample from ``drift.sample_rows``, and each timeline is
judged by ``drift.judge``, the function the nightly monitor ends in (equivalent to one run a
night: a period's rows depend only on it, the periods before it and the reference). The
films are turned into model inputs once and drawn from, instead of being written as DICOM
for every study; the state and store reading is tested in tests/test_drift.py and timed in
jobs/bench/drift_benchmark.py. The report-based alarms are
``monitoring.performance_warning`` (AUC) and ``monitoring.disagreement_warning``, on report
labels that are the films' labels with 5 % of them wrong, available the same day (the best
case for reports). The AUC alarm's bootstrap is only run on nights where a normal
approximation leaves room for an alarm (the AUC drop more than three standard errors).

Thresholds are not tuned here on the figures reported: the kermany patients, the adults and
the non-chest variants are split in two halves by patient; ``--split calibration`` (seeds
from 100) is what the constants of ``batchscan.site.drift`` were checked against,
``--split report`` (seeds from 0, the default) is what the docs quote.

Delay: the night of the first ``WARNING`` counting the shift's first day as day 1; "-" when
none came within the horizon. False alarms: nights with a ``WARNING: drift`` line per year
of stable data.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from pydicom.data import get_testdata_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common.hospitals import patient_of

from batchscan.ingest.dicom import read_display_image
from batchscan.ingest.preprocess import preprocess
from batchscan.scoring.infer import Scorer
from batchscan.scoring.model import load_model
from batchscan.site import drift, metrics, monitoring

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up lines
ROOT = Path(__file__).resolve().parents[2]
START = pd.Timestamp("2025-01-06")
#: The shift's first day (a Monday): six weeks, so that the default reference of day periods
#: (the first 28 days with enough images: at 50 studies a day the weekends hold too few)
#: lies before it.
SHIFT_DAY = 42
PREVALENCE = 0.25
#: Share of AP films on a weekday.
AP_SHARE = 0.3
#: The weekly rhythm: a Saturday or Sunday has this share of a weekday's studies, this share
#: of AP (bedside) films, and this many points more pneumonia.
WEEKEND_RATE, WEEKEND_AP, WEEKEND_PNEUMONIA = 0.4, 0.6, 0.10
REPORT_ERRORS = 0.05
NON_CHEST = (
    "RG3_UNCR.dcm",
    "693_UNCR.dcm",
    "MR2_UNCR.dcm",
    "CT_small.dcm",
    "MR_small.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
)
#: The hospital's two devices: header facts of each (device B is the one whose processing
#: changes).
#: maker, model, modality, transfer syntax, rows, columns, photometric, pixel spacing (mm)
DEVICES = {
    "A": ("Globex", "DR-1", "DX", "1.2.840.10008.1.2.4.90", 3000, 2500, "MONOCHROME2", 0.148),
    "B": ("Initech", "CR-5", "CR", "1.2.840.10008.1.2.1", 2500, 2048, "MONOCHROME1", 0.1),
    "new": ("ACME", "DR-9", "DX", "1.2.840.10008.1.2.4.80", 3072, 3072, "MONOCHROME2", 0.139),
}
DEVICE_B_SHARE = 0.4
RAMP_LEVELS = (1.1, 1.2, 1.3, 1.4, 1.5)


def _half(key: str, split: str) -> bool:
    """Whether `key` (a patient) belongs to `split`: the two halves never share one."""
    return (zlib.crc32(key.encode()) % 2 == 0) == (split == "report")


def _contrast(x: np.ndarray) -> np.ndarray:
    return np.clip(x.mean() + 0.75 * (x - x.mean()), 0.0, 1.0)


def _gamma(level: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: x**level


def _sharpen(x: np.ndarray) -> np.ndarray:
    """Edge enhancement of a detector's frequency processing: unsharp masking at a large
    radius (a small one is lost in the model's 28 px picture)."""
    picture = Image.fromarray(np.rint(x * 255).astype(np.uint8))
    done = picture.filter(ImageFilter.UnsharpMask(radius=8, percent=150, threshold=0))
    return np.asarray(done, np.float32) / 255.0


def _collimate(x: np.ndarray) -> np.ndarray:
    """A tighter shutter: 12 % of each side masked black."""
    edge = int(0.12 * x.shape[0]), int(0.12 * x.shape[1])
    out = np.zeros_like(x)
    out[edge[0] : -edge[0], edge[1] : -edge[1]] = x[edge[0] : -edge[0], edge[1] : -edge[1]]
    return out


@dataclass
class Pool:
    """Films turned into what the monitor sees: label, score, ood, statistics, features."""

    label: np.ndarray
    score: np.ndarray
    ood: np.ndarray
    statistics: np.ndarray
    features: np.ndarray
    age: np.ndarray


def _pool(
    scorer: Scorer, films: list[np.ndarray], labels: list[int], ages: list[float] | None = None
) -> Pool:
    inputs = np.stack([preprocess(f) for f in films])
    scored, features = scorer.score_features(inputs)
    assert scored.ood_score is not None and scored.ood_threshold is not None
    return Pool(
        label=np.asarray(labels),
        score=scored.score,
        ood=scored.ood_score > scored.ood_threshold,
        statistics=drift.image_statistics(inputs),
        features=features,
        age=np.asarray(ages if ages is not None else [np.nan] * len(films), dtype=float),
    )


def load_pools(data: Path, split: str, subset: int, scorer: Scorer) -> dict[str, Pool]:
    """Every kind of film a timeline draws from, made once."""
    rng = np.random.default_rng(0 if split == "report" else 100)
    kermany = data / "kermany_224"
    with (kermany / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    mine = []
    for r in rows:
        if _half(patient_of(r["path"]) or r["path"], split):
            mine.append(r)
    films = [
        np.asarray(Image.open(kermany / r["path"]).convert("L"), np.float32) / 255 for r in mine
    ]
    labels = [int(r["label"] == "PNEUMONIA") for r in mine]
    pools = {"ped": _pool(scorer, films, labels)}
    pick = sorted(rng.choice(len(films), min(subset, len(films)), replace=False))
    chosen, chosen_labels = [films[i] for i in pick], [labels[i] for i in pick]
    changes: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "contrast": _contrast,
        "sharpening": _sharpen,
        "collimation": _collimate,
        "turned": np.rot90,
        **{f"gamma{level}": _gamma(level) for level in RAMP_LEVELS},
    }
    for name, change in changes.items():
        pools[name] = _pool(scorer, [change(f) for f in chosen], chosen_labels)

    adults = data / "adult_normal_rsna_128"
    with (adults / "labels.csv").open(newline="") as handle:
        table = [r for r in csv.DictReader(handle) if _half(r["nih_patient"], split)]
    table = [table[i] for i in sorted(rng.choice(len(table), min(subset, len(table)), False))]
    pools["adult"] = _pool(
        scorer,
        [np.asarray(Image.open(adults / r["path"]).convert("L"), np.float32) / 255 for r in table],
        [0] * len(table),
        [float(r["age"]) for r in table],
    )

    pictures = [read_display_image(str(get_testdata_file(n))).pixels for n in NON_CHEST]
    variants = []
    for i in range(600):
        picture = pictures[i % len(pictures)]
        side = rng.uniform(0.6, 1.0)
        h, w = max(int(picture.shape[0] * side), 8), max(int(picture.shape[1] * side), 8)
        top = int(rng.integers(0, picture.shape[0] - h + 1))
        left = int(rng.integers(0, picture.shape[1] - w + 1))
        crop = np.rot90(picture[top : top + h, left : left + w], int(rng.integers(0, 4)))
        crop = np.clip(crop, 0.0, 1.0) ** rng.uniform(0.8, 1.25)
        if _half(str(i), split):
            variants.append(crop[:, ::-1] if rng.random() < 0.5 else crop)
    pools["nonchest"] = _pool(scorer, variants, [0] * len(variants))
    return pools


@dataclass(frozen=True)
class Shift:
    """What changes from the shift's first day (`day` is days since it began)."""

    name: str
    device_b_pool: Callable[[int], str] | None = None
    new_device: float = 0.0
    leak: tuple[str, float] | None = None
    prevalence: float = PREVALENCE
    ages_missing: bool = False


def _ramp(day: int) -> str:
    """The gamma of device B's films `day` days into a four-week drift to 1.5."""
    level = 1.0 + 0.5 * min(day + 1, 28) / 28
    if level < 1.05:
        return "ped"
    return f"gamma{min(RAMP_LEVELS, key=lambda v: abs(v - level))}"


SHIFTS = (
    Shift("processing: contrast 0.75 (device B)", device_b_pool=lambda _: "contrast"),
    Shift("processing: gamma 1.4 (device B)", device_b_pool=lambda _: "gamma1.4"),
    Shift("processing: sharpening (device B)", device_b_pool=lambda _: "sharpening"),
    Shift("processing: collimation (device B)", device_b_pool=lambda _: "collimation"),
    Shift("a new device, 30 % of studies", new_device=0.3),
    Shift("non-chest images, 10 %", leak=("nonchest", 0.10)),
    Shift("films turned 90 degrees, 10 %", leak=("turned", 0.10)),
    Shift("adults, 20 % (ages in the header)", leak=("adult", 0.20)),
    Shift("adults, 20 % (no ages in any header)", leak=("adult", 0.20), ages_missing=True),
    Shift("pneumonia share 25 % -> 50 %", prevalence=0.5),
    Shift("slow drift: gamma 1.0 -> 1.5 over 4 weeks (device B)", device_b_pool=_ramp),
)
STABLE = Shift("stable")


def simulate(
    pools: dict[str, Pool],
    shift: Shift,
    rate: int,
    days: int,
    seed: int,
    shift_day: int,
    threshold: float,
) -> tuple[pd.DataFrame, pd.DataFrame, drift.Sample, pd.DataFrame]:
    """A timeline: images, studies, the sample and the labelled studies of the reports
    (`threshold`: the model card's, which flags a study)."""
    rng = np.random.default_rng(seed)
    by_class = {
        name: [np.flatnonzero(pool.label == c) for c in (0, 1)] for name, pool in pools.items()
    }
    columns: dict[str, list] = {c: [] for c in (*drift.FILE_COLUMNS, "label")}
    picked_pool: list[str] = []
    picked_index: list[int] = []
    for day in range(days):
        shifted = day >= shift_day
        since = day - shift_day
        when = START + pd.Timedelta(days=day)
        weekend = when.day_of_week >= 5
        n = int(rng.poisson(rate * (WEEKEND_RATE if weekend else 1.0)))
        date = when.date().isoformat()
        prevalence = (shift.prevalence if shifted else PREVALENCE) + (
            WEEKEND_PNEUMONIA if weekend else 0.0
        )
        ap_share = WEEKEND_AP if weekend else AP_SHARE
        for _ in range(n):
            device = "B" if rng.random() < DEVICE_B_SHARE else "A"
            if shifted and rng.random() < shift.new_device:
                device = "new"
            label = int(rng.random() < prevalence)
            name = "ped"
            if shifted and device == "B" and shift.device_b_pool is not None:
                name = shift.device_b_pool(since)
            if shifted and shift.leak is not None and rng.random() < shift.leak[1]:
                name = shift.leak[0]
            candidates = by_class[name][label] if len(by_class[name][label]) else by_class[name][0]
            index = int(candidates[rng.integers(0, len(candidates))])
            pool = pools[name]
            maker, model, modality, syntax, rows, cols, photometric, spacing = DEVICES[device]
            age = pool.age[index] if not np.isnan(pool.age[index]) else rng.uniform(1.0, 6.0)
            if shift.ages_missing:
                age = None
            values = {
                "path": f"{seed}/{day}/{len(picked_pool)}.dcm",
                "size": 1,
                "mtime_ns": 1,
                "study_date": date,
                "manufacturer": maker,
                "manufacturer_model": model,
                "view": "AP" if rng.random() < ap_share else "PA",
                "patient_age_years": age,
                "modality": modality,
                "rows": rows,
                "columns": cols,
                "transfer_syntax_uid": syntax,
                "photometric": photometric,
                "pixel_spacing_mm": spacing,
                "score": float(pool.score[index]),
                "ood": bool(pool.ood[index]),
                "label": int(pool.label[index]),
            }
            for key, value in values.items():
                columns[key].append(value)
            picked_pool.append(name)
            picked_index.append(index)
    images = pd.DataFrame(columns)
    studies = pd.DataFrame(
        {"study_date": images["study_date"], "flag": images["score"] >= threshold}
    )
    starts = monitoring.period_starts(images["study_date"], "day")
    picked = drift.sample_rows(images["path"], starts)
    statistics = np.stack([pools[picked_pool[i]].statistics[picked_index[i]] for i in picked])
    features = np.stack([pools[picked_pool[i]].features[picked_index[i]] for i in picked])
    dates = images["study_date"].iloc[picked].reset_index(drop=True)
    sample = drift.Sample(dates, statistics, features)
    wrong = rng.random(len(images)) < REPORT_ERRORS
    labelled = pd.DataFrame(
        {
            "study_date": images["study_date"],
            "score": images["score"],
            "label": np.where(wrong, 1 - images["label"], images["label"]),
        }
    )
    return images, studies, sample, labelled


def _hanley_se(auc: float, positives: int, negatives: int) -> float:
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
    variance += (negatives - 1) * (q2 - auc * auc)
    return math.sqrt(max(variance, 0.0) / (positives * negatives))


def auc_alarm_possible(frame: pd.DataFrame) -> bool:
    """Whether ``performance_warning`` could warn tonight: the judged period's AUC lies more
    than three (Hanley-McNeil) standard errors below the earlier periods'. Skipping the
    other nights only saves the bootstrap; the warning itself is the production function's."""
    starts = monitoring.period_starts(frame["study_date"], "day")
    labels = frame["label"].to_numpy()

    def enough(rows: pd.Series) -> bool:
        y = labels[rows.to_numpy()]
        return min(int(y.sum()), int((y == 0).sum())) >= monitoring.MIN_PER_CLASS

    judged = monitoring.latest_full_period(starts, enough)
    if judged is None:
        return False
    now, before = frame[starts == judged], frame[starts < judged]
    if (
        min(before["label"].sum(), (before["label"] == 0).sum())
        < monitoring.MIN_REFERENCE_PER_CLASS
    ):
        return False
    a1 = metrics.roc_auc(now["label"], now["score"])
    a0 = metrics.roc_auc(before["label"], before["score"])
    se = math.hypot(
        _hanley_se(a1, int(now["label"].sum()), int((now["label"] == 0).sum())),
        _hanley_se(a0, int(before["label"].sum()), int((before["label"] == 0).sum())),
    )
    return a1 - a0 + 3 * se < 0


def first_alarms(
    images: pd.DataFrame,
    studies: pd.DataFrame,
    sample: drift.Sample,
    labelled: pd.DataFrame,
    shift_day: int,
    days: int,
    threshold: float,
    reports: bool = True,
) -> dict[str, int | None]:
    """The first night (days since `shift_day`, 1 = its first day) each alarm warns, and
    the drift monitor's nights with a warning."""
    found = drift.judge(images, studies, "day", sample)
    frame = found.frame
    alarmed = sorted({(d - START.date()).days for d in frame.loc[frame["alarm"], "period_start"]})
    drift_nights = [d for d in alarmed if d >= shift_day]
    out: dict[str, int | None] = {
        "drift": drift_nights[0] - shift_day + 1 if drift_nights else None,
        "drift_nights": len(alarmed),
        "signals": None,
    }
    if drift_nights:
        day = (START + pd.Timedelta(days=drift_nights[0])).date()
        out["signals"] = ", ".join(
            sorted(frame.loc[frame["alarm"] & (frame["period_start"] == day), "signal"])
        )
    if not reports:
        return out
    table = monitoring.disagreement(labelled, "day", threshold)
    out["disagreement"] = out["auc"] = None
    when = pd.to_datetime(labelled["study_date"])
    for day in range(shift_day, days):
        tonight = (START + pd.Timedelta(days=day)).date()
        if out["disagreement"] is None and monitoring.disagreement_warning(
            table[table["period_start"] <= tonight], "day"
        ):
            out["disagreement"] = day - shift_day + 1
        if out["auc"] is None:
            upto = labelled[when <= pd.Timestamp(tonight)]
            if auc_alarm_possible(upto) and monitoring.performance_warning(upto, "day"):
                out["auc"] = day - shift_day + 1
        if out["disagreement"] is not None and out["auc"] is not None:
            break
    return out


def _days(values: list[int | None]) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "-"
    median = int(np.median(found)) if len(found) == len(values) else None
    spread = f"{min(found)}-{max(found)}" if min(found) != max(found) else f"{found[0]}"
    missed = len(values) - len(found)
    return (f"{median} ({spread})" if median is not None else spread) + (
        f", {missed} of {len(values)} never" if missed else ""
    )


def _earlier(drift_days: list[int | None], report_days: list[int | None], horizon: int) -> str:
    """Days the drift monitor warned before the report alarm, median over seeds (a report
    alarm that never came counts as the horizon + 1, so the figure is "at least")."""
    gaps, atleast = [], False
    for d, r in zip(drift_days, report_days, strict=True):
        if d is None:
            return "-"
        if r is None:
            atleast = True
        gaps.append((horizon + 1 if r is None else r) - d)
    return f"{'>= ' if atleast else ''}{int(np.median(gaps))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("BATCHSCAN_DATA", ROOT.parent / "shared" / "data")),
    )
    parser.add_argument("--split", choices=("report", "calibration"), default="report")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rates", default="50,200")
    parser.add_argument("--horizon", type=int, default=28)
    parser.add_argument("--stable-days", type=int, default=365)
    parser.add_argument("--subset", type=int, default=1200)
    parser.add_argument("--shifts", default="", help="substrings of the shifts to run (all)")
    parser.add_argument(
        "--pools", type=Path, default=None, help="keep the films' model outputs here, reuse them"
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    loaded = load_model()
    threshold = loaded.threshold
    scorer = Scorer(loaded, batch_size=256)
    made_by = zlib.crc32(" ".join(drift.IMAGE_STATISTICS).encode())  # other statistics: again
    cache = args.pools and args.pools.with_suffix(f".{args.split}.{args.subset}.{made_by:x}.npz")
    if cache and cache.is_file():
        with np.load(cache) as saved:
            pools = {
                name: Pool(*(saved[f"{name}/{f}"] for f in Pool.__dataclass_fields__))
                for name in sorted({k.split("/")[0] for k in saved.files})
            }
    else:
        pools = load_pools(args.data, args.split, args.subset, scorer)
        if cache:
            np.savez(
                cache,
                **{f"{n}/{f}": getattr(p, f) for n, p in pools.items() for f in vars(p)},
            )
    print(
        f"films ({args.split} half): "
        + ", ".join(f"{k} {len(v.label)}" for k, v in pools.items())
        + f"; made in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    seed0 = 0 if args.split == "report" else 100
    rates = [int(r) for r in args.rates.split(",")]
    days = SHIFT_DAY + args.horizon
    wanted = [
        s for s in SHIFTS if not args.shifts or any(w in s.name for w in args.shifts.split(","))
    ]
    print(
        "\n| shift | studies/day | drift monitor: days to alarm | first signals "
        "| AUC alarm | disagreement alarm | drift earlier than AUC / disagreement by |"
    )
    print("|---|---|---|---|---|---|---|")
    for shift in wanted:
        for rate in rates:
            runs = [
                first_alarms(
                    *simulate(pools, shift, rate, days, seed0 + s, SHIFT_DAY, threshold),
                    SHIFT_DAY,
                    days,
                    threshold,
                )
                for s in range(args.seeds)
            ]
            signals = sorted({r["signals"] for r in runs if r["signals"]})
            found = {k: [r[k] for r in runs] for k in ("drift", "auc", "disagreement")}
            before_auc = _earlier(found["drift"], found["auc"], args.horizon)
            before_disagreement = _earlier(found["drift"], found["disagreement"], args.horizon)
            print(
                f"| {shift.name} | {rate} | {_days(found['drift'])} "
                f"| {'; '.join(signals) or '-'} | {_days(found['auc'])} "
                f"| {_days(found['disagreement'])} | {before_auc} / {before_disagreement} |",
                flush=True,
            )
    print(
        "\n| studies/day | stable days | drift warnings per year | disagreement warnings per year |"
    )
    print("|---|---|---|---|")
    for rate in rates:
        nights, disagreeing = 0, 0
        for s in range(args.seeds):
            images, studies, sample, labelled = simulate(
                pools, STABLE, rate, args.stable_days, seed0 + 50 + s, args.stable_days, threshold
            )
            found = first_alarms(images, studies, sample, labelled, 0, 0, threshold, False)
            nights += found["drift_nights"] or 0
            table = monitoring.disagreement(labelled, "day", threshold)
            disagreeing += sum(
                monitoring.disagreement_warning(table[table["period_start"] <= d], "day")
                is not None
                for d in table["period_start"]
            )
        years = args.seeds * args.stable_days / 365
        print(
            f"| {rate} | {args.seeds} x {args.stable_days} | {nights / years:.2f} "
            f"| {disagreeing / years:.2f} |",
            flush=True,
        )
    print(f"\n({time.perf_counter() - started:.0f} s; split {args.split}, seeds from {seed0})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
