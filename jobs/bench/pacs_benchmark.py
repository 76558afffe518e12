#!/usr/bin/env python3
"""A PACS as the archive: instances per second and bytes fetched per study, over DICOMweb
and DIMSE, against a folder of the same files and against a plain dicomweb-client loop (the
peer), all measured in the same run on a real Orthanc (with its DICOMweb plugin) on
127.0.0.1.

    python jobs/bench/pacs_benchmark.py [--studies 40] [--size 1024] [--connections 4]

Writes a demo archive (a frontal and a lateral per study, CR and DX, in rotating transfer
syntaxes), stores its radiographs in Orthanc, then times, each over the same instances:

* ``folder``: read each file (the floor: local disk, no network);
* ``DICOMweb, batchscan``: :class:`batchscan.ingest.sources.dicomweb.DicomWebSource`,
  QIDO-RS to find and WADO-RS of the stored bytes, over --connections connections;
* ``DIMSE, batchscan``: :class:`batchscan.ingest.sources.dimse.DimseSource`, C-FIND and
  C-GET, over --connections associations;
* ``peer``: a plain loop with dicomweb-client that fetches every instance
  (``retrieve_instance`` with ``transfer-syntax=*``) and hands each dataset off, one
  request at a time, as a script a site would write; and the same loop told to ask for no
  content encoding (requests asks for gzip by default, which Orthanc honours);

each as "fetch only" (instances handed off) and, for the folder and batchscan's sources,
"fetch + stages" (the header, decode, preprocess and sanity stages of a scan on every
instance, in --connections threads, after one untimed pass that pays the codecs' first
calls). Find is timed apart (the queries of a night).
Then the whole command, ``batchscan scan`` in a fresh process each (model, state, reports
and all, ``--workers`` = --connections), over a folder of the same radiographs, over
DICOMweb and over DIMSE (fetches in the decode processes), and once more over DICOMweb as a
night with nothing new (nothing fetched); with the largest study-score difference against
the folder scan.
Instances Orthanc 1.10 cannot send by C-STORE (HTJ2K) or refuses (the truncated one) are
left out. The last check scores the fetched instances with the shipped model beside the
folder's, and prints the largest difference (the tolerance is 1e-4).

WADO-RS rendered or frame retrieval at a reduced size is not measured: batchscan fetches
the stored instance, so its scores equal a folder scan's by construction.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.uid import HTJ2K, HTJ2KLossless, HTJ2KLosslessRPCL

from batchscan.engines.pipeline import prepare_display
from batchscan.ingest.header import StageOptions
from batchscan.ingest.records import ImageRecord
from batchscan.ingest.sources import Locator, SourceOptions, Window, fetch_all, open_source
from batchscan.synth import write_demo_archive

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # jobs/, for common/
from common import orthanc

STAGES = StageOptions()


def radiographs(folder: Path, pacs: Any) -> dict[str, Path]:
    """The CR and DX files of the demo archive (what the default query finds) that the PACS
    stores and can send both ways, by SOP Instance UID: not the truncated one (Orthanc
    refuses it), not those in HTJ2K (Orthanc 1.10's DCMTK cannot send them by C-STORE)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if ds.get("Modality") not in ("CR", "DX") or ds.file_meta.TransferSyntaxUID in (
                HTJ2KLossless,
                HTJ2KLosslessRPCL,
                HTJ2K,
            ):
                continue
            pacs.upload([path])
        except Exception:
            continue
        found[str(ds.SOPInstanceUID)] = path
    return found


def prepared(content: bytes, name: str) -> np.ndarray | None:
    """The model input of one instance's bytes, through the scan's stages."""
    record = ImageRecord(path=name, abs_path=name)
    result = prepare_display(record, STAGES, content)
    return None if result is None else result[1]


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, value


def in_threads(threads: int, work: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=40)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args()
    if problem := orthanc.dicomweb_missing():
        raise SystemExit(problem)
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_demo_archive(root / "archive", size=args.size, studies=args.studies)
        with orthanc.Orthanc(root / "orthanc", dicomweb=True, reader_aet="BATCHSCAN") as pacs:
            by_uid = radiographs(root / "archive", pacs)
            run(pacs, by_uid, args)
            whole_scans(pacs, by_uid, root, args)


def run(pacs: Any, by_uid: dict[str, Path], args: argparse.Namespace) -> None:
    n, studies, threads = len(by_uid), args.studies, args.connections
    rows: list[tuple[str, float, float, float | None]] = []  # name, fetch s, bytes, stages s

    # the folder: the floor
    read_s, contents = timed(lambda: [p.read_bytes() for p in by_uid.values()])
    folder_bytes = sum(len(c) for c in contents)

    def stages() -> list[Any]:
        items = zip(by_uid, contents, strict=True)
        return in_threads(threads, lambda item: prepared(item[1], item[0]), items)

    stages()  # once untimed: the codecs' first calls and imports are paid by no row
    stages_s, folder_inputs = timed(stages)
    rows.append(("folder (read the files)", read_s, folder_bytes, read_s + stages_s))
    folder_by_uid = dict(zip(by_uid, folder_inputs, strict=True))

    finds: dict[str, float] = {}
    pacs_inputs: dict[str, dict[str, np.ndarray | None]] = {}
    for name, url in (("DICOMweb", pacs.dicomweb_url), ("DIMSE", pacs.dimse_url)):
        source = open_source(url, SourceOptions())
        finds[name], locators = timed(lambda s=source: list(s.find(Window())))
        assert len(locators) == n, (name, len(locators), n)
        fetch_s, fetched = timed(lambda s=source, loc=locators: list(fetch_all(s, loc, threads)))
        fetched_bytes = source.bytes_fetched
        source.close()
        source = open_source(url, SourceOptions())

        def fetch_and_prepare(locator: Locator, s: Any = source) -> tuple[str, Any]:
            try:
                return locator.sop_instance_uid, prepared(s.fetch(locator), locator.path)
            except Exception:
                return locator.sop_instance_uid, None

        both_s, inputs = timed(lambda f=fetch_and_prepare, loc=locators: in_threads(
            threads, f, loc))  # fmt: skip
        source.close()
        failed = sum(1 for _, got in fetched if not isinstance(got, bytes))
        label = f"{name}, batchscan ({threads} connections)"
        if failed:
            label += f" [{failed} not fetched]"
        rows.append((label, fetch_s, fetched_bytes, both_s))
        pacs_inputs[name] = dict(inputs)

    # the peer: dicomweb-client, one request at a time, each dataset handed off; as a site
    # would write it (requests asks for gzip), and told to ask for no encoding
    locators = list(open_source(pacs.dicomweb_url).find(Window()))
    peer_s = 0.0
    for label, headers in (("", None), (", no gzip", {"Accept-Encoding": "identity"})):
        wire = {"bytes": 0}

        def count(response: requests.Response, *_: Any, w: dict = wire, **__: Any) -> Any:
            response.content  # noqa: B018 - read it here, to count what came over the wire
            w["bytes"] += response.raw.tell()
            return response

        client = DICOMwebClient(pacs.dicomweb_url, callback=count, headers=headers)
        handed: list[Any] = []

        def peer(c: DICOMwebClient = client, out: list[Any] = handed) -> None:
            for loc in locators:
                out.append(c.retrieve_instance(
                    loc.study_instance_uid, loc.series_instance_uid, loc.sop_instance_uid,
                    media_types=(("application/dicom", "*"),)))  # fmt: skip

        seconds, _ = timed(peer)
        peer_s = peer_s or seconds
        rows.append((f"peer: dicomweb-client loop{label}", seconds, wire["bytes"], None))

    print(f"\n{n} radiographs in {studies} studies, {args.size} px; {threads} connections\n")
    print("| source | fetch s | instances/s | vs peer | KiB per study (wire) | fetch + stages s "
          "| instances/s | vs folder |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    folder_total = rows[0][3] or 1.0
    for name, seconds, size, total in rows:
        rate = n / seconds
        total_rate = f"{n / total:,.1f}" if total else "-"
        vs_folder = f"{folder_total / total:.2f}" if total else "-"
        print(f"| {name} | {seconds:.2f} | {rate:,.1f} | {peer_s / seconds:.2f} | "
              f"{size / studies / 1024:,.0f} | {f'{total:.2f}' if total else '-'} | "
              f"{total_rate} | {vs_folder} |")  # fmt: skip
    print(
        f"\nfind (the night's queries): DICOMweb {finds['DICOMweb']:.2f} s, "
        f"DIMSE {finds['DIMSE']:.2f} s for {studies} studies"
    )
    score_check(folder_by_uid, pacs_inputs)


def score_check(
    folder: dict[str, np.ndarray | None], pacs: dict[str, dict[str, np.ndarray | None]]
) -> None:
    """The largest score difference between each PACS route and the folder."""
    from batchscan.scoring.infer import Scorer
    from batchscan.scoring.model import load_model

    scorer = Scorer(load_model(), batch_size=256, jit_compile=False)
    for name, inputs in pacs.items():
        uids = [u for u, t in inputs.items() if t is not None and folder.get(u) is not None]
        ours = scorer.score(np.stack([inputs[u] for u in uids]))
        theirs = scorer.score(np.stack([folder[u] for u in uids]))  # type: ignore[misc]
        print(
            f"scores, {name} against the folder: {len(uids)} images, largest difference "
            f"{float(np.abs(np.asarray(ours) - np.asarray(theirs)).max()):.1e}"
        )


def whole_scans(pacs: Any, by_uid: dict[str, Path], root: Path, args: argparse.Namespace) -> None:
    """``batchscan scan`` end to end over a folder of the radiographs and over the PACS."""
    folder = root / "radiographs"
    folder.mkdir()
    for uid, path in by_uid.items():
        shutil.copyfile(path, folder / f"{uid}.dcm")
    common = ["--workers", str(args.connections), "--no-progress"]
    pacs_options = ["--pacs-connections", str(args.connections), "--calling-aet", "BATCHSCAN"]
    runs = [
        ("folder", str(folder), root / "out-folder", []),
        ("DICOMweb", pacs.dicomweb_url, root / "out-dicomweb", pacs_options),
        ("DIMSE", pacs.dimse_url, root / "out-dimse", pacs_options),
        ("DICOMweb, a night with nothing new", pacs.dicomweb_url, root / "out-dicomweb",
         pacs_options),
    ]  # fmt: skip
    n = len(by_uid)
    print(f"\nbatchscan scan, whole command in a fresh process ({n} radiographs)\n")
    print("| archive | seconds | instances/s | vs folder | largest study-score difference |")
    print("|---|---|---|---|---|")
    folder_s = 0.0
    folder_scores: pd.Series | None = None
    for name, archive, out, extra in runs:
        argv = ["scan", archive, "--out", str(out), *common, *extra]
        code = f"from batchscan.cli import main; raise SystemExit(main({argv!r}))"
        seconds, done = timed(lambda c=code: subprocess.run([sys.executable, "-c", c]))
        if done.returncode != 0:
            print(f"| {name} | exit {done.returncode} | | | |")
            continue
        scores = pd.read_parquet(out / "studies.parquet").set_index("study_instance_uid")["score"]
        if folder_scores is None:
            folder_s, folder_scores = seconds, scores
        common_uids = scores.index.intersection(folder_scores.index)
        difference = (scores[common_uids] - folder_scores[common_uids]).abs().max()
        studies = f"{len(common_uids)} of {len(folder_scores)} studies"
        print(f"| {name} | {seconds:.1f} | {n / seconds:,.1f} | {folder_s / seconds:.2f} | "
              f"{difference:.1e} ({studies}) |")  # fmt: skip


if __name__ == "__main__":
    main()
