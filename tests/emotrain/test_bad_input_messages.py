"""What the one line says, through the real CLI, for inputs the fuzz table
(test_bad_input.py) refuses: it names the value as the user wrote it and the fix, and it
comes before any model loads (nothing is written)."""

import pytest
from PIL import Image

from helpers import FAST, run_cli


def refused(tmp_path, *args, data=("--data", "demo")) -> str:
    out = tmp_path / "out"
    base = [a for a in FAST if a not in ("--data", "demo")]
    result = run_cli("sdxl-lora", *base, *data, "--output", out, *args, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert not out.exists()
    return lines[0]


@pytest.mark.parametrize("prompt,says", [
    ("x --s \u00b2", "--s (steps) must be a whole number written in digits 0-9, got '\u00b2'"),
    ("x --d \u00b3", "--d (seed) must be a whole number written in digits 0-9, got '\u00b3'"),
    (f"x --d {2**70}", f"--d (seed) {2**70}: seed must be 0 to {2**32 - 1}"),
    ("x --l nan", "--l (CFG scale) must be a finite number such as 7 or 6.5, got 'nan'"),
    ("x --l 500", "--l (CFG scale) 500: CFG scale must be 0 to 100"),
    ("x --w 64 --w 96", "--w (width) is given twice: keep one"),
])
def test_sample_prompt_numbers_are_checked_as_options_are(tmp_path, prompt, says):
    line = refused(tmp_path, "--sample-prompt", prompt)
    assert line == f"error: --sample-prompt {prompt!r}: {says}"


def test_prompt_file_number_names_its_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --l 6.5\na blue square --l inf\n")
    assert refused(tmp_path, "--sample-prompts", prompts).endswith(f"{prompts} line 2: --l (CFG scale) must be a "
                                                                    "finite number such as 7 or 6.5, got 'inf'")


def test_empty_validation_folder_is_named_as_validation(tmp_path):
    empty = tmp_path / "val"
    empty.mkdir()
    line = refused(tmp_path, "--val-data", empty)
    assert f"to validate on (--val-data) in {empty}" in line and "to train on" not in line
    assert line.endswith("or leave --val-data out")


def test_dataset_config_folder_and_toml_spelling(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64)).save(images / "a.png")
    line = refused(tmp_path, data=("--dataset-config", images))
    assert f"dataset config {images} is a folder: pass the .toml file" in line and "does not exist" not in line
    config = tmp_path / "d.toml"
    for toml, says in [("color_aug = true", "color_aug = true cannot be honoured"),
                       ("flip_aug = 'yes'", 'flip_aug must be true or false, got "yes"'),
                       ("caption_extension = ['.txt']", 'caption_extension must be a file suffix such as ".txt", '
                                                        'got [".txt"]')]:
        config.write_text(f"[general]\n{toml}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{images}'\n")
        assert says in refused(tmp_path, data=("--dataset-config", config))
    preset = tmp_path / "p.toml"
    preset.write_text("rank = true\n")
    assert refused(tmp_path, "--preset", preset).endswith("must be an integer, got true")
