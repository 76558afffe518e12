#!/usr/bin/env python3
"""Coverage-guided fuzzing of the per-file stages with atheris, for runs longer than CI's.

Usage (after ``pip install atheris``):
    python tests/fuzz/atheris_harness.py [CORPUS_DIR] -max_total_time=600 -timeout=20

Each input is written to a file and driven through ``prepare_record`` (header -> decode ->
normalize -> preprocess) in this process, so libFuzzer itself reports what the scan job would
record as a worker crash (a C codec segfault) or a timeout (a hang), and any Python exception
that escapes the stages (a batchscan bug). The corpus starts from the same small valid files
as the hypothesis suite (tests/fuzz/mutations.py).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["batchscan", "pydicom"]):
    from batchscan.engines.pipeline import prepare_record
    from batchscan.ingest.header import StageOptions
    from batchscan.ingest.records import ImageRecord

#: Every input goes through full-resolution decoding and through the reduced-resolution
#: decoders (the 48 px seeds reach those with a 12 px minimum edge).
OPTIONS = (
    StageOptions(all_modalities=True, max_pixel_bytes=64 * 1024 * 1024, min_edge=None),
    StageOptions(all_modalities=True, max_pixel_bytes=64 * 1024 * 1024, min_edge=12),
)
WORK = Path(tempfile.mkdtemp(prefix="batchscan-fuzz-"))
TARGET = WORK / "input.dcm"


def test_one_input(data: bytes) -> None:
    """One fuzz input: must come out with a status and reason, never an exception."""
    TARGET.write_bytes(data)
    info = TARGET.stat()
    for options in OPTIONS:
        record = ImageRecord(
            path="input.dcm", abs_path=str(TARGET), size=info.st_size, mtime_ns=info.st_mtime_ns
        )
        prepare_record(record, options)
        if record.pending:
            continue  # decoded: the model input was produced
        assert record.status in {"skipped", "failed"}, record
        assert record.reason, record


def main() -> None:
    warnings.simplefilter("ignore")
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    if corpus:
        folder = Path(corpus[0])
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.iterdir()):
            sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
            from tests.fuzz.mutations import seed_files

            for i, seed in enumerate(seed_files()):
                (folder / f"seed{i:02d}.dcm").write_bytes(seed)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
