"""The trainer as a user meets it: `emotrain sdxl-lora` on the tiny model."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from emotrain.config import preset_names, resolve_config
from emotrain.errors import UserError
from helpers import run_cli, run_json, train


@pytest.mark.parametrize("optim,shadow", [("emosens", False), ("emoairy", True), ("emocats", False)])
def test_emo_optimizers_see_the_real_loss(tmp_path, optim, shadow):
    out = tmp_path / optim
    train(out, "--optim", optim, "--shadow" if shadow else "--no-shadow", "--steps", "8", "--grad-accum", "2")
    run = run_json(out)
    s = run["emotion_scalar"]
    assert len(s) == 8 and s[0] == pytest.approx(0.0, abs=1e-12)  # first loss: short == long (up to rounding)
    assert len({round(x, 6) for x in s}) > 3, f"emotion scalar did not move: {s}"
    # The scalar follows from the losses the loop recorded (mean over micro-batches):
    short = long = run["losses"][0]
    for loss, got in zip(run["losses"], s):
        short, long = 0.3 * loss + 0.7 * short, 0.01 * loss + 0.99 * long
        assert got == pytest.approx(torch.tanh(torch.tensor(5 * (short - long), dtype=torch.float64)).item(), abs=1e-9)
    assert run["config"]["optim"] == optim and run["config"]["shadow"] is shadow
    # The planner's figure for this LoRA is what the real loop allocated.
    from emotrain.config import TrainConfig
    from emotrain.vram import plan
    state = torch.load(out / "checkpoints" / "step-000008" / "training_state.pt", weights_only=True)["optimizer"]
    has_shadow = any("shadow" in st for st in state["state"].values())
    assert has_shadow == shadow  # |s| passed 0.1 within 8 steps, so the shadow exists
    planned = plan(TrainConfig(model="tiny", rank=4), optim, shadow)["optimizers"][optim + ("-shadow" if shadow else "")]
    assert run["memory"]["optimizer_state_bytes"] == planned["state_bytes"]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "adafactor", "lion", "torch.optim.SGD"])
def test_baselines_run(tmp_path, optim):
    out = tmp_path / optim.replace(".", "_")
    train(out, "--optim", optim, "--steps", "3", *(["--optim-args", "momentum=0.9"] if "SGD" in optim else []))
    run = run_json(out)
    assert run["steps"] == 3 and run["emotion_scalar"] == [None] * 3
    assert run["memory"]["optimizer_state_bytes"] > 0
    start = load_file(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert any(k.endswith("lora_B.default.weight") and v.abs().sum() > 0 for k, v in start.items()), "nothing trained"


def test_run_writes_everything(tmp_path):
    out = tmp_path / "run"
    train(out, "--optim", "emoairy", "--steps", "4", "--conv-rank", "2", "--conv-alpha", "1", "--alpha", "2")
    run = run_json(out)
    for key in ("config", "versions", "model_source", "memory", "seconds", "steps_per_second", "losses"):
        assert key in run
    assert run["status"] == "finished" and run["config"]["rank"] == 4
    from emotrain.options import OPTIONS
    assert list(run["config"]) == [o.name for o in OPTIONS]  # every option, from the one declaration
    assert run["memory"]["process_peak_rss_bytes"] > 0
    assert (out / "lora.safetensors").is_file() and (out / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4" and meta["ss_optimizer"] == "emoairy"
    assert json.loads(meta["emotrain_config"])["conv_rank"] == 2
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)


def test_presets_all_load_and_cli_wins():
    names = preset_names()
    for expected in ("emosens", "emosens-shadow", "emoairy", "emoairy-shadow", "emocats", "emocats-shadow", "tiny-demo"):
        assert expected in names
    for name in names:
        cfg = resolve_config(name, {"model": "tiny", "data": "demo"})
        assert cfg.optim in ("emosens", "emoairy", "emocats", "prodigy", "adamw-schedulefree")
        assert cfg.shadow == name.endswith("-shadow")
    cfg = resolve_config("emoairy", {"model": "tiny", "data": "demo", "lr": 1e-4, "shadow": True, "rank": 2})
    assert (cfg.lr, cfg.shadow, cfg.rank, cfg.resolution) == (1e-4, True, 2, 1024)


def test_presets_command_lists_them():
    result = run_cli("presets")
    assert "tiny-demo" in result.output and "emocats-shadow" in result.output


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "rank: must be at least 1"),
    (["--lr", "0"], "lr: must be positive"),
    (["--lr", "-1e-4"], "lr: must be positive"),
    (["--optim", "sgdx"], "unknown optimizer 'sgdx'"),
    (["--optim", "nosuchpkg.Opt"], "cannot import optimizer"),
    (["--data", "/no/such/folder"], "data: folder /no/such/folder does not exist"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["--resolution", "60"], "multiple of 32"),
    (["--lr-scheduler", "cosine_forever"], "unknown scheduler"),
    (["--network-weights", "/no/file.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    out = tmp_path / "out"
    result = train(out, *args, expect=2)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # refused before anything was written


def test_bad_preset_keys_and_values(tmp_path):
    for text, message in [("rnak = 4\n", "unknown key 'rnak'"), ("rank = 'four'\n", "rank in"),
                          ("lr = 0\n", "lr: must be positive"), ("shadow = 1\n", "shadow in"),
                          ("rank = [\n", "not valid TOML")]:
        preset = tmp_path / "p.toml"
        preset.write_text(text)
        result = run_cli("sdxl-lora", "--preset", str(preset), "--model", "tiny", "--data", "demo", expect=2)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_bad_data_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = train(tmp_path / "o1", "--data", str(empty), expect=2)
    assert "no images" in result.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    result = train(tmp_path / "o2", "--data", str(broken), "--steps", "1", expect=2)
    assert "cannot read image" in result.output and "a.png" in result.output


def test_kohya_repeat_folders(tmp_path):
    from PIL import Image

    from emotrain.dataset.scan import scan_folder
    (tmp_path / "3_cat").mkdir()
    Image.new("RGB", (32, 48), "red").save(tmp_path / "3_cat" / "a.png")
    (tmp_path / "3_cat" / "a.txt").write_text("a cat\n")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "b.jpg")
    examples = scan_folder(tmp_path)
    assert sorted(e.caption for e in examples) == ["", "a cat", "a cat", "a cat"]


def test_missing_model_is_refused():
    with pytest.raises(UserError, match="model"):
        resolve_config(None, {"data": "demo"})
    with pytest.raises(UserError, match="not found"):
        from emotrain.sdxl import resolve_model
        resolve_model("/no/such/model/dir")


def test_a_new_run_never_overwrites_another(tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "1")
    before = (out / "lora.safetensors").read_bytes()
    result = train(out, "--steps", "2", "--optim", "emosens", expect=2)
    assert "already holds a run" in result.output and "--resume" in result.output
    assert (out / "lora.safetensors").read_bytes() == before


def test_aspect_ratio_buckets(tmp_path):
    from PIL import Image

    from emotrain.run.batches import Batches
    from data_helpers import load_image
    from emotrain.dataset.buckets import bucket_sizes
    for i, size in enumerate([(128, 64), (130, 60), (64, 128), (64, 64), (64, 64), (200, 100)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    pixels, original, crop, target = load_image(tmp_path / "0.png", 64)
    assert original == (64, 128) and pixels.shape[1:] == target
    assert target[1] > target[0] and target[0] * target[1] <= 64 * 64 and target in [(h, w) for w, h in bucket_sizes(64)]
    assert load_image(tmp_path / "0.png", 64, bucket=False)[3] == (64, 64)
    sizes = [load_image(tmp_path / f"{i}.png", 64)[3] for i in range(6)]
    assert len(set(sizes)) == 3  # landscape, portrait, square
    batches = Batches(sizes, 2, seed=0)
    epoch = [batches.next() for _ in range(len(batches._batches))]
    assert all(len({sizes[i] for i in batch}) == 1 for batch in epoch)  # one size per batch
    assert sorted(i for batch in epoch for i in batch) == list(range(6))  # each image once an epoch
    assert batches.next() and batches.epoch == 1
    out = tmp_path / "run"
    train(out, "--data", tmp_path, "--steps", "3")
    assert run_json(out)["steps"] == 3


@pytest.mark.parametrize("flags", [["--mixed-precision", "bf16"], ["--mixed-precision", "fp16"],
                                   ["--gradient-checkpointing"], ["--min-snr-gamma", "5", "--noise-offset", "0.05"]])
def test_training_options_run(tmp_path, flags):
    out = tmp_path / "run"
    train(out, "--steps", "2", "--optim", "emosens", *flags)
    run = run_json(out)
    assert run["steps"] == 2 and all(torch.isfinite(torch.tensor(run["losses"])))
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 for v in weights.values())  # LoRA stays fp32 under mixed precision


def test_text_encoder_training(tmp_path, tiny_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    train(out, "--steps", "2", "--train-text-encoders", "--lr", "5e-3")
    keys = list(load_file(out / "lora.safetensors"))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_mlp_fc1") for k in keys)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_path)
    pipe.load_lora_weights(str(out))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        assert sum(1 for n, _ in encoder.named_modules() if n.endswith(".lora_A")) == 18


def test_transformer_targets_train_sd_scripts_default_set(tmp_path):
    out = tmp_path / "run"
    train(out, "--targets", "transformer", "--steps", "1")
    bases = {k.split(".")[0] for k in load_file(out / "lora.safetensors")}
    assert bases and all("_transformer_blocks_" in b or b.endswith(("_proj_in", "_proj_out")) for b in bases)
    assert len(bases) == run_json(out)["lora_tensors"] // 2
