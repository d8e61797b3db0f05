"""Data scanning, buckets and batch order on their own (no model involved)."""

from __future__ import annotations

import pytest
from PIL import Image

from emotrain.run.batches import Batches
from data_helpers import load_image
from emotrain.dataset.buckets import bucket_sizes, choose_bucket
from emotrain.dataset.scan import scan_folder
from emotrain.errors import UserError


def _image(path, size, colour="red", caption=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")


def test_scan_repeats_captions_and_order(tmp_path):
    _image(tmp_path / "b.png", (32, 32), caption="bee")
    _image(tmp_path / "a.jpg", (32, 32), caption="  ant  ")
    _image(tmp_path / "2_dog" / "d.webp", (32, 32), caption="dog")
    _image(tmp_path / "notes" / "x.png", (32, 32), caption="ignored: not an N_name folder")
    (tmp_path / "readme.md").write_text("not an image")
    examples = scan_folder(tmp_path)
    assert [(e.image.name, e.caption) for e in examples] == [("a.jpg", "ant"), ("b.png", "bee"),
                                                              ("d.webp", "dog"), ("d.webp", "dog")]


def test_scan_refuses_an_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no images"):
        scan_folder(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        scan_folder(tmp_path / "missing")


def test_buckets_are_sd_scripts_buckets():
    sizes = bucket_sizes(1024)
    # sd-scripts' SDXL set: 64 px steps, sides 512..2048, area at most 1024^2
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert all(w * h <= 1024 * 1024 for w, h in sizes)
    assert (1024, 1024) in sizes and (832, 1216) in sizes and (1216, 832) in sizes and (512, 2048) in sizes
    assert min(min(s) for s in sizes) == 512 and max(max(s) for s in sizes) == 2048
    assert all((h, w) in sizes for w, h in sizes)
    assert choose_bucket(3000, 2000, 1024, True) == (1216, 832)  # 3:2 landscape
    assert choose_bucket(3000, 2000, 1024, False) == (1024, 1024)


def test_load_image_covers_and_centre_crops(tmp_path):
    img = Image.new("RGB", (200, 100), "black")
    img.paste(Image.new("RGB", (100, 100), "white"), (50, 0))  # a white centre square
    img.save(tmp_path / "x.png")
    pixels, original, crop, target = load_image(tmp_path / "x.png", 64, bucket=False)
    assert original == (100, 200) and target == (64, 64) and pixels.shape == (3, 64, 64)
    assert crop == (0, 32)  # scaled to 128x64, 32 px cut from the left
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels[:, :, 16:48].mean() > 0.9  # the centre stays white


def test_batch_order_is_a_function_of_seed_and_epoch():
    sizes = [(8, 8)] * 5 + [(8, 12)] * 3
    a, b = Batches(sizes, 2, seed=3), Batches(sizes, 2, seed=3)
    run = [a.next() for _ in range(12)]
    assert run == [b.next() for _ in range(12)]
    assert [Batches(sizes, 2, seed=4).next() for _ in range(4)] != run[:4]
    epoch = run[:len(a._epoch(0))]
    assert sorted(i for batch in epoch for i in batch) == list(range(8))  # each image once an epoch
    assert all(len({sizes[i] for i in batch}) == 1 for batch in run)  # one bucket per batch
    # Resuming at any (epoch, position) continues with exactly the same batches.
    replay = Batches(sizes, 2, seed=3)
    for k in range(12):
        state = replay.state_dict()
        resumed = Batches(sizes, 2, seed=3, epoch=state["epoch"], position=state["position"])
        assert resumed.next() == replay.next() == run[k]
