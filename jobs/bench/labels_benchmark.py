"""How fast ``batchscan labels`` reads reports, against baselines measured in the same run.

    python jobs/bench/labels_benchmark.py [--reports 20000] [--repeat 3]

Writes a reports CSV of synthetic chest radiograph reports (indication, comparison,
findings, impression; 400-900 characters, like a RIS export; drawn with a fixed seed from
sentence pools written for this job), then times, best of --repeat:

* ``naive``: a keyword regex (any "pneumonia|consolidation|infiltrate" not after "no") over
  the same texts: what a hand-rolled labeler costs, the floor of any approach;
* ``tokenize``: spaCy's tokenizer alone over the reports' segments: the floor of any spaCy
  pipeline;
* ``labels``: ``batchscan labels`` end to end (``run_labels``: read the CSV, sections,
  spaCy + negspacy, decide, write labels and audit CSVs), in this process.

The issue's target: >= 200 reports/s on 2 cores (100,000 reports in under 10 minutes).
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from batchscan.site.report_labels import ReportLabeler, run_labels

INDICATIONS = [
    "Cough and fever.",
    "Shortness of breath.",
    "Rule out pneumonia.",
    "Chest pain.",
    "Pre-operative evaluation.",
    "Follow-up of pneumonia.",
    "Hypoxia, evaluate for infiltrate.",
    "Fall.",
    "Weakness.",
    "Tachycardia, ? pneumonia.",
]
COMPARISONS = ["None.", "Radiograph from last month.", "Prior chest radiograph.", "CT chest."]
NORMAL_FINDINGS = [
    "The heart is normal in size.",
    "The mediastinal and hilar contours are unremarkable.",
    "The lungs are clear without focal consolidation.",
    "No pleural effusion or pneumothorax.",
    "No acute osseous abnormality.",
    "The cardiomediastinal silhouette is within normal limits.",
    "There is no focal airspace disease, pleural effusion or pneumothorax.",
    "Degenerative changes of the thoracic spine.",
    "Calcified granuloma in the right upper lobe.",
    "Lungs are well expanded.",
    "Pulmonary vascularity is normal.",
]
ABNORMAL_FINDINGS = [
    "There is consolidation in the right lower lobe with air bronchograms.",
    "Patchy opacity at the left base may represent atelectasis or early pneumonia.",
    "Streaky bibasilar opacities, likely atelectasis.",
    "The previously seen right lower lobe consolidation has cleared.",
    "Left lower lobe airspace disease.",
    "Small left pleural effusion.",
    "Mild pulmonary vascular congestion.",
    "Retrocardiac opacity, atelectasis versus pneumonia.",
]
IMPRESSIONS = [
    "No acute cardiopulmonary process.",
    "Right lower lobe pneumonia.",
    "Possible left lower lobe pneumonia.",
    "No evidence of pneumonia.",
    "Bibasilar atelectasis. No focal consolidation.",
    "Resolved right lower lobe pneumonia.",
    "Left lower lobe consolidation, consistent with pneumonia.",
    "No active disease.",
]


def synthetic_report(rng: random.Random) -> str:
    """One report in the usual four sections, line-broken as a RIS export writes it."""
    findings = rng.sample(NORMAL_FINDINGS, rng.randint(3, 6))
    findings += rng.sample(ABNORMAL_FINDINGS, rng.randint(0, 2))
    rng.shuffle(findings)
    return (
        f"EXAMINATION: CHEST (PA AND LATERAL)\nINDICATION: {rng.choice(INDICATIONS)}\n"
        f"COMPARISON: {rng.choice(COMPARISONS)}\n\nFINDINGS:\n{' '.join(findings)}\n\n"
        f"IMPRESSION:\n{rng.choice(IMPRESSIONS)}"
    )


def write_reports(path: Path, count: int, seed: int = 7) -> None:
    """A reports CSV as ``batchscan labels`` reads it."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["accession_number", "report"])
        for i in range(count):
            writer.writerow([f"ACC{i:07d}", synthetic_report(rng)])


def best_of(repeat: int, work: Callable[[], object]) -> float:
    """The shortest wall time of `repeat` runs of `work`."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


_NAIVE = re.compile(r"(?<!no )\b(pneumonia|consolidation|infiltrate)", re.IGNORECASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=20_000, help="reports to label")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method; best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        reports = folder / "reports.csv"
        write_reports(reports, args.reports)
        with reports.open(newline="", encoding="utf-8") as handle:
            texts = [row[1] for row in list(csv.reader(handle))[1:]]
        labeler = ReportLabeler()
        segments = [seg.text for text in texts for seg in labeler.segments(text)]
        chars = sum(len(t) for t in texts)
        rows = {
            "naive": best_of(args.repeat, lambda: [bool(_NAIVE.search(t)) for t in texts]),
            "tokenize": best_of(
                args.repeat, lambda: list(labeler.nlp.tokenizer.pipe(segments, batch_size=512))
            ),
            "labels": best_of(
                args.repeat,
                lambda: run_labels(
                    reports, folder / "labels.csv", audit=folder / "audit.csv", rules=labeler.rules
                ),
            ),
        }
    base = rows["tokenize"]
    print(
        f"{args.reports} reports, {chars / len(texts):.0f} characters each on average, "
        f"best of {args.repeat}"
    )
    print(f"{'method':10s} {'seconds':>8s} {'reports/s':>10s} {'x tokenize':>11s}")
    for name, seconds in rows.items():
        print(f"{name:10s} {seconds:8.2f} {args.reports / seconds:10.0f} {base / seconds:11.2f}")
    rate = args.reports / rows["labels"]
    print(
        f"batchscan labels: {rate:.0f} reports/s; 100,000 reports in "
        f"{100_000 / rate / 60:.1f} min (target >= 200 reports/s)"
    )


if __name__ == "__main__":
    main()
