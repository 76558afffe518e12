"""The validators every SR the tests make must pass: dicom3tools' ``dciodvfy`` (the IOD)
and Pixelmed's ``DicomSRValidator`` (the IOD and the SR templates, TID 1500 and those it
includes, with their context groups: the validator IHE Connectathons use for AI Results).

A test that needs one skips with a visible reason when it is not installed
(``bash tests/debian-tools.sh`` installs both, as root).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

HERE = Path(__file__).resolve().parent
TOOLS = "bash tests/debian-tools.sh installs it (as root)"
#: The Java source that runs Pixelmed's validator over many files in one process.
PIXELMED_MANY = HERE / "PixelmedSRValidator.java"
#: JAXP's XPath limits (JDK 17 and later) stop the validator's large XPath expressions
#: ("JAXP0801002: the compiler encountered an XPath expression containing ... operators");
#: 0 lifts them.
JAXP_UNLIMITED = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)


def need(tool: str) -> str:
    """The path of a command, or a skip naming it."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed; {TOOLS}")
    return path


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for one file (it prints to stderr and exits 0 either way)."""
    done = subprocess.run([need("dciodvfy"), str(path)], capture_output=True, text=True)
    return [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]


def pixelmed_jar() -> Path:
    """Pixelmed's jar, as Debian's DicomSRValidator script names it (or a skip)."""
    script = Path(need("DicomSRValidator"))
    found = re.search(r"-cp\s+(\S+\.jar)", script.read_text(errors="replace"))
    jar = Path(found.group(1)) if found else Path("/usr/share/java/pixelmed.jar")
    if not jar.is_file():
        pytest.skip(f"Pixelmed's jar is not at {jar}; {TOOLS}")
    return jar


def pixelmed_findings(paths: Sequence[Path]) -> dict[Path, list[str]]:
    """Pixelmed's Error and Warning lines for each file, from one Java process.

    Running a Java source file needs a JDK (the compiler module), not only the runtime
    that pixelmed-apps pulls in."""
    jar = pixelmed_jar()
    java = need("java")
    need("javac")
    command = [java, *JAXP_UNLIMITED, "-cp", str(jar), str(PIXELMED_MANY), *map(str, paths)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    findings: dict[Path, list[str]] = {}
    current: list[str] = []
    for line in done.stdout.splitlines():
        if line.startswith("=== "):
            current = findings.setdefault(Path(line[4:]), [])
        elif line.startswith(("Error", "Warning")):
            current.append(line)
    assert set(findings) == set(paths), done.stdout[-2000:]
    return findings


def tree_shape(dataset: Dataset) -> tuple[object, ...]:
    """An SR's content tree without its values but with its codes: the value types,
    relationships, concept names and coded values, nested as in the tree. Pixelmed checks
    the tree's structure and codes against the templates, so SRs of one shape pass or
    fail it alike. (batchscan's own verdicts, of its private scheme, are coded values no
    template constrains: Yes, No or Undetermined make one shape.)"""
    return tuple(
        (
            item.get("RelationshipType"),
            item.ValueType,
            item.ConceptNameCodeSequence[0].CodeValue
            if "ConceptNameCodeSequence" in item
            else None,
            item.ConceptCodeSequence[0].CodeValue if "ConceptCodeSequence" in item else None,
            tree_shape(item),
        )
        for item in dataset.get("ContentSequence", [])
    )
