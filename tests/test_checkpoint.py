"""Checkpoints: what is saved loads back the same; anything damaged or foreign is refused
with a reason."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from config import ModelError
from synthesis.checkpoint import (
    Architecture,
    CheckpointMeta,
    InstitutionProfile,
    load_checkpoint,
    save_checkpoint,
)
from synthesis.models import build


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    generator = build("mmgsn", width_multiplier=0.125, output="linear")
    discriminator = build("patchgan", width_multiplier=0.125)
    meta = CheckpointMeta(
        architecture=Architecture(name="mmgsn", config=generator.config),
        discriminator=Architecture(name="patchgan", config=discriminator.config),
        institutions=[InstitutionProfile(key="inst1", manufacturer="SIEMENS",
                                         patient_mean={"t1w": 300.0, "t2w": 120.0})],
    )
    path = save_checkpoint(tmp_path / "model.safetensors", generator, meta, discriminator)
    return path, generator


def test_round_trip(saved):
    path, generator = saved
    checkpoint = load_checkpoint(path)
    assert checkpoint.meta.institutions[0].patient_mean["t1w"] == 300.0
    assert checkpoint.meta.package_version
    assert checkpoint.discriminator is not None
    x = torch.randn(1, 2, 32, 28)
    generator.eval()
    with torch.no_grad():
        torch.testing.assert_close(checkpoint.generator(x), generator(x))
    assert not checkpoint.generator.training


def test_a_flipped_byte_is_caught(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupted: the weights' checksum does not match"):
        load_checkpoint(path)


def test_a_truncated_file_is_refused(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupted"):
        load_checkpoint(path)


def test_foreign_files_are_refused(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a safetensors checkpoint"):
        load_checkpoint(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ModelError, match="not a vcemri checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(ModelError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.safetensors")


def _rewrite_meta(path, change):
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    meta = json.loads(header["__metadata__"]["vcemri"])
    change(meta)
    header["__metadata__"]["vcemri"] = json.dumps(meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + size:])


def test_a_newer_format_is_refused_with_advice(saved):
    path, _ = saved
    _rewrite_meta(path, lambda m: m.update(format_version=99))
    with pytest.raises(ModelError, match="format version 99; this vcemri reads up to 1") as caught:
        load_checkpoint(path)
    assert "upgrade vcemri" in str(caught.value)


def test_weights_that_do_not_fit_the_architecture_are_refused(saved):
    path, _ = saved
    _rewrite_meta(path, lambda m: m["architecture"]["config"].update(width_multiplier=0.25))
    with pytest.raises(ModelError, match="generator weights do not fit mmgsn"):
        load_checkpoint(path)


def test_unknown_architecture_is_refused(saved):
    path, _ = saved
    _rewrite_meta(path, lambda m: m["architecture"].update(name="vnet"))
    with pytest.raises(ModelError, match="cannot build generator 'vnet'"):
        load_checkpoint(path)


def test_an_ood_calibration_on_a_missing_layer_is_refused(saved):
    path, _ = saved
    _rewrite_meta(path, lambda m: m["ood"].update(feature="no_such_layer", threshold=1.0))
    with pytest.raises(ModelError, match="names layer 'no_such_layer'"):
        load_checkpoint(path)


def test_an_unknown_normalization_is_refused(saved):
    path, _ = saved
    _rewrite_meta(path, lambda m: m["normalization"].update(method="z-score"))
    with pytest.raises(ModelError, match="invalid checkpoint metadata at normalization.method"):
        load_checkpoint(path)
