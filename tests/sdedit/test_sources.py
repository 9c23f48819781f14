"""Model sources: what a hub download fetches, concurrent URL copies, the files' identity."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from types import SimpleNamespace

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from sdedit.sources import ModelSourceError, copy_url, files_identity, hub_allow_patterns, resolve

SD15_FILES = [
    ".gitattributes", "README.md", "model_index.json", "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors", "v1-5-pruned-emaonly.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json", "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin", "safety_checker/model.fp16.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin",
    "text_encoder/pytorch_model.fp16.bin",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "unet/diffusion_pytorch_model.non_ema.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.bin",
]


def test_hub_download_takes_one_weights_variant_and_the_tokenizer():
    assert hub_allow_patterns(SD15_FILES) == [
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]


def test_hub_download_of_sdxl_takes_both_text_encoders_and_tokenizers():
    """stabilityai/stable-diffusion-xl-base-1.0's layout (its file list, abridged)."""
    files = ["model_index.json", "sd_xl_base_1.0.safetensors", "scheduler/scheduler_config.json",
             "text_encoder/config.json", "text_encoder/model.safetensors",
             "text_encoder/model.fp16.safetensors", "text_encoder_2/config.json",
             "text_encoder_2/model.safetensors", "text_encoder_2/model.fp16.safetensors",
             "text_encoder_2/openvino_model.bin", "tokenizer/vocab.json", "tokenizer/merges.txt",
             "tokenizer_2/vocab.json", "tokenizer_2/merges.txt", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors",
             "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors", "vae_1_0/config.json"]
    assert hub_allow_patterns(files) == [
        "model_index.json", "scheduler/scheduler_config.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors",
        "tokenizer/merges.txt", "tokenizer/vocab.json",
        "tokenizer_2/merges.txt", "tokenizer_2/vocab.json",
        "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
    ]


def test_hub_download_falls_back_to_bin_and_shards():
    files = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin",
             "unet/diffusion_pytorch_model.fp16.bin", "vae/config.json",
             "vae/diffusion_pytorch_model.safetensors.index.json",
             "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
             "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
             "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
             "text_encoder/config.json", "text_encoder/pytorch_model.bin",
             "scheduler/scheduler_config.json"]
    chosen = hub_allow_patterns(files)
    assert "unet/diffusion_pytorch_model.bin" in chosen
    assert "unet/diffusion_pytorch_model.fp16.bin" not in chosen
    assert [f for f in chosen if f.startswith("vae/")] == [
        "vae/config.json", "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json"]
    assert "text_encoder/pytorch_model.bin" in chosen


FLUX_FILES = [  # the layout of black-forest-labs/FLUX.1-schnell
    ".gitattributes", "README.md", "ae.safetensors", "flux1-schnell.safetensors",
    "model_index.json", "schnell_grid.jpeg", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json", "tokenizer_2/tokenizer_config.json",
    "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json", "vae/diffusion_pytorch_model.safetensors",
]


def test_hub_download_of_a_transformer_pipeline_takes_every_part_it_loads():
    """Flux / SD3 layouts: transformer/, text_encoder_2/ (and _3/), tokenizer_2/ (and _3/)
    are fetched, sharded or not; root-level single-file checkpoints are not."""
    chosen = hub_allow_patterns(FLUX_FILES)
    assert chosen == sorted(set(FLUX_FILES) - {".gitattributes", "README.md", "ae.safetensors",
                                               "flux1-schnell.safetensors", "schnell_grid.jpeg"})
    sd3 = ["model_index.json", "transformer/config.json",
           "transformer/diffusion_pytorch_model.safetensors",
           "transformer/diffusion_pytorch_model.fp16.safetensors", "text_encoder_3/config.json",
           "text_encoder_3/model.safetensors.index.json",
           "text_encoder_3/model-00001-of-00002.safetensors",
           "text_encoder_3/model-00002-of-00002.safetensors",
           "text_encoder_3/model.fp16-00001-of-00002.safetensors",
           "tokenizer_3/spiece.model", "image_encoder/config.json",
           "image_encoder/model.safetensors"]
    assert hub_allow_patterns(sd3) == sorted(set(sd3) - {
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder_3/model.fp16-00001-of-00002.safetensors", "image_encoder/config.json",
        "image_encoder/model.safetensors"})


def test_hub_download_of_a_root_layout_model():
    files = ["README.md", "config.json", "scheduler_config.json",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "images/generated_image.png"]
    assert hub_allow_patterns(files) == ["config.json", "diffusion_pytorch_model.safetensors",
                                         "scheduler_config.json"]


def test_concurrent_url_copies_do_not_collide(tiny_vp_dir, tmp_path, monkeypatch):
    """Two actors copy the same model at once: each into its own temporary folder, one atomic
    rename wins, both get the complete copy and nothing is left behind."""
    fs = fsspec.filesystem("memory")
    for f in Path(tiny_vp_dir).iterdir():
        fs.pipe_file(f"/race/tiny/{f.name}", f.read_bytes())
    both_copying = threading.Barrier(2, timeout=10)
    arrived: set[int] = set()
    one_reader = threading.Lock()   # memory:// shares one file object (and position) per path
    original = MemoryFileSystem.get_file

    def get_file(self, rpath, lpath, **kwargs):
        if threading.get_ident() not in arrived:   # hold each thread until both are copying
            arrived.add(threading.get_ident())
            both_copying.wait()
        with one_reader:
            return original(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "get_file", get_file)
    results: list[Path] = []
    errors: list[BaseException] = []

    def copy() -> None:
        try:
            results.append(copy_url("memory://race/tiny", tmp_path / "cache", {}))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=copy) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    target = results[0]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [target.name]
    assert (target / ".complete").exists()
    for f in Path(tiny_vp_dir).iterdir():
        assert (target / f.name).read_bytes() == f.read_bytes()
    # a stale incomplete copy (an older version crashed mid-rename) is replaced
    for f in list(target.iterdir()):
        if f.name == ".complete":
            f.unlink()
    monkeypatch.setattr(MemoryFileSystem, "get_file", original)
    assert copy_url("memory://race/tiny", tmp_path / "cache", {}) == target
    assert (target / ".complete").exists()


def test_files_identity_is_sha256sum_of_sha256sum(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weights" * 1000)
    (tmp_path / "config.json").write_text("{}")
    files = [tmp_path / "unet" / "w.safetensors", tmp_path / "config.json"]
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}\n"
                      for p, name in sorted(zip(files, ["unet/w.safetensors", "config.json"],
                                                strict=True), key=lambda pair: pair[1]))
    identity = files_identity(tmp_path, files)
    assert identity == "sha256:" + hashlib.sha256(listing.encode()).hexdigest()
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"weights" * 999 + b"other!!")
    assert files_identity(tmp_path, files) != identity


def test_a_checkpoint_file_points_to_the_converter(tmp_path):
    (tmp_path / "model.ckpt").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"is a file.*convert_checkpoint"):
        resolve(str(tmp_path / "model.ckpt"), None, None)


def test_from_hub_asks_only_for_the_chosen_files(tmp_path, monkeypatch):
    import huggingface_hub

    from sdedit.sources import from_hub

    calls = {}
    snapshot = tmp_path / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)

    def fake_snapshot(repo_id, allow_patterns=None, **kwargs):
        calls[repo_id] = allow_patterns
        return str(snapshot)

    siblings = [SimpleNamespace(rfilename=name) for name in SD15_FILES]
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda self, repo_id, **kwargs: SimpleNamespace(siblings=siblings))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert from_hub("someone/sd15") == snapshot
    assert calls == {"someone/sd15": hub_allow_patterns(SD15_FILES)}
    assert resolve("someone/sd15", None, None).revision == "b" * 40
