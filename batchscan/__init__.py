"""batchscan: score the chest radiographs of a DICOM archive with a pneumonia CNN.

The package follows the data; each subpackage is a part of the flow and imports only the
parts before it (``tests/test_layout.py`` holds it to that)::

    storage  (below it all: the one way to write a file, the one way to open a store)
    ingest   (discover -> header -> decode + normalize -> preprocess)
      -> scoring  (model, infer, ood, the model-input store)
      -> engines  (all cores of one machine, or a Ray cluster)
      -> results  (per study, the state, Parquet/CSV, report.html)
      -> site     (report labels, evaluate, monitoring, train, adapt)
      -> pacs     (a DICOM SR per study, sent to the PACS)

On top: ``scan`` (one run), ``cli`` (the thin command line), ``config`` (the TOML config
file) and ``synth`` (the demo archive and the tests' DICOM files).
"""

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Final

try:
    __version__ = version("batchscan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

#: The distributions whose release can change what the model receives for a film (the
#: decoders, the windowing and resizing arrays, Pillow's resize) or what it gives (the network),
#: and pyarrow, which stores the scores. :func:`versions` reads them for manifest.json,
#: runs.parquet and ``batchscan --version --verbose``; tests/test_input_digests.py and
#: tests/test_recorded_scores.py fail when a release of one changes an input or a score.
SCORE_PACKAGES: Final = (
    "tensorflow",
    "keras",
    "numpy",
    "pydicom",
    "pillow",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "imagecodecs",
    "pyarrow",
)


def version_column(name: str) -> str:
    """The runs.parquet column of `name`'s version (``pylibjpeg-rle`` ->
    ``pylibjpeg_rle_version``)."""
    return f"{name.replace('-', '_')}_version"


#: The runs.parquet (and state) columns of :func:`versions`, in its order.
VERSION_COLUMNS: Final = tuple(version_column(n) for n in ("python", *SCORE_PACKAGES))


def versions() -> dict[str, str | None]:
    """The versions behind a score: Python's and each of :data:`SCORE_PACKAGES` (None when
    it is not installed), from the installed metadata, so that no package is imported (a
    night with nothing new still never loads TensorFlow)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in SCORE_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def version_facts(found: dict[str, str | None]) -> dict[str, str | None]:
    """`found` (what :func:`versions` gave) by its runs.parquet columns."""
    return {version_column(name): value for name, value in found.items()}


__all__ = [
    "SCORE_PACKAGES",
    "VERSION_COLUMNS",
    "__version__",
    "version_column",
    "version_facts",
    "versions",
]
