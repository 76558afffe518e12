"""Mutations of real DICOM bytes, shared by the hypothesis suite and the atheris harness.

Each mutation keeps most of a valid file and breaks one thing the way archives break:
truncation (interrupted transfers), flipped bytes (bad media), absurd values in the image
tags, a wrong VR, and broken encapsulation (item lengths and delimiters of compressed data).
"""

from __future__ import annotations

import struct
from pathlib import Path

from pydicom.data import get_testdata_file

from batchscan.synth import RadiographSpec, build_dataset, chest_phantom, encode, stored_values

#: Image tags whose values are replaced with absurd ones: (group, element).
IMAGE_TAGS = (
    (0x0028, 0x0010),  # Rows
    (0x0028, 0x0011),  # Columns
    (0x0028, 0x0100),  # BitsAllocated
    (0x0028, 0x0101),  # BitsStored
    (0x0028, 0x0102),  # HighBit
    (0x0028, 0x0103),  # PixelRepresentation
    (0x0028, 0x0002),  # SamplesPerPixel
)
ITEM_TAG = b"\xfe\xff\x00\xe0"
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0"
VRS = (b"US", b"SS", b"OB", b"OW", b"UN", b"SQ", b"UL", b"DS", b"XX", b"\x00\x00")


def seed_files() -> list[bytes]:
    """Small valid files in several transfer syntaxes: generated ones and pydicom's own."""
    import io

    from pydicom.uid import (
        JPEG2000,
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        HTJ2KLossless,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        RLELossless,
    )

    seeds = []
    picture = chest_phantom(48, seed=5, opacity=0.5)
    for syntax in (
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
        JPEG2000,
        JPEGBaseline8Bit,
        JPEGLosslessSV1,  # libjpeg-turbo
        JPEGLossless,
        HTJ2KLossless,  # OpenJPEG's HT decoder at reduced resolution
    ):
        spec = RadiographSpec(transfer_syntax=syntax)
        pixels = stored_values(picture, spec)
        ds = encode(build_dataset(pixels, spec), pixels, syntax)
        buffer = io.BytesIO()
        ds.save_as(
            buffer,
            enforce_file_format=True,
            little_endian=syntax != ExplicitVRBigEndian,
            implicit_vr=False,
        )
        seeds.append(buffer.getvalue())
    for name in ("MR_small.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "emri_small_RLE.dcm"):
        path = get_testdata_file(name)
        if path is not None and Path(path).stat().st_size < 300_000:
            seeds.append(Path(path).read_bytes())
    return seeds


def truncate(data: bytes, at: float) -> bytes:
    """Cut the file at fraction `at` of its length."""
    return data[: int(len(data) * at)]


def flip(data: bytes, positions: list[float], values: list[int]) -> bytes:
    """Overwrite bytes at the given fractional positions."""
    out = bytearray(data)
    if not out:
        return data
    for where, value in zip(positions, values, strict=False):
        out[min(int(where * len(out)), len(out) - 1)] = value
    return bytes(out)


def absurd_value(data: bytes, tag_index: int, value: int) -> bytes:
    """Replace the 2-byte value of an image tag (explicit VR little endian) by `value`."""
    group, element = IMAGE_TAGS[tag_index % len(IMAGE_TAGS)]
    needle = struct.pack("<HH", group, element) + b"US\x02\x00"
    where = data.find(needle)
    if where < 0:
        return data
    start = where + len(needle)
    return data[:start] + struct.pack("<H", value & 0xFFFF) + data[start + 2 :]


def wrong_vr(data: bytes, which: float, vr_index: int) -> bytes:
    """Replace the VR of one explicit-VR element in the image group by another VR."""
    offsets = [
        i + 4
        for i in range(len(data) - 6)
        if data[i : i + 2] == b"\x28\x00"
        and data[i + 4 : i + 6] in (b"US", b"SS", b"DS", b"IS", b"CS", b"OB", b"OW")
    ]
    if not offsets:
        return data
    at = offsets[min(int(which * len(offsets)), len(offsets) - 1)]
    return data[:at] + VRS[vr_index % len(VRS)] + data[at + 2 :]


def break_encapsulation(data: bytes, which: float, length: int) -> bytes:
    """Give one item of encapsulated pixel data a wrong length, or drop the delimiter."""
    items = []
    start = data.find(b"\xe0\x7f\x10\x00")
    while start >= 0:
        start = data.find(ITEM_TAG, start + 1)
        if start >= 0:
            items.append(start)
    if not items:
        return data
    at = items[min(int(which * len(items)), len(items) - 1)]
    if length % 7 == 0:
        return data.replace(SEQUENCE_DELIMITER, b"")
    return data[: at + 4] + struct.pack("<I", length & 0xFFFFFFFF) + data[at + 8 :]
