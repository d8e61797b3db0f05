"""Watching a run through the real CLI on the tiny model: validation, samples and logs
change no trained tensor; TensorBoard's own reader finds the scalars and images;
report.html parses and holds every figure and sample; resume stays exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from emotrain.dataset.demo import demo_folder
from helpers import FAST, run_cli, run_json, train

PROMPTS = ["a red circle on a blue background --w 64 --h 64 --s 3 --d 11", "a green square --w 64 --h 96 --s 2"]
STEPS = 6
SCALARS = {"train/loss", "train/loss_smoothed", "train/lr", "val/loss", "emotion/s", "emotion/short", "emotion/long",
           "emotion/effective_lr", "emotion/shadow_ratio", "emotion/filter_held_back", "train/grad_norm",
           "perf/it_per_s", "memory/peak_mib"}
FIGURES = {"loss", "val", "lr", "emotion", "filter", "grad_norm", "memory"}


def watched(tmp, name, *extra):
    """Validation on its own folder, samples, TensorBoard: every watch feature on."""
    prompts = tmp / "prompts.txt"
    prompts.write_text("# kohya syntax\n" + "\n".join(PROMPTS) + "\n")
    return ["--output", tmp / name, "--val-data", demo_folder(count=3, size=64, seed=5), "--val-every", "2",
            "--sample-prompts", prompts, "--sample-every", "3", "--log-every", "2", "--log-with", "tensorboard", *extra]


COMMON = ["--optim", "emosens", "--shadow", "--steps", str(STEPS), "--lr-scheduler", "cosine", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("watch")
    # the watched run through the real command line, in a process of its own
    subprocess.run([sys.executable, "-m", "emotrain", "sdxl-lora", *map(str, FAST + COMMON + watched(tmp, "on"))],
                   check=True, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    train(tmp / "off", *COMMON, "--log-with", "none")
    return tmp


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "logs" / "emotrain"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_watching_changes_no_trained_tensor(runs):
    on, off = load_file(runs / "on" / "lora.safetensors"), load_file(runs / "off" / "lora.safetensors")
    assert on.keys() == off.keys()
    assert all(torch.equal(on[k], off[k]) for k in on)
    assert run_json(runs / "on")["losses"] == run_json(runs / "off")["losses"]


def test_tensorboard_holds_the_scalars_and_samples(runs):
    acc = events(runs / "on")
    assert SCALARS <= set(acc.Tags()["scalars"])
    run = run_json(runs / "on")

    def values(tag):
        return {e.step: e.value for e in acc.Scalars(tag)}

    assert values("train/loss") == pytest.approx(dict(enumerate(run["losses"], 1)), rel=1e-6)
    assert sorted(values("val/loss")) == [0, 2, 4, 6]
    assert sorted(values("train/grad_norm")) == sorted(values("emotion/filter_held_back")) == [2, 4, 6]
    s = dict(enumerate(run["emotion_scalar"], 1))
    lr = values("train/lr")
    assert (lr[1], lr[2], lr[3]) == pytest.approx((0, 1e-3 / 2, 1e-3))  # the lr each step used (warm-up)
    for step, eff in values("emotion/effective_lr").items():  # lr x (1 - |s|), from the optimizer itself
        assert eff == pytest.approx(lr[step] * (1 - abs(s[step])), rel=1e-6)
    assert all(0 <= v <= 1 for v in values("emotion/filter_held_back").values())
    assert set(acc.Tags()["images"]) == {"samples/00", "samples/01"}
    assert [e.step for e in acc.Images("samples/01")] == [0, 3, 6]
    assert (acc.Images("samples/01")[0].width, acc.Images("samples/01")[0].height) == (64, 96)


def test_log_with_none_writes_no_event_files(runs):
    assert not list((runs / "off").rglob("events.out.tfevents.*"))
    assert (runs / "off" / "metrics.jsonl").is_file()  # the report's own record stays


def test_samples_at_the_steps_with_their_settings(runs):
    names = sorted(p.name for p in (runs / "on" / "samples").iterdir())
    assert names == [f"step-{s:06d}-{k:02d}.png" for s in (0, 3, 6) for k in (0, 1)]
    with Image.open(runs / "on" / "samples" / "step-000003-00.png") as img:
        meta, size = dict(img.text), img.size
    assert size == (64, 64)
    assert (meta["prompt"], meta["seed"], meta["step"], meta["sampler"]) == \
        ("a red circle on a blue background", "11", "3", "euler")
    assert "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64" in meta["parameters"]
    with Image.open(runs / "on" / "samples" / "step-000006-01.png") as img:
        assert img.text["seed"] == "1" and img.size == (64, 96)  # no --d: the run's seed + its index


def test_validation_loss_is_fixed_noise_on_the_base_at_step_zero(runs):
    metrics = [json.loads(line) for line in (runs / "on" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in metrics if "val/loss" in r}
    assert list(val) == [0, 2, 4, 6] and len(set(val.values())) == 4
    info = run_json(runs / "on")["validation"]
    assert (info["images"], info["timesteps"], info["seed"]) == (3, 4, 0)


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures, self.samples, self.stack, self.sources = {}, [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.stack.append(attrs.get("id"))
            self.figures[attrs.get("id")] = 0
        if tag == "img":
            self.sources.append(attrs["src"])
            if self.stack:
                self.figures[self.stack[-1]] += 1
            if attrs.get("class") == "sample":
                self.samples.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "figure":
            self.stack.pop()


def parse(path):
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


def test_report_parses_with_every_figure_and_sample(runs):
    page = parse(runs / "on" / "report.html")
    assert page.figures == {f"fig-{f}": 1 for f in FIGURES}  # one plot per figure
    assert len(page.samples) == 6 and all(src.startswith("data:image/png;base64,") for src in page.sources)
    page = parse(runs / "off" / "report.html")  # no validation, no samples: said, not drawn empty
    assert set(page.figures) == {f"fig-{f}" for f in FIGURES - {"val"}} and page.samples == []
    assert "No samples" in (runs / "off" / "report.html").read_text()


def test_resume_with_watching_is_exact(runs, tmp_path):
    # The watched run again, with checkpoints; it "crashes" after step 6 before its final
    # save (that checkpoint and the LoRA files are gone), and is resumed from step 3.
    out = tmp_path / "split"
    train(out, *COMMON, *watched(tmp_path, "split", "--save-every", "3"))
    for name in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        (out / name).unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")
    stale = (out / "samples" / "step-000006-00.png").stat().st_mtime_ns
    run_cli("sdxl-lora", "--resume", out)
    on, split = load_file(runs / "on" / "lora.safetensors"), load_file(out / "lora.safetensors")
    assert all(torch.equal(on[k], split[k]) for k in on)

    def record(run_dir):  # timing and memory aside, the same story step by step
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("perf/", "memory/")) and k != "time"} for r in rows]

    assert record(out) == record(runs / "on")
    assert (out / "samples" / "step-000006-00.png").stat().st_mtime_ns != stale  # made again, by the resumed run
    for name in sorted(p.name for p in (runs / "on" / "samples").iterdir()):
        with Image.open(runs / "on" / "samples" / name) as a, Image.open(out / "samples" / name) as b:
            assert a.tobytes() == b.tobytes(), name
    acc = events(out)  # the attempt's steps 4-6 are purged: each step once, the resumed values
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in losses] == pytest.approx(run_json(runs / "on")["losses"], rel=1e-6)


def test_samples_use_the_live_lora_text_encoders_included(tmp_path, tiny_path):
    """A sample after training is the picture diffusers' own pipeline makes with the
    saved LoRA (UNet and both text encoders), and not the one with the UNet's alone."""
    import numpy as np
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "te"
    train(out, "--train-text-encoders", "--steps", "2", "--lr", "1e-2", "--optim", "adamw", "--log-with", "none",
          "--sample-prompt", "a red circle --w 64 --h 64 --s 3 --d 4")

    def picture(lora=None):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(str(lora))
        image = pipe(prompt="a red circle", width=64, height=64, num_inference_steps=3, guidance_scale=7.0,
                     generator=torch.Generator().manual_seed(4)).images[0]
        return np.asarray(image)

    def sample(step):
        with Image.open(out / "samples" / f"step-{step:06d}-00.png") as img:
            return np.asarray(img.convert("RGB"))

    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        unet_only = {k: f.get_tensor(k) for k in f.keys() if k.startswith("unet.")}
        save_file(unet_only, tmp_path / "unet_only.safetensors", metadata=f.metadata())
    assert np.array_equal(sample(0), picture())  # step 0: the base model
    assert np.array_equal(sample(2), picture(out / "pytorch_lora_weights.safetensors"))
    assert not np.array_equal(sample(2), picture(tmp_path / "unet_only.safetensors"))


def test_v_prediction_zero_snr_run_samples_as_diffusers_does(tmp_path):
    """The tiny v-pred model trained with --v-parameterization --zero-terminal-snr: the
    LoRA says so in its header and run.json, and a sample equals diffusers' own pipeline
    with the saved LoRA, trailing timesteps and guidance rescale 0.7."""
    import numpy as np
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors import safe_open

    from emotrain.sdxl import tiny_sdxl_path

    out = tmp_path / "vpred"
    train(out, "--model", "tiny-vpred", "--v-parameterization", "--zero-terminal-snr",
          "--scale-v-pred-loss-like-noise-pred", "--steps", "2", "--lr", "1e-2", "--optim", "adamw",
          "--sample-prompt", "a red circle --w 64 --h 64 --s 3 --d 4", "--sample-every", "0")
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_v_parameterization"], meta["ss_zero_terminal_snr"], meta["modelspec.prediction_type"],
            meta["ss_scale_v_pred_loss_like_noise_pred"]) == ("True", "True", "v", "True")
    record = run_json(out)
    assert (record["prediction_type"], record["zero_terminal_snr"]) == ("v_prediction", True)

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path(vpred=True))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    assert pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.prediction_type == "v_prediction"
    pipe.load_lora_weights(str(out / "pytorch_lora_weights.safetensors"))
    expected = pipe(prompt="a red circle", width=64, height=64, num_inference_steps=3, guidance_scale=7.0,
                    guidance_rescale=0.7, generator=torch.Generator().manual_seed(4)).images[0]
    with Image.open(out / "samples" / "step-000002-00.png") as img:
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(expected))
