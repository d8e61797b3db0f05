"""One run through the real CLI on inputs a user meets (issue 15): every local path in a
folder whose name stands for the user's, an animated image, a link to the data folder
itself, and a sample prompt longer than CLIP reads. What a user may post (the LoRA files,
the sample PNGs, report.html) names files and folders and never gives their paths; the
data scan says what it does with the animated image and the link; the long prompt gets
our one line, not the tokenizer's warning."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from safetensors import safe_open

SECRET = "home-of-alice-h15"  # stands for /home/<user name>/...
LONG = " ".join(["a red circle on a blue square"] * 15)  # 105 words: more than 75 tokens


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    home = tmp_path_factory.mktemp(SECRET)
    data, val = home / "my-data", home / "my-val"
    for folder in (data, val):
        folder.mkdir()
        for name, colour in (("a", "red"), ("b", "blue")):
            Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(f"a {colour} square")
    frames = [Image.new("RGB", (64, 64), c) for c in ("green", "black", "white")]
    frames[0].save(data / "c.webp", save_all=True, append_images=frames[1:], duration=100, loop=0)
    (data / "c.txt").write_text("a green square")
    (data / "3_again").symlink_to(data, target_is_directory=True)  # the same images, read again
    prompts = home / "my-prompts.txt"
    prompts.write_text(f"a red square --w 64 --h 64 --s 2\n{LONG} --w 64 --h 64 --s 2\n")
    out = home / "my-lora"
    args = ["--model", "tiny", "--data", data, "--val-data", val, "--sample-prompts", prompts, "--cache-dir",
            home / "my-cache", "--resolution", "64", "--rank", "4", "--steps", "2", "--log-with", "none", "--output", out]
    # a process of its own: the libraries' warnings reach its terminal, as they reach the user's
    done = subprocess.run([sys.executable, "-m", "emotrain", "sdxl-lora", *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out, done.stdout + done.stderr


def test_what_a_user_shares_names_files_not_paths(run):
    out, _ = run
    shared = [out / "lora.safetensors", out / "pytorch_lora_weights.safetensors", out / "report.html",
              *sorted((out / "samples").glob("*.png"))]
    assert len(shared) >= 3 + 2 * 2  # two prompts, at step 0 and at the end at least
    for path in shared:
        assert SECRET.encode() not in path.read_bytes(), path
    for lora in shared[:2]:
        with safe_open(str(lora), "pt") as f:
            header = f.metadata()
        config = json.loads(header["emotrain_config"])
        assert (config["data"], config["val_data"], config["sample_prompts"], config["cache_dir"],
                config["output"], config["model"]) == ("my-data", "my-val", "my-prompts.txt", "my-cache", "my-lora",
                                                        "tiny")
        assert (header["ss_output_name"], header["ss_sd_model_name"]) == ("my-lora", "tiny")
    with Image.open(shared[3]) as png:
        assert png.text["model"] == "tiny"
    assert SECRET in (out / "run.json").read_text()  # private: a resume needs the paths


def test_animated_image_and_looped_folder_are_said(run):
    out, output = run
    lines = output.splitlines()
    assert any("1 image(s) are animated: trained on their first frame only" in line and "c.webp (3 frames)" in line
               for line in lines), output
    assert any("1 sub-folder(s) are links to a folder already read and were not read again" in line
               and "3_again" in line for line in lines), output
    assert "data: 3 image(s), 3 draws per epoch" in output  # not 3 + 3 x 3 read again through the link


def test_long_sample_prompt_gets_our_line(run):
    _, output = run
    said = [line for line in output.splitlines() if "sample prompt(s) are longer than 75 tokens" in line]
    assert len(said) == 1 and "prompt 2 'a red circle on a blue square a red c...' (" in said[0], output
    assert "indexing errors" not in output and "truncated because CLIP" not in output
