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

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("batchscan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
