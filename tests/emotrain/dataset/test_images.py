"""Images read as they look (EXIF orientation, 16-bit range, transparency), and every
data warning counted in the summary, or an error with --strict-data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from data_helpers import cli, one_line_error, write_images
from emotrain.dataset.buckets import place
from emotrain.dataset.images import inspect_image, load_pixels
from helpers import run_json, train

RED, BLUE = (220, 0, 0), (0, 0, 220)


def _portrait_with_exif(path):
    """A portrait photo as cameras store it: pixels landscape, EXIF orientation 6 (rotate
    90 degrees clockwise to show). Shown, its top half is red and its bottom half blue."""
    shown = Image.new("RGB", (48, 96), RED)
    shown.paste(Image.new("RGB", (48, 48), BLUE), (0, 48))
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: undone by orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


def _pixels(path, target=(64, 64)):
    width, height, *_ = inspect_image(path)
    pixels, mask = load_pixels(path, place(width, height, target[1], target[0]))
    return pixels, (width, height)


def test_exif_rotated_portrait_is_read_upright(tmp_path):
    _portrait_with_exif(tmp_path / "p.jpg")
    pixels, size = _pixels(tmp_path / "p.jpg", target=(96, 48))
    assert size == (48, 96)
    top, bottom = pixels[:, :40].mean(dim=(1, 2)), pixels[:, -40:].mean(dim=(1, 2))
    assert top[0] > 0.5 and top[2] < -0.5 and bottom[2] > 0.5 and bottom[0] < -0.5  # red above blue


def test_16_bit_png_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(tmp_path / "grey.png")
    ramp_pixels, _ = _pixels(tmp_path / "ramp.png")
    grey, _ = _pixels(tmp_path / "grey.png")
    assert grey.mean().item() == pytest.approx(0.0, abs=0.01)  # mid grey, not white (8-bit clipping)
    expected = ramp.astype(np.float64) / 65535 * 2 - 1
    assert np.allclose(ramp_pixels[0].numpy(), expected, atol=0.01)


def test_transparency_is_composited_on_white_or_used_as_a_mask(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 32:, 3] = 255  # left half transparent
    Image.fromarray(rgba).save(tmp_path / "t.png")
    pixels, _ = _pixels(tmp_path / "t.png")
    assert pixels[:, :, :28].min() > 0.99  # white where transparent
    assert pixels[1:, :, 36:].max() < -0.99 and pixels[0, :, 36:].mean() > 0.5  # red where opaque
    pixels, mask = load_pixels(tmp_path / "t.png", place(64, 64, 64, 64), mask=True)
    assert mask.shape == (1, 64, 64) and mask[:, :, :28].max() == 0 and mask[:, :, 36:].min() == 1


def test_the_summary_counts_every_kind_of_problem(tmp_path):
    data = write_images(tmp_path / "d", {"a.png": "a photo", "b.png": None})
    write_images(data / "3_cat", {"c.png": None})
    write_images(data / "2_dog", {"tiny.png": "tiny dog"}, size=(16, 16))
    write_images(data / "misc", {"m.png": "never read"})
    _portrait_with_exif(data / "p.jpg")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba).save(data / "glass.png")
    out = tmp_path / "o"
    train(out, "--data", data, "--batch-size", "8", "--steps", "2", "--record-draws")
    summary = run_json(out)["data"]
    problems = summary["problems"]
    assert problems["missing_caption"]["count"] == 4 and "class token" in problems["missing_caption"]["message"]
    assert problems["too_small"]["count"] == 1 and problems["too_small"]["example"].endswith("tiny.png")
    assert problems["transparency"]["count"] == 1 and problems["skipped_folders"]["example"].endswith("misc")
    assert "batch_too_large" in problems  # 7 draws an epoch, batch size 8
    assert summary["images"] == 5 and summary["draws_per_epoch"] == 7  # 4 once, c.png 3 times; tiny.png out
    assert any(int(k.split("x")[1]) > int(k.split("x")[0]) for k in summary["buckets"])  # the portrait's
    draws = [json.loads(line) for line in (out / "draws.jsonl").read_text().splitlines()]
    captions = {d["image"].rsplit("/", 1)[1]: d["caption"] for d in draws}
    assert captions["c.png"] == "cat" and captions["b.png"] == ""  # the class token, else empty
    assert len(draws) == 7  # two steps: the six square draws, and the portrait alone in its bucket


def test_strict_data_stops_before_the_model_loads(tmp_path):
    data = write_images(tmp_path / "d", {"a.png": "ok", "b.png": None})
    out = tmp_path / "o"
    error = one_line_error(cli("sdxl-lora", "--model", "tiny", "--data", data, "--resolution", "64",
                               "--strict-data", "--output", out))
    assert "no caption file" in error and "--strict-data" in error and str(data / "b.png") in error
    assert not out.exists()


def test_a_mask_file_beside_the_image_is_the_mask(tmp_path):
    write_images(tmp_path, {"x.png": "x"})
    mask = np.zeros((64, 64), np.uint8)
    mask[:16] = 255  # the top quarter trains
    Image.fromarray(mask).save(tmp_path / "x_mask.png")
    from emotrain.dataset.images import latent_mask
    from emotrain.dataset.scan import scan_folder
    from emotrain.dataset.spec import Subset

    (example,) = scan_folder(tmp_path, Subset(image_dir=tmp_path, alpha_mask=True))
    assert example.mask == tmp_path / "x_mask.png"  # and x_mask.png is not an image to train on
    _, pixel_mask = load_pixels(example.image, place(64, 64, 64, 64), mask=True, mask_file=example.mask)
    assert latent_mask(pixel_mask)[0].tolist() == [[1.0] * 8] * 2 + [[0.0] * 8] * 6
