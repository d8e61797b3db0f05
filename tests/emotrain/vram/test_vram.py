"""The VRAM planner: its state figures are what optimizers really allocate, its SDXL
LoRA count matches an independent count from the config, and its JSON form is stable."""

from __future__ import annotations

import json
import time

import pytest
import torch

from emotrain import vram
from emotrain.config import TrainConfig
from emotrain.errors import UserError
from emotrain.optimizers import EMO, NAMES, build_optimizer, takes_loss
from optim import state_nbytes
from emotrain.lora.inject import add_lora, unet_lora_config
from emotrain.sdxl import load_config
from emotrain.sdxl.tiny import TINY_UNET

RANK = 8  # at rank 8 some tiny LoRA tensors pass bitsandbytes' 4096-element 8-bit threshold
ROWS = [(name, s) for name in NAMES for s in ((False, True) if name in EMO else (False,))]
# Loss seen by the Emo optimizers: the jump on step 2 drives |s| far past 0.1, the
# shadow buffer's allocation threshold, so shadow-on state reaches its full size.
LOSSES = (1.0, 11.0)


@pytest.fixture(scope="module")
def tiny_plan():
    return vram.plan(TrainConfig(model="tiny", rank=RANK), "all", "both", activations=False)


@pytest.fixture(scope="module")
def tiny_lora_params():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(TINY_UNET)
    params = add_lora(unet, unet_lora_config(RANK, RANK))
    return params, [p.detach().clone() for p in params]


@pytest.mark.parametrize("name,shadow", ROWS, ids=[vram.row_key(n, s) for n, s in ROWS])
def test_planned_state_equals_state_after_real_steps(tiny_plan, tiny_lora_params, name, shadow):
    params, fresh = tiny_lora_params
    with torch.no_grad():  # a fresh adapter (up weights at zero), as the plan's run starts: Prodigy's state depends on it
        for p, value in zip(params, fresh):
            p.copy_(value)
    opt = build_optimizer(name, params, 1e-4, shadow=shadow)
    gen = torch.Generator().manual_seed(1)
    for loss in LOSSES:
        # Real steps on real tensors; the gradients' values do not change any state size.
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step(loss=loss) if takes_loss(opt) else opt.step()
    if shadow:
        assert all("shadow" in st for st in opt.state.values()), "loss jump did not allocate the shadow"
    assert len(opt.state) == len(params)
    planned = tiny_plan["optimizers"][vram.row_key(name, shadow)]["state_bytes"]
    assert state_nbytes(opt) == planned
    for p in params:
        p.grad = None


def test_measure_runs_real_training_steps():
    # Every optimizer's real steps are covered above; this is the forward/backward path,
    # with the loss jump that makes the shadow appear.
    m = vram.measure(TrainConfig(model="tiny", rank=RANK, resolution=32, seed=0), "emocats", "on", steps=2)
    row = m["optimizers"]["emocats-shadow"]
    assert row["match"], row
    assert row["shadow_allocated_step"] == 2
    assert len(row["losses"]) == 2 and all(0 < x < 10 for x in row["losses"])
    assert m["peak_rss_bytes"] > 0
    text = vram.format_measure(m)
    assert "allocated at step 2" in text and "NO" not in text


def test_measure_reports_a_shadow_not_yet_allocated():
    m = vram.measure(TrainConfig(model="tiny", rank=4, resolution=32, seed=0), "emocats", "on", steps=1)
    row = m["optimizers"]["emocats-shadow"]
    assert row["shadow_allocated_step"] is None and not row["match"]
    assert row["measured_state_bytes"] * 2 == row["planned_state_bytes"]
    assert "NOT allocated" in vram.format_measure(m)


def _expected_sdxl_lora(rank: int, conv_rank: int) -> tuple[int, int]:
    """LoRA (params, modules) of the full-layer targets, counted from the SDXL config by
    the block layout of diffusers' UNet2DConditionModel, independently of peft."""
    c = load_config("sdxl_unet")
    ch, tl, n_layers = c["block_out_channels"], c["transformer_layers_per_block"], c["layers_per_block"]
    cross, temb = c["cross_attention_dim"], 4 * ch[0]
    count = {"params": 0, "modules": 0}

    def linear(i, o):  # also the 1x1 shortcut conv: A (r, i), B (o, r)
        count["params"] += rank * (i + o)
        count["modules"] += 1

    def conv3(i, o):  # A (r, i, 3, 3), B (o, r, 1, 1)
        count["params"] += conv_rank * (9 * i + o)
        count["modules"] += 1

    def resnet(i, o):
        conv3(i, o), conv3(o, o), linear(temb, o)
        if i != o:
            linear(i, o)

    def transformer(d, layers):
        linear(d, d), linear(d, d)  # proj_in, proj_out
        for _ in range(layers):
            for _ in range(4):
                linear(d, d)  # attn1 q, k, v, out
            linear(d, d), linear(cross, d), linear(cross, d), linear(d, d)  # attn2
            linear(d, 8 * d), linear(4 * d, d)  # GEGLU feed-forward

    out = ch[0]
    for i, kind in enumerate(c["down_block_types"]):
        inp, out = out, ch[i]
        for j in range(n_layers):
            resnet(inp if j == 0 else out, out)
            if kind.startswith("CrossAttn"):
                transformer(out, tl[i])
        if i < len(ch) - 1:
            conv3(out, out)
    resnet(ch[-1], ch[-1]), transformer(ch[-1], tl[-1]), resnet(ch[-1], ch[-1])
    rev, rev_tl = ch[::-1], tl[::-1]
    prev = rev[0]
    for i, kind in enumerate(c["up_block_types"]):
        out, inp = rev[i], rev[min(i + 1, len(rev) - 1)]
        for j in range(n_layers + 1):
            skip = inp if j == n_layers else out
            resnet((prev if j == 0 else out) + skip, out)
            if kind.startswith("CrossAttn"):
                transformer(out, rev_tl[i])
        if i < len(rev) - 1:
            conv3(out, out)
        prev = out
    return count["params"], count["modules"]


def test_sdxl_lora_count_matches_the_config_by_hand():
    assert _expected_sdxl_lora(8, 8) == (24_593_920, 788)  # known-good figure


def test_sdxl_planning_is_fast_and_exact():
    started = time.perf_counter()
    # every optimizer, shadow off and on
    p = vram.plan(TrainConfig(model="sdxl", rank=8), "all", "both", activations=False)
    assert time.perf_counter() - started < 30  # seconds, on a shared CPU
    assert (p["lora_params"], p["lora_tensors"], p["lora_modules"]) == (24_593_920, 1576, 788)
    assert p["lora_params"] == _expected_sdxl_lora(8, 8)[0]
    # One fp32 state per LoRA weight: EmoCats' exp_avg; AdamW adds exp_avg_sq and a step counter.
    assert p["optimizers"]["emocats"]["state_bytes"] == 4 * 24_593_920
    assert p["optimizers"]["adamw"]["state_bytes"] == 8 * 24_593_920 + 4 * 1576
    # SDXL 1.0 base parameter counts (UNet 2,567,463,684; CLIP-L 123,060,480;
    # OpenCLIP-bigG 694,659,840; VAE 83,653,863), fp32, plus the CLIP position_ids.
    base = p["base_bytes_by_component"]
    assert base["unet"] == 4 * 2_567_463_684
    assert base["vae"] == 4 * 83_653_863
    assert base["text_encoder"] == 4 * 123_060_480 + 8 * 77
    assert base["text_encoder_2"] == 4 * 694_659_840 + 8 * 77


def test_sdxl_rank32_reference_is_the_published_85m():
    p = vram.plan(TrainConfig(model="sdxl", rank=32), "emocats", "off", activations=False)
    ref = p["reference"]
    assert ref["transformer_blocks_params"] == 85_114_880  # "about 85 M"
    assert round(ref["one_fp32_state_bytes_transformer_blocks"] / vram.MB) == 340  # "about 340 MB"
    assert p["lora_params"] == _expected_sdxl_lora(32, 32)[0]


def test_sdxl_transformer_block_lora_reproduces_the_claim():
    # kohya's default UNet LoRA at rank 32: EmoSens one fp32 state above EmoCats, EmoAiry
    # almost one below (its factored state is d0 + d1 per matrix).
    p = vram.plan(TrainConfig(model="sdxl", rank=32, targets="transformer"), "emosens,emoairy,emocats", "off",
                  activations=False)
    assert p["lora_params"] == 85_114_880
    rows = p["optimizers"]
    assert rows["emosens"]["delta_vs_emocats_bytes"] == 4 * 85_114_880
    assert -4 * 85_114_880 < rows["emoairy"]["delta_vs_emocats_bytes"] < -0.95 * 4 * 85_114_880


def test_half_precision_halves_the_base_but_not_the_vae(tiny_plan):
    half = vram.plan(TrainConfig(model="tiny", rank=RANK, mixed_precision="bf16"), "emocats", "off", activations=False)
    full = tiny_plan["base_bytes_by_component"]
    assert half["base_bytes_by_component"]["vae"] == full["vae"]
    assert half["base_bytes_by_component"]["unet"] * 2 == full["unet"]


def test_text_encoder_lora_counts(tiny_plan):
    p = vram.plan(TrainConfig(model="tiny", rank=RANK, train_text_encoders=True), "emocats", "off", activations=False)
    comp = p["lora_params_by_component"]
    assert set(comp) == {"unet", "text_encoder", "text_encoder_2"}
    assert comp["unet"] == tiny_plan["lora_params"]
    # tiny CLIP: 3 layers of width 32, MLP 64: q, k, v, out (32 -> 32), fc1 (32 -> 64), fc2 (64 -> 32)
    per_layer = RANK * (4 * 64 + 96 + 96)
    assert comp["text_encoder"] == comp["text_encoder_2"] == 3 * per_layer
    assert p["optimizers"]["emocats"]["state_bytes"] == 4 * p["lora_params"]


def test_json_form_has_the_documented_keys(tiny_plan):
    d = json.loads(json.dumps(tiny_plan))
    assert {"model", "rank", "lora_params", "optimizers"} <= set(d)
    assert d["model"] == "tiny" and d["rank"] == RANK
    assert list(d["optimizers"]) == [vram.row_key(n, s) for n, s in ROWS]
    for row in d["optimizers"].values():
        assert {"state_bytes", "total_bytes", "lora_param_bytes", "grad_bytes", "base_bytes",
                "delta_vs_emocats_bytes", "training_step_bytes", "optimizer", "shadow"} <= set(row)
        assert row["total_bytes"] == row["lora_param_bytes"] + row["state_bytes"] + row["grad_bytes"] + row["base_bytes"]
        # text encoders and VAE are freed after caching when the text encoders are not trained
        assert row["total_bytes"] - row["training_step_bytes"] == sum(
            d["base_bytes_by_component"][c] for c in ("text_encoder", "text_encoder_2", "vae"))
    assert d["optimizers"]["emocats"]["delta_vs_emocats_bytes"] == 0


def test_table_and_option_parsing(tiny_plan):
    text = vram.format_table(tiny_plan)
    for label in ("EmoSens + shadow", "EmoAiry", "AdamW8bit", "Adafactor", "Lion", "MB = 10^6 bytes"):
        assert label in text
    assert vram.parse_optims("emosens, adamw,emosens") == ["emosens", "adamw"]
    assert vram.parse_optims("all") == list(NAMES)
    assert vram.shadow_settings("both") == (False, True)
    with pytest.raises(Exception):
        vram.shadow_settings("sometimes")


def test_planning_never_steps_real_weights(tiny_lora_params):
    opt = torch.optim.AdamW(tiny_lora_params[0], lr=1e-3)
    with pytest.raises(ValueError):
        vram.init_optimizer_state(opt)


def test_memory_reports():
    assert vram.process_peak_rss_bytes() > 10 * 2**20
    report = vram.cuda_memory_report()
    assert report is None if not torch.cuda.is_available() else report["peak_reserved_bytes"] >= 0


@pytest.mark.parametrize("targets,modules,params", [("transformer", 722, 85_114_880), ("full", 788, 98_375_680)])
def test_sdxl_target_sets_at_rank_32(targets, modules, params):
    # transformer: exactly what sd-scripts trains without conv_dim; full: with conv_dim.
    p = vram.plan(TrainConfig(model="sdxl", rank=32, targets=targets), "emocats", "off", activations=False)
    assert (p["lora_modules"], p["lora_params"]) == (modules, params)
    kinds = set(p["lora_params_by_layer"])
    assert (kinds == {"attention", "feed-forward", "transformer proj_in/out"}) == (targets == "transformer")


def test_conv_rank_zero_keeps_the_resnet_linears():
    p = vram.plan(TrainConfig(model="sdxl", rank=32, conv_rank=0), "emocats", "off", activations=False)
    layers = p["lora_params_by_layer"]
    assert p["lora_modules"] == 722 + 17 + 11  # transformer blocks + time_emb_proj + 1x1 shortcuts
    assert layers["resnet shortcut + time_emb_proj"]["modules"] == 28
    assert "resnet conv1/conv2" not in layers and "down/up-sampler conv" not in layers


def test_vram_plans_the_preset_run():
    from helpers import run_cli
    # on the tiny model: the trace's code is the same for SDXL, and an SDXL trace costs about
    # a CPU-minute (benchmarks/RESULTS.md has the SDXL plans)
    by_preset = json.loads(run_cli("vram", "--preset", "emoairy", "--model", "tiny", "--resolution", "64",
                                   "--json").output)
    by_flags = json.loads(run_cli("vram", "--model", "tiny", "--resolution", "64", "--rank", "32", "--alpha", "16",
                                  "--conv-rank", "8", "--conv-alpha", "4", "--optim", "emoairy", "--no-shadow",
                                  "--mixed-precision", "bf16", "--gradient-checkpointing", "--min-snr-gamma", "5",
                                  "--json").output)
    by_preset.pop("seconds"), by_flags.pop("seconds")
    traced, cached = by_preset.pop("activations"), by_flags.pop("activations")  # the second from the cache
    assert cached["cached"] and cached["activation_bytes"] == traced["activation_bytes"] > 0
    assert by_preset == by_flags and list(by_preset["optimizers"]) == ["emoairy"]
    assert by_preset["mixed_precision"] == "bf16" and by_preset["conv_rank"] == 8
    # a flag over the preset wins (--alpha: the same shapes, so the trace comes from the cache)
    wider = json.loads(run_cli("vram", "--preset", "emoairy", "--model", "tiny", "--resolution", "64", "--alpha", "32",
                               "--optim", "all", "--both", "--json").output)
    assert (wider["rank"], wider["alpha"]) == (32, 32) and len(wider["optimizers"]) == 12
    assert wider["activations"]["cached"]


def test_measure_trains_the_models_own_prediction_type():
    """As training does (sdxl.model_schedule): the model's scheduler config says v-prediction
    without a flag; a flag still wins."""
    def measured(model, **flags):
        return vram.measure(TrainConfig(model=model, rank=4, resolution=32, seed=0, **flags), "adamw", "off", steps=1)

    vpred = measured("tiny-vpred")
    assert (vpred["prediction_type"], vpred["zero_terminal_snr"]) == ("v_prediction", True)  # as its config says
    assert "v_prediction target" in vram.format_measure(vpred)
    assert measured("tiny")["prediction_type"] == "epsilon"
    flags = measured("tiny-vpred", v_parameterization=False, zero_terminal_snr=False)
    assert (flags["prediction_type"], flags["zero_terminal_snr"]) == ("epsilon", False)
    with pytest.raises(UserError, match="needs a v-prediction model"):  # as training refuses it
        measured("tiny-vpred", v_parameterization=False)
