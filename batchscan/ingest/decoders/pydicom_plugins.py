"""Every transfer syntax pydicom can decode, at full resolution: the last decoder tried.

pydicom picks among its plugins (pylibjpeg, pyjpegls, Pillow, its own RLE and native
readers); they are tried here one by one so that the ``decoder`` column names the one that
worked (``pydicom`` for uncompressed data, ``pydicom:<plugin>`` otherwise).
"""

from __future__ import annotations

from typing import Final

from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import Decoder, get_decoder

from batchscan.ingest.decoders.base import Decoded, full_resolution, syntax_of
from batchscan.ingest.records import INTERPRETER_EXITS

NAME: Final = "pydicom"


class AllPluginsFailedError(RuntimeError):
    """Every installed plugin refused the frame (the message lists each one's error)."""


def preference_order(decoder: Decoder) -> list[str]:
    """The decoder's available plugins in pydicom's own order of preference (the order they
    were registered in: pylibjpeg-rle before pydicom's pure-Python RLE, which is ~6x slower).
    ``available_plugins`` is sorted by name, so the registration order is read from the
    plugin table when this pydicom has one."""
    table = getattr(decoder, "_available", None)
    return list(table) if isinstance(table, dict) else list(decoder.available_plugins)


def is_available(ds: Dataset) -> bool:
    """Always offered: whether the syntax is supported was checked before decoding."""
    return True


def decode(frame: bytes | None, ds: Dataset, level: int) -> Decoded | None:
    """Decode the first frame in full through pydicom.

    Raises
    ------
    Exception
        The plugin's own exception when only one plugin exists (so that truncation and
        similar messages keep their meaning), :class:`AllPluginsFailedError` when several failed.
    """
    decoder = get_decoder(syntax_of(ds))
    if decoder.is_native:
        return full_resolution(decoder.as_array(ds, index=0)[0], NAME)
    plugins = preference_order(decoder)
    errors: list[tuple[str, BaseException]] = []
    for plugin in plugins:
        try:
            values = decoder.as_array(ds, index=0, decoding_plugin=plugin)[0]
        except INTERPRETER_EXITS:
            raise
        except BaseException as exc:  # the next plugin may read it (a Rust panic too)
            errors.append((plugin, exc))
            continue
        return full_resolution(values, f"{NAME}:{plugin}")
    if len(errors) == 1:
        raise errors[0][1]
    raise AllPluginsFailedError(
        "exceptions were raised by all available plugins: "
        + "; ".join(f"{name}: {exc}" for name, exc in errors)
    )
