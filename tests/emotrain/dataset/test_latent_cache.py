"""The cache of encoded latents and text embeddings: a second start and a resume encode
nothing, a changed image is encoded again (and only it), a damaged file is never used."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextModelWithProjection

from data_helpers import write_images
from helpers import run_cli, run_json, train

CAPTIONS = {f"{i}.png": f"image {i}, tags" for i in range(5)}


@pytest.fixture
def calls(monkeypatch):
    """How often the VAE and the text encoders really run."""
    counts = {"vae": 0, "text": 0}

    def counting(cls, method, key):
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            counts[key] += 1
            return original(self, *args, **kwargs)
        monkeypatch.setattr(cls, method, wrapper)

    counting(AutoencoderKL, "encode", "vae")
    counting(CLIPTextModelWithProjection, "forward", "text")  # the second text encoder: once per encoding
    return counts


def _run(out, data, cache, *args, calls):
    calls.update(vae=0, text=0)
    train(out, "--data", data, "--cache-dir", cache, "--steps", "2", *args)
    return dict(calls)


def test_second_start_and_resume_encode_nothing(tmp_path, calls):
    data, cache = write_images(tmp_path / "d", CAPTIONS), tmp_path / "cache"
    first = _run(tmp_path / "o1", data, cache, "--flip", "--save-every", "1", calls=calls)
    assert first["vae"] == 2 * len(CAPTIONS) and first["text"] == len(CAPTIONS)  # both orientations
    assert len(list((cache / "latents").rglob("*.safetensors"))) == 2 * len(CAPTIONS)
    assert _run(tmp_path / "o2", data, cache, "--flip", calls=calls) == {"vae": 0, "text": 0}
    calls.update(vae=0, text=0)
    run_cli("sdxl-lora", "--resume", tmp_path / "o1", "--steps", "3")
    assert calls == {"vae": 0, "text": 0}
    cached = run_json(tmp_path / "o2")["data"]["cache"]
    assert (cached["latents_loaded"], cached["latents_encoded"], cached["texts_loaded"]) == (10, 0, 5)


def test_a_moved_model_keeps_its_cache_and_its_results(tmp_path, calls, tiny_path):
    data, cache = write_images(tmp_path / "d", CAPTIONS), tmp_path / "cache"
    moved = Path(shutil.copytree(tiny_path, tmp_path / "elsewhere" / "my-model"))
    _run(tmp_path / "o1", data, cache, calls=calls)
    assert _run(tmp_path / "o2", data, cache, "--model", moved, calls=calls) == {"vae": 0, "text": 0}
    assert run_json(tmp_path / "o2")["losses"] == run_json(tmp_path / "o1")["losses"]


def test_a_changed_image_is_encoded_again_and_only_it(tmp_path, calls):
    data, cache = write_images(tmp_path / "d", CAPTIONS), tmp_path / "cache"
    _run(tmp_path / "o1", data, cache, calls=calls)
    Image.new("RGB", (64, 64), "white").save(data / "3.png")  # new content
    assert _run(tmp_path / "o2", data, cache, calls=calls)["vae"] == 1
    stat = (data / "1.png").stat()
    os.utime(data / "1.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    assert _run(tmp_path / "o3", data, cache, calls=calls)["vae"] == 0
    (data / "2.txt").write_text("a new caption\n")
    assert _run(tmp_path / "o4", data, cache, calls=calls) == {"vae": 0, "text": 1}


def test_a_damaged_cache_file_is_encoded_again(tmp_path, calls):
    data, cache = write_images(tmp_path / "d", CAPTIONS), tmp_path / "cache"
    _run(tmp_path / "o1", data, cache, calls=calls)
    files = sorted((cache / "latents").rglob("*.safetensors"))
    files[0].write_bytes(files[0].read_bytes()[:-100])  # truncated
    files[1].write_bytes(files[1].read_bytes()[:-4] + b"\0\0\0\1")  # same length, other values
    calls.update(vae=0, text=0)
    result = train(tmp_path / "o2", "--data", data, "--cache-dir", cache, "--steps", "1")
    assert calls["vae"] == 2 and "2 cache file(s) were damaged" in " ".join(result.output.split())
    assert run_json(tmp_path / "o2")["data"]["cache"]["damaged"] == 2
    assert _run(tmp_path / "o3", data, cache, calls=calls)["vae"] == 0  # repaired


def test_memory_only_cache_writes_nothing(tmp_path, calls):
    data, cache = write_images(tmp_path / "d", CAPTIONS), tmp_path / "cache"
    assert _run(tmp_path / "o1", data, cache, "--no-disk-cache", calls=calls)["vae"] == len(CAPTIONS)
    assert not cache.exists()


def test_disk_cache_is_read_per_batch_not_held(tmp_path):
    from emotrain.config import resolve_config
    from emotrain.dataset.encode import prepare_data
    from emotrain.dataset.scan import scan_data
    from emotrain.watch.progress import TrainProgress
    from emotrain.sdxl import load_sdxl

    data = write_images(tmp_path / "d", CAPTIONS)
    cfg = resolve_config(None, {"model": "tiny", "data": str(data), "resolution": 64, "cache_dir": str(tmp_path / "c")})
    progress = TrainProgress(1)
    prepared = prepare_data(load_sdxl("tiny"), scan_data(cfg), cfg, "cpu", progress, progress.console)
    handles = [h for item in prepared.items for h in item.latents.values()] + list(prepared.texts.values())
    assert handles and all(isinstance(h, Path) and h.is_file() for h in handles)  # files, not tensors in memory
