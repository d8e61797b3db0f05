"""What the data scan finds before any model loads: a truncated image and a mask of the
wrong size; every file is decoded once, and remembered while its size and time stay."""

import os

import pytest
from PIL import Image

from data_helpers import cli, one_line_error, write_images
from emotrain.dataset.decoded import MEMORY, check_decodable
from emotrain.errors import UserError

ARGS = ["sdxl-lora", "--model", "tiny", "--resolution", "64", "--steps", "1", "--log-with", "none"]


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@pytest.mark.parametrize("fault", ["truncated", "mask size"])
def test_the_data_scan_finds_it_before_the_model_loads(tmp_path, fault):
    data = write_images(tmp_path / "data", {"a.png": "a", "b.png": "b", "c.jpg": "c"})
    extra = []
    if fault == "truncated":
        truncate(data / "c.jpg")
        want = f"error: cannot read image {data / 'c.jpg'} (Truncated File Read): remove or replace the file"
    else:
        Image.new("L", (32, 64), 255).save(data / "b_mask.png")
        extra = ["--alpha-mask"]
        want = f"error: mask {data / 'b_mask.png'} is 32x64 but its image is 64x64: make them the same size"
    out = tmp_path / "run"
    line = one_line_error(cli(*ARGS, "--data", data, "--output", out, "--cache-dir", tmp_path / "cache", *extra))
    assert line == want  # one line: the model never started loading
    assert not out.exists()


def test_a_file_is_decoded_again_only_when_its_size_or_time_changes(tmp_path):
    data = write_images(tmp_path / "data", {"a.png": "a", "b.png": "b"})
    cache = tmp_path / "cache"
    check_decodable([data / "a.png", data / "b.png"], cache)
    assert (cache / MEMORY).is_file()
    # Damaged with its size and time kept: remembered as decoded, not decoded again.
    stat = (data / "a.png").stat()
    good = (data / "a.png").read_bytes()
    (data / "a.png").write_bytes(good[:40] + bytes(len(good) - 40))
    os.utime(data / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    check_decodable([data / "a.png", data / "b.png"], cache)
    os.utime(data / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: decoded again
    with pytest.raises(UserError, match="cannot read image .*a.png"):
        check_decodable([data / "a.png", data / "b.png"], cache)
    with pytest.raises(UserError, match="cannot read image .*a.png"):  # a failure is never remembered
        check_decodable([data / "a.png"], cache)
    (data / "a.png").write_bytes(good)
    check_decodable([data / "a.png"], None)  # without a cache folder: decoded every time
