"""batchscan: score the chest radiographs of a DICOM archive with a pneumonia CNN.

The package follows the data, one module per stage::

    discover -> header -> dicom (decode + normalize) -> preprocess -> infer
             -> aggregate -> report

``pipeline`` runs the stages on one machine, ``cli`` is the thin command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("batchscan")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
