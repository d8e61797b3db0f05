"""sd-scripts' dataset TOML, unchanged: what a run draws follows the config (repeats,
regularization pairing, per-subset caption rules), and what cannot be honoured is
refused in one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from data_helpers import cli, one_line_error, write_images
from emotrain.dataset.problems import Problems
from emotrain.errors import UserError
from emotrain.dataset.scan import Example, pair_regularization

TRAIN = {"a.png": "sks, red, round, small, shiny", "b.png": "sks, green, square, large",
         "c.png": "sks, blue, triangle, tiny, matte, old"}
REG = {f"r{i}.png": "person, photo" for i in range(4)}
STEPS, BATCH, EPOCH = 30, 4, 12  # 3 train images x 2 repeats + 6 reg draws = 12 draws an epoch


def _toml(tmp_path: Path, train: Path, reg: Path) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(f"""
[general]
enable_bucket = true
caption_extension = ".txt"

[[datasets]]
resolution = 64
batch_size = {BATCH}

  [[datasets.subsets]]
  image_dir = "{train}"
  num_repeats = 2
  shuffle_caption = true
  keep_tokens = 1
  caption_dropout_rate = 0.25
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  num_repeats = 1
  class_tokens = "person"
""")
    return path


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kohya")
    config = _toml(tmp, write_images(tmp / "train", TRAIN), write_images(tmp / "reg", REG))
    out = tmp / "out"
    proc = cli("sdxl-lora", "--model", "tiny", "--dataset-config", config, "--rank", "4", "--steps", STEPS,
               "--lr", "1e-3", "--seed", "0", "--record-draws", "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = (out / "draws.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads((out / "run.json").read_text()), proc.stderr


def test_every_epoch_draws_the_repeats_and_one_reg_image_per_train_image(drawn):
    draws, run, _ = drawn
    assert len(draws) == STEPS * BATCH
    epochs = [draws[k:k + EPOCH] for k in range(0, len(draws), EPOCH)]
    assert len(epochs) == STEPS * BATCH // EPOCH
    for epoch in epochs:
        counts = Counter(Path(d["image"]).name for d in epoch)
        assert all(counts[name] == 2 for name in TRAIN)  # num_repeats = 2
        # 6 train draws, 4 reg images x 1 repeat: sd-scripts adds one more repeat to the first two
        assert [counts[f"r{i}.png"] for i in range(4)] == [2, 2, 1, 1]
        assert sum(d["regularization"] for d in epoch) == 6
    summary = run["data"]
    assert (summary["images"], summary["regularization_images"], summary["draws_per_epoch"]) == (3, 4, 12)
    assert summary["buckets"] == {"64x64": 12} and summary["text_encoders"] == "every step"


def test_captions_follow_their_subsets_rules(drawn):
    draws, _, stderr = drawn
    train = [d for d in draws if not d["regularization"]]
    reg = [d for d in draws if d["regularization"]]
    assert all(d["caption"] == "person, photo" and not d["flip"] for d in reg)  # no shuffle, dropout or flip there
    dropped = [d for d in train if d["caption"] == ""]
    kept = [d for d in train if d["caption"]]
    for d in kept:
        tags, original = d["caption"].split(", "), TRAIN[Path(d["image"]).name].split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(original)  # keep_tokens = 1 stays in front
    assert sum(d["caption"] != TRAIN[Path(d["image"]).name] for d in kept) > len(kept) // 2  # really shuffled
    # 60 draws at p = 0.25: 15 expected, sd 3.35; a fixed seed makes this exact, the bound says it is right
    assert abs(len(dropped) - 0.25 * len(train)) <= 3 * (len(train) * 0.25 * 0.75) ** 0.5
    flips = sum(d["flip"] for d in train)
    assert abs(flips - 0.5 * len(train)) <= 3 * (len(train) * 0.25) ** 0.5 and 0 < flips < len(train)
    assert "text encoders stay loaded and encode every step" in stderr


@pytest.mark.parametrize("reg_repeats,train_draws,want,unused", [
    ([1, 1, 1, 1], 6, [2, 2, 1, 1], 0),  # too few: one more repeat each in turn
    ([3, 3, 3], 4, [3, 3], 1),  # too many: the first ones, whole repeats, the rest unused
    ([1, 1], 5, [3, 2], 0),
])
def test_regularization_pairing_as_sd_scripts(reg_repeats, train_draws, want, unused):
    reg = [(Example(Path(f"r{i}.png"), ""), n) for i, n in enumerate(reg_repeats)]
    problems = Problems()
    got = Counter(e.image.name for e in pair_regularization(train_draws, reg, problems))
    assert [got[f"r{i}.png"] for i in range(len(want))] == want
    assert problems.kinds.get("unused_reg", {}).get("count", 0) == unused


BAD_TOML = [
    ("shuffle_captions = true", "unknown key 'shuffle_captions'"),
    ("num_repeats = 0", "num_repeats must be an integer of at least 1"),
    ("color_aug = true", "color_aug = true cannot be honoured"),
    ("caption_dropout_rate = 1.5", "caption_dropout_rate must be a number from 0 to 1"),
]


@pytest.mark.parametrize("line,message", BAD_TOML)
def test_bad_dataset_config_is_one_line(tmp_path, line, message):
    folder = write_images(tmp_path / "imgs", {"a.png": "x"})
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{folder}"\n{line}\n')
    out = tmp_path / "out"
    error = one_line_error(cli("sdxl-lora", "--model", "tiny", "--dataset-config", config, "--output", out))
    assert message in error and str(config) in error
    assert not out.exists()


def test_bad_data_inputs_are_one_line(tmp_path):
    folder = write_images(tmp_path / "imgs", {"a.png": "x"})
    config = tmp_path / "d.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "nowhere"}"\n')
    error = one_line_error(cli("sdxl-lora", "--model", "tiny", "--dataset-config", config, "--output", tmp_path / "o"))
    assert "image_dir" in error and "nowhere" in error and "is not a folder" in error
    (folder / "notes.jpg").write_text("not really a jpeg")
    error = one_line_error(cli("sdxl-lora", "--model", "tiny", "--data", folder, "--output", tmp_path / "o"))
    assert "cannot read image" in error and "notes.jpg" in error
    (folder / "notes.jpg").unlink()
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    error = one_line_error(cli("sdxl-lora", "--model", "tiny", "--data", folder, "--cache-dir", blocker / "sub",
                               "--output", tmp_path / "o"))
    assert "cache folder" in error and "is not a folder" in error and "--cache-dir" in error
    assert not (tmp_path / "o").exists()


def test_keys_fall_back_subset_dataset_general_command_line(tmp_path):
    from emotrain.config import resolve_config
    from emotrain.dataset import specs_from_options
    from emotrain.dataset.buckets import bucket_sizes

    a, b = (write_images(tmp_path / n, {"x.png": "x"}) for n in ("a", "b"))
    config = tmp_path / "d.toml"
    config.write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 2
caption_extension = ".caption"

[[datasets]]
resolution = [512, 768]
batch_size = 3
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 32
keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "{a}"
  keep_tokens = 1
  caption_separator = ";"
  secondary_separator = ";;;"
  [[datasets.subsets]]
  image_dir = "{b}"
  cache_info = true
  color_aug = false

[[datasets]]
  [[datasets.subsets]]
  image_dir = "{b}"
""")
    cfg = resolve_config(None, {"model": "tiny", "dataset_config": str(config), "resolution": 64, "flip": True,
                                "caption_prefix": "tok"})
    first, second = specs_from_options(cfg)
    sa, sb = first.subsets
    assert (sa.keep_tokens, sb.keep_tokens, second.subsets[0].keep_tokens) == (1, 3, 2)  # subset > dataset > general
    assert sa.caption_extension == ".caption" and sa.caption_separator == ";" and sa.secondary_separator == ";;;"
    assert all(s.flip_aug and s.caption_prefix == "tok" and s.shuffle_caption for s in (sa, sb))  # the command line
    assert (first.resolution, first.batch_size, second.resolution, second.batch_size) == ((512, 768), 3, (64, 64), 1)
    sizes = bucket_sizes(first.resolution, first.bucket_reso_steps, first.min_bucket_reso, first.max_bucket_reso)
    assert min(min(s) for s in sizes) == 256 and max(max(s) for s in sizes) == 1024
    assert all(w % 32 == 0 and h % 32 == 0 and w * h <= 512 * 768 for w, h in sizes) and (352, 1024) in sizes
    config.write_text(config.read_text().replace("color_aug = false", "enable_wildcard = true"))
    with pytest.raises(UserError, match="enable_wildcard = true cannot be honoured"):
        specs_from_options(cfg)
