"""Compressed MR must be readable: each transfer syntax a scanner or router may send, encoded
by a real encoder (dcmtk, or openjpeg for JPEG 2000), decodes with the declared dependencies
to exactly the original pixels."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from support.tools import require

# (transfer syntax, dcmtk encoder and options, pydicom decoding plugin or None for no plugin)
DCMTK_ENCODINGS = [
    pytest.param(JPEGLosslessSV1, ["dcmcjpeg", "+e1"], "pylibjpeg", id="jpeg-lossless-sv1"),
    pytest.param(JPEGLossless, ["dcmcjpeg", "+el"], "pylibjpeg", id="jpeg-lossless-p14"),
    pytest.param(JPEGLSLossless, ["dcmcjpls"], "pylibjpeg", id="jpeg-ls-lossless"),
    pytest.param(RLELossless, ["dcmcrle"], "pylibjpeg", id="rle"),
    pytest.param(DeflatedExplicitVRLittleEndian, ["dcmconv", "+td"], None, id="deflate"),
]


def _decoded(path: Path, plugin: str | None) -> np.ndarray:
    ds = pydicom.dcmread(path)
    if plugin is not None:
        ds.pixel_array_options(decoding_plugin=plugin)
    return ds.pixel_array


@pytest.mark.dcmtk
@pytest.mark.parametrize(("syntax", "encoder", "plugin"), DCMTK_ENCODINGS)
def test_dcmtk_compressed_mr_decodes_losslessly(syntax, encoder, plugin, mr_file, tmp_path):
    tool, *options = encoder
    out = tmp_path / "compressed.dcm"
    subprocess.run([str(require(tool)), *options, str(mr_file), str(out)], check=True)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == syntax

    pixels = _decoded(out, plugin)

    original = pydicom.dcmread(mr_file).pixel_array
    assert pixels.dtype == original.dtype
    np.testing.assert_array_equal(pixels, original)


def test_jpeg2000_mr_decodes_losslessly(mr_file, tmp_path):
    ds = pydicom.dcmread(mr_file)
    original = ds.pixel_array.copy()
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    out = tmp_path / "j2k.dcm"
    ds.save_as(out)

    np.testing.assert_array_equal(_decoded(out, "pylibjpeg"), original)


@pytest.mark.parametrize(("name", "short_by"), [
    ("MR_small.dcm", 3000), ("MR_small_RLE.dcm", 3000), ("MR_small_jpeg_ls_lossless.dcm", 3000),
    ("JPEG2000.dcm", 100)])  # a 3,308-byte file: its last 100 bytes are pixel data
def test_the_spool_sees_pixel_data_cut_short_in_transfer(name, short_by):
    import io

    from pydicom.data import get_testdata_file

    from dicom_node.pixel_check import pixel_data_problem

    whole = Path(get_testdata_file(name)).read_bytes()
    cut = whole[:-short_by]
    assert pixel_data_problem(pydicom.dcmread(io.BytesIO(whole), force=True), whole) is None
    problem = pixel_data_problem(pydicom.dcmread(io.BytesIO(cut), force=True), cut)
    assert problem is not None and "truncated in transfer" in problem
