"""sdedit.weights: a weights file cut short or malformed is refused from its header alone."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdedit.models import inspect_model_dir
from sdedit.sources import ModelSourceError
from sdedit.weights import check_weights_file
from tests.support.tiny_models import save_vp_model


def _safetensors(path: Path) -> Path:
    save_file({"a": torch.zeros(3, 4), "b": torch.ones(5, dtype=torch.float16)}, str(path))
    return path


def _header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length])


def _with_header(path: Path, header: dict, payload: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    return path


def test_whole_files_pass(tmp_path):
    check_weights_file(_safetensors(tmp_path / "w.safetensors"), "m")
    torch.save({"w": torch.zeros(4)}, tmp_path / "w.bin")
    check_weights_file(tmp_path / "w.bin", "m")


@pytest.mark.parametrize(("cut", "message"), [
    (1, "is truncated: its header describes 58 bytes of tensors after the header, the "
        "file holds 57"),
    (60, "is truncated: "),
    (None, "fewer than the 8 of a safetensors header length"),
])
def test_truncated_safetensors_are_refused(tmp_path, cut, message):
    path = _safetensors(tmp_path / "w.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-cut] if cut else data[:5])
    with pytest.raises(ModelSourceError, match=r"model source .m.: weights file .*w\.safetensors") \
            as info:
        check_weights_file(path, "m")
    assert message in str(info.value) and "download or copy it again" in str(info.value)


def test_malformed_safetensors_headers_are_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    cases = [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 9,
         "has extra bytes"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
         "tensor 'a' of 8 bytes; its shape and dtype need 12"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8,
         "gap or overlap at tensor 'a'"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "without valid data_offsets"),
        ([1, 2], b"", "not a JSON object"),
    ]
    for header, payload, message in cases:
        with pytest.raises(ModelSourceError, match=message):
            check_weights_file(_with_header(path, header, payload), "m")
    path.write_bytes(struct.pack("<Q", 3) + b"{no")
    with pytest.raises(ModelSourceError, match="not valid JSON"):
        check_weights_file(path, "m")
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ModelSourceError, match="not a safetensors file"):
        check_weights_file(path, "m")


def test_truncated_or_foreign_torch_checkpoints_are_refused(tmp_path):
    path = tmp_path / "w.bin"
    torch.save({"w": torch.zeros(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelSourceError, match="zip archive whose directory cannot be read"):
        check_weights_file(path, "m")
    path.write_bytes(b"not weights at all")
    with pytest.raises(ModelSourceError, match="neither a safetensors file nor a PyTorch"):
        check_weights_file(path, "m")


def test_model_layout_checks_refuse_a_truncated_weights_file(tiny_vp_dir, tiny_sd_dir,
                                                              tmp_path):
    """The check `validate` (and `run`, before Ray) makes: the issue's truncated safetensors
    passed it before (only the file's presence was checked)."""
    pixel = tmp_path / "pixel"
    shutil.copytree(tiny_vp_dir, pixel)
    weights = pixel / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelSourceError, match=r"diffusion_pytorch_model\.safetensors is "
                                               "truncated"):
        inspect_model_dir(pixel, "pixel")
    save_vp_model(tmp_path / "bin", safe=False)
    inspect_model_dir(tmp_path / "bin", "bin")  # a whole .bin passes
    latent = tmp_path / "latent"
    shutil.copytree(tiny_sd_dir, latent)
    inspect_model_dir(latent, "latent")
    vae = next((latent / "vae").glob("*.safetensors"))
    vae.write_bytes(vae.read_bytes()[:-10])
    with pytest.raises(ModelSourceError, match=r"vae/.*safetensors is truncated"):
        inspect_model_dir(latent, "latent")
