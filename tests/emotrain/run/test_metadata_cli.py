"""What A1111/Forge's LoRA info panel reads from a trained file's header: sd-scripts' dataset
entries (tag counts per folder, folders with repeats and image counts, image totals, the
epoch), the dropout and max-norm settings, the modelspec entries, and the additional-
networks hashes, each checked against the run's data and a computation made here."""

import datetime
import hashlib
import json
import time

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from emotrain.lora.formats.common import addnet_hashes
from helpers import train

CAPTIONS = {"3_thing": {"a": "Cat, red,  cat ,, sitting", "b": "dog, Red"}, "1_other": {"c": "tree"}}


def folder(root, captions: dict):
    for sub, files in captions.items():
        (root / sub).mkdir(parents=True)
        for stem, text in files.items():
            Image.new("RGB", (64, 64), (200, 30, 30)).save(root / sub / f"{stem}.png")
            if text is not None:
                (root / sub / f"{stem}.txt").write_text(text, encoding="utf-8")
    return root


def header(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def file_hashes(path) -> tuple[str, str]:
    """sd-scripts' two hashes of a safetensors file, by hand: sha256 of the bytes after the
    header; sha256 of 0x10000 bytes at 0x100000, first 8 hex digits."""
    data = path.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[start:]).hexdigest(), hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_hashes_match_a_hand_computation_on_a_written_file(tmp_path):
    tensors = {"b": torch.randn(300_000), "a": torch.arange(10, dtype=torch.float16)}  # 1.2 MB: past 0x110000
    entries = {"ss_x": "1", "ss_y": "two", "modelspec.title": "left out of the hash"}
    save_file(tensors, str(tmp_path / "ss.safetensors"), metadata={"ss_x": "1", "ss_y": "two"})
    model, legacy = file_hashes(tmp_path / "ss.safetensors")
    assert addnet_hashes(tensors, entries) == {"sshs_model_hash": model, "sshs_legacy_hash": legacy}
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]


def test_a_trained_lora_carries_what_the_info_panels_show(tmp_path):
    data = folder(tmp_path / "data", CAPTIONS)
    reg = folder(tmp_path / "reg", {"1_person": {"r": None}})  # no caption: the class token is its caption
    out = tmp_path / "my-lora"
    before = time.time()
    train(out, "--data", data, "--reg-data", reg, "--steps", "2", "--network-dropout", "0.1", "--rank-dropout",
          "0.2", "--module-dropout", "0.05", "--scale-weight-norms", "1")
    meta = header(out / "lora.safetensors")

    tags = {}
    for sub, files in CAPTIONS.items():
        counts = tags.setdefault(sub, {})
        for text in files.values():
            for tag in (t.strip().lower() for t in text.split(",")):
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    assert json.loads(meta["ss_tag_frequency"]) == {**tags, "1_person": {"person": 1}}
    assert tags["3_thing"] == {"cat": 2, "red": 2, "sitting": 1, "dog": 1}
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_thing": {"n_repeats": 3, "img_count": 2},
                                                   "1_other": {"n_repeats": 1, "img_count": 1}}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_person": {"n_repeats": 1, "img_count": 1}}
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"]) == ("7", "1")  # 2 x 3 + 1; 1
    assert meta["ss_epoch"] == "1"  # 2 steps x batch 2 of 14 draws (7 + 7 paired regularization)
    assert (meta["ss_network_dropout"], meta["ss_rank_dropout"], meta["ss_module_dropout"]) == ("0.1", "0.2", "0.05")
    assert meta["ss_scale_weight_norms"] == "1.0"

    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "my-lora" and meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    written = datetime.datetime.fromisoformat(meta["modelspec.date"]).timestamp()
    assert int(before) <= written <= time.time()

    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "ss.safetensors"), metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == file_hashes(tmp_path / "ss.safetensors")
    assert meta["sshs_model_hash"] == file_hashes(out / "lora.safetensors")[0]  # the tensor data as written
