"""The pieces of watching a run that need no training: kohya prompt lines, the held-out
validation images, where the frozen models wait for a sample, what the vram plan says
sampling costs, and the one-line refusals before anything loads."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from emotrain.config import TrainConfig
from emotrain.dataset.demo import demo_folder
from emotrain.errors import UserError
from emotrain.watch.prompts import parse_line
from emotrain.watch.schedule import due, interval
from helpers import train

DEFAULTS = dict(resolution=1024, seed=42, steps=25, sampler="euler")


def test_kohya_prompt_line():
    p = parse_line("a cat, best quality --n lowres, blurry --w 832 --h 1216 --d 7 --s 30 --l 6.5 --ss k_euler_a",
                   "x", **DEFAULTS)
    assert (p.prompt, p.negative, p.width, p.height, p.seed, p.steps, p.cfg, p.sampler) == \
        ("a cat, best quality", "lowres, blurry", 832, 1216, 7, 30, 6.5, "k_euler_a")
    p = parse_line("just a prompt", "x", **DEFAULTS)
    assert (p.negative, p.width, p.height, p.seed, p.steps, p.cfg, p.sampler) == ("", 1024, 1024, 42, 25, 7.0, "euler")


@pytest.mark.parametrize("line,message", [
    ("a cat --w abc", "--w (width) must be a whole number"),
    ("a cat --w 1000", "multiples of 32"),
    ("a cat --q 3", "unknown option --q"),
    ("a cat --l high", "--l (CFG scale) must be a finite number"),
    ("a cat --s 0", "steps must be 1 to 1000"),
    ("a cat --ss nosuch", "unknown sampler"),
    (" --w 512", "no prompt"),
    ("a cat --s \u00b2", "--s (steps) must be a whole number written in digits 0-9"),
    ("a cat --d 99999999999", "seed must be 0 to 4294967295"),
    ("a cat --l nan", "--l (CFG scale) must be a finite number"),
    ("a cat --l -0.5", "CFG scale must be 0 to 100"),
    ("a cat --w 8224", "width must be 32 to 8192"),
    ("a cat --n x --n y", "--n (negative prompt) is given twice"),
])
def test_bad_prompt_lines(line, message):
    with pytest.raises(UserError, match="^where: .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_line(line, "where", **DEFAULTS)


def test_bad_prompt_file_line_is_refused_naming_it(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na red circle --w 64 --h 64\n\na blue square --w 64 --h sixty\n")
    out = tmp_path / "out"
    result = train(out, "--sample-prompts", prompts, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{prompts} line 4: --h (height) must be a whole number" in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--val-every", "5"], "val_every: no validation images"),
    (["--val-split", "0.2", "--val-data", "demo"], "--val-data and --val-split both given"),
    (["--val-data", "/no/such/dir"], "val_data: folder /no/such/dir does not exist"),
    (["--val-split", "0.95"], "val_split: must be at most 0.9"),
    (["--sample-every", "5"], "sample_every: no prompts"),
    (["--sample-prompts", "/no/prompts.txt"], "file /no/prompts.txt does not exist"),
    (["--log-with", "mlflow"], "log_with: must be one of tensorboard, wandb, none"),
    (["--sample-sampler", "nosuch"], "unknown sampler 'nosuch'"),
])
def test_watch_flags_are_checked_before_loading(tmp_path, args, message):
    out = tmp_path / "out"
    result = train(out, *args, expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_wandb_is_only_needed_when_chosen(tmp_path):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    result = train(tmp_path / "out", "--log-with", "wandb", expect=2)
    assert "log_with: wandb is not installed: pip install wandb" in result.output


def test_val_split_holds_out_whole_images_by_name(tmp_path):
    from emotrain.dataset.scan import scan_data
    from emotrain.watch.validation import split_validation

    data = tmp_path / "data"
    shutil.copytree(demo_folder(), data)
    shutil.copytree(demo_folder(), tmp_path / "moved")
    (data / "3_repeat").mkdir()
    for name in ("000", "001"):  # two images that also appear 3 times each in a repeat folder
        for suffix in (".png", ".txt"):
            shutil.copy(data / f"{name}{suffix}", data / "3_repeat" / f"{name}{suffix}")
    cfg = TrainConfig(model="tiny", data=str(data), val_split=0.25, seed=1, resolution=64)
    scanned = scan_data(cfg)
    images = [e.example.image for e in scanned.entries]
    kept, held = split_validation(cfg, scan_data(cfg))
    assert len(held) == round(0.25 * len(set(images))) == 4 and len({e.example.image for e in held}) == 4
    held_images = {e.example.image for e in held}
    assert not held_images & {e.example.image for e in kept.entries}  # never trained on, repeats included
    assert len(kept.entries) == len(images) - sum(images.count(i) for i in held_images)
    # the same files whatever the seed, and wherever the folder lives
    assert [e.example.image for e in split_validation(cfg.replace(seed=99), scan_data(cfg))[1]] == \
        [e.example.image for e in held]

    def held_names(folder):
        other = cfg.replace(data=str(folder))
        return sorted(e.example.image.name for e in split_validation(other, scan_data(other))[1])

    assert held_names(tmp_path / "moved") == held_names(demo_folder())


def test_schedule():
    cfg = TrainConfig(steps=100, save_every=0)
    assert interval(None, cfg) == 10 and interval(None, cfg.replace(save_every=25)) == 25 and interval(0, cfg) == 0
    assert [s for s in range(1, 101) if due(s, 30, 100)] == [30, 60, 90, 100]
    assert [s for s in range(1, 101) if due(s, 0, 100)] == [100]


def test_frozen_models_wait_on_the_cpu_for_samples():
    from emotrain.watch.samples import park_frozen

    def parts():
        return SimpleNamespace(vae=torch.nn.Linear(2, 2), text_encoders=(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))

    def where(sdxl):
        return [next(m.parameters()).device.type for m in (sdxl.vae, *sdxl.text_encoders)]

    cached = SimpleNamespace(vae=None, texts={"a caption": "handle"})  # latents and captions cached
    cfg = TrainConfig(sample_prompt=["x"])
    sdxl = parts()
    park_frozen(sdxl, cfg, cached, sampling=False)
    assert where(sdxl) == ["meta"] * 3  # no samples: freed, as encoding alone frees them
    sdxl = parts()
    park_frozen(sdxl, cfg.replace(train_text_encoders=True), cached, sampling=False)
    assert where(sdxl) == ["meta", "cpu", "cpu"]  # trained encoders stay
    sdxl = parts()
    park_frozen(sdxl, cfg, SimpleNamespace(vae=object(), texts={}), sampling=False)
    assert where(sdxl) == ["cpu"] * 3  # random crops and per-draw captions: the loop needs them all
    sdxl = parts()
    park_frozen(sdxl, cfg, cached, sampling=True)
    assert where(sdxl) == ["cpu"] * 3  # on a GPU run: off the GPU until a sample needs them


def test_vram_plan_says_what_sampling_costs():
    from emotrain import vram

    p = vram.plan(TrainConfig(model="tiny", rank=4), "emoairy", "off", activations=False)
    row, base = p["optimizers"]["emoairy"], p["base_bytes_by_component"]
    parked = base["vae"] + base["text_encoder"] + base["text_encoder_2"]
    assert p["sampling"]["models_bytes"] == parked
    assert row["sampling_bytes"] == row["training_step_bytes"] - row["grad_bytes"] + parked
    assert "move to the GPU for each sample" in vram.format_table(p)
    kept = vram.plan(TrainConfig(model="tiny", rank=4, sample_keep_models=True), "emoairy", "off",
                     activations=False)
    assert kept["optimizers"]["emoairy"]["training_step_bytes"] == row["training_step_bytes"] + parked
    assert "--sample-keep-models keeps" in vram.format_table(kept)


def test_sweep_and_report_name_each_parts_lr(tmp_path):
    """A run with per-part lrs is labelled with them (the sweep's table and the report), and
    the report's lr figure draws each group's logged lr."""
    import json

    from emotrain.commands.sweep import summary_text
    from emotrain.watch.figures import learning_rate
    from emotrain.watch.report import write_report
    from emotrain.watch.runs import load_run

    run = tmp_path / "parts"
    run.mkdir()
    config = {**TrainConfig(model="tiny").to_dict(), "lr": 3e-4, "unet_lr": 1e-3, "text_encoder_lr": ["1e-4", "2e-4"],
              "train_text_encoders": True, "loraplus_ratio": 16.0}
    (run / "run.json").write_text(json.dumps({"config": config, "status": "finished", "steps": 2}))
    rows = [{"step": s, "time": float(s), "train/loss": 1.0, "train/loss_smoothed": 1.0, "train/lr": 1e-3,
             "train/lr/unet": 1e-3, "train/lr/text_encoder": 1e-4, "train/lr/text_encoder_2": 2e-4} for s in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    label = "lr 0.0003 (unet 0.001, te 0.0001/0.0002, LoRA+ x16)"
    assert load_run(run).label == f"parts: EmoAiry, {label}"
    assert label in summary_text([run])
    lines, note = learning_rate([load_run(run)])
    assert sorted(line["y"][0] for line in lines if line.get("ls") == ":") == [1e-4, 2e-4, 1e-3]
    assert "dotted: each parameter group's lr (text_encoder, text_encoder_2, unet)" in note
    assert label in write_report([run], tmp_path / "report.html").read_text()
