"""Is a received instance's pixel data all there? Checked before the C-STORE is acknowledged,
so that a scanner never believes a truncated image was delivered (a T1w slice cut by 3,000
bytes used to get Success and fail its job later).

- Native (uncompressed) transfer syntaxes: the Pixel Data value must hold at least what Rows,
  Columns, Samples per Pixel, Number of Frames, Bits Allocated and the photometric
  interpretation need (pydicom's ``get_expected_length``).
- Encapsulated (compressed) ones: the value must parse as a Basic Offset Table and whole
  fragment items, at least one per frame, and the sequence delimiter must follow them in the
  received bytes (pydicom drops a cut last item silently, and says so only by a warning,
  which is process-wide state and no use to concurrent associations). The codestreams
  themselves are decoded only when the job runs.

A data set that ends before its pixel data, or whose pixel data element is cut, is refused
the same way: pydicom reads a cut value short, or not at all. The spool hands over the data
set it has already read (one parse per instance).
"""

from __future__ import annotations

import re
import struct

import pydicom
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

#: An encapsulated Pixel Data element's header (explicit VR little endian, OB, or OW as some
#: writers have it, undefined length) and the sequence delimitation item that closes its
#: fragments.
_ENCAPSULATED = re.compile(b"\xe0\x7f\x10\x00(?:OB|OW|UN)\x00\x00\xff\xff\xff\xff")
_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _int(dataset: pydicom.Dataset, keyword: str, default: int) -> int:
    try:
        value = dataset.get(keyword, default)
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        return default


def _fragments(value: bytes) -> int:
    """Fragments of an encapsulated Pixel Data value (after its Basic Offset Table); raises
    ``ValueError`` when an item is cut short."""
    offset, count = 0, -1
    while offset < len(value):
        if offset + 8 > len(value):
            raise ValueError("an item header is cut")
        group, element, length = struct.unpack_from("<HHI", value, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            break
        if (group, element) != (0xFFFE, 0xE000):
            raise ValueError(f"({group:04X},{element:04X}) where an item should be")
        if offset + 8 + length > len(value):
            raise ValueError(f"an item of {length} bytes holds {len(value) - offset - 8}")
        offset += 8 + length
        count += 1
    return max(count, 0)


def pixel_data_problem(dataset: pydicom.Dataset, encoded: bytes) -> str | None:
    """Why the pixel data of ``dataset`` (``encoded`` read in full, file meta included) is
    incomplete, or None."""
    # first: pydicom drops a data set's last elements when it ends inside their sequence
    header = _ENCAPSULATED.search(encoded)
    if header is not None and encoded.find(_DELIMITER, header.end()) < 0:
        return ("the compressed pixel data has no sequence delimiter (the data set ends "
                "inside it): truncated in transfer?")
    rows, columns = _int(dataset, "Rows", 0), _int(dataset, "Columns", 0)
    keyword = next((k for k in PIXEL_KEYWORDS if k in dataset), None)
    if keyword is None:
        if rows and columns:
            return ("the data set has Rows and Columns but no pixel data (it ends before its "
                    "Pixel Data: truncated in transfer?)")
        return None
    if not rows or not columns:
        return None  # nothing to measure against; the header's own checks judge it
    value = dataset[keyword].value or b""
    frames = max(1, _int(dataset, "NumberOfFrames", 1))
    syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    if keyword == "PixelData" and syntax and syntax.is_encapsulated:
        try:
            fragments = _fragments(value)
        except ValueError as exc:
            return f"the compressed pixel data cannot be parsed ({exc}): truncated in transfer?"
        if fragments < frames:
            return (f"the compressed pixel data holds {fragments} fragment(s) for {frames} "
                    "frame(s): truncated in transfer?")
        return None
    try:
        needed = int(get_expected_length(dataset, "bytes"))  # YBR_FULL_422, 1-bit, float
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return f"the pixel data's size cannot be worked out from the header ({exc})"
    if len(value) < needed:
        bits = _int(dataset, "BitsAllocated", 8)
        return (f"the pixel data holds {len(value)} bytes where {rows} x {columns} pixels x "
                f"{frames} frame(s) at {bits} bits allocated need {needed}: truncated in "
                "transfer?")
    return None
