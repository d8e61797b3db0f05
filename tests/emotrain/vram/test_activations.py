"""Activations planned by tracing a step on fake tensors: the tracker counts what a
step really allocates, the fake trace equals a real step's, checkpointing shrinks it,
the cache answers the second time, and --gpu-memory's verdict and changes hold."""

from __future__ import annotations

import json

import pytest
import torch

from emotrain import vram
from emotrain.config import TrainConfig
from emotrain.lora.inject import lora_config_for_run, meta_sdxl, random_lora_unet
from emotrain.loss import Objective
from emotrain.precision import weight_dtype
from emotrain.vram.activations import step_activations
from emotrain.vram.trace import LiveStorages, cuda_rounded, trace_step


def test_the_tracker_counts_live_storages():
    x = torch.zeros(1000)  # made before: not counted
    with LiveStorages() as t:
        t.known([x])
        y = x + 1  # 4,000 bytes
        z = y * 2  # 8,000 live
        v = z.view(10, 100)  # a view: no new storage
        del y
        w = torch.ones(500, dtype=torch.float64)  # 4,000 + 4,000: still 8,000
        del z, v, w
        u = torch.ones(3000)  # 12,000 alone
        del u
    assert t.timeline.peak() == 12_000
    assert t.timeline.peak(skip=frozenset({3})) == 8_000  # without the last one
    assert cuda_rounded(4000) == 4096 and cuda_rounded(512) == 512 and cuda_rounded(0) == 0


SETTINGS = [  # resolution, batch, checkpointing, precision, adapter
    (64, 1, False, "bf16", "lora"),
    (64, 2, False, "no", "lora"),
    (128, 1, True, "bf16", "lora"),
    (64, 1, False, "bf16", "loha"),
    (64, 1, True, "bf16", "lokr"),
]


def _cfg(resolution, batch, checkpointing, precision, **kw):
    return TrainConfig(model="tiny", rank=8, conv_rank=4, resolution=resolution, batch_size=batch,
                       gradient_checkpointing=checkpointing, mixed_precision=precision, min_snr_gamma=5.0, **kw)


@pytest.mark.parametrize("resolution,batch,checkpointing,precision,adapter", SETTINGS)
def test_planned_activations_match_a_real_step(resolution, batch, checkpointing, precision, adapter):
    cfg = _cfg(resolution, batch, checkpointing, precision, adapter=adapter)
    planned = step_activations(cfg, meta_sdxl(cfg)["unet"], use_cache=False)
    torch.manual_seed(0)
    dtype = weight_dtype(precision)
    unet = random_lora_unet("tiny", lora_config_for_run(cfg), "cpu", dtype)
    for p in unet.parameters():  # as training holds them: the adapter fp32, the base in the run's dtype
        p.data = p.data.float() if p.requires_grad else p.data.to(dtype)
    from diffusers import DDPMScheduler
    from emotrain.sdxl import load_config
    c = unet.config
    real = trace_step(unet, batch, (resolution // 8, resolution // 8), dtype, checkpointing, Objective.of(cfg),
                      DDPMScheduler.from_config(load_config("sdxl_scheduler")), fake=False,
                      text_dims=(77, c.cross_attention_dim,
                                 c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim))
    measured = real["peak_bytes"] - real["grad_bytes"]
    assert measured > 0 and planned["trace"]["grad_bytes"] == real["grad_bytes"]
    assert abs(planned["activation_bytes"] - measured) <= 0.10 * measured, (planned, real)


def test_checkpointing_shrinks_activations_and_the_cache_answers():
    on, off = _cfg(128, 1, True, "bf16"), _cfg(128, 1, False, "bf16")
    first = step_activations(off, meta_sdxl(off)["unet"])
    again = step_activations(off, meta_sdxl(off)["unet"])
    assert again["cached"] and not first.get("cached")
    assert again["activation_bytes"] == first["activation_bytes"]
    with_ckpt = step_activations(on, meta_sdxl(on)["unet"])
    assert with_ckpt["activation_bytes"] < first["activation_bytes"] / 2
    # a second micro-batch runs with every gradient allocated: counted apart from them
    accum = step_activations(off.replace(grad_accum=2), meta_sdxl(off)["unet"])
    assert accum["activation_bytes"] >= first["activation_bytes"]


def test_the_plan_adds_activations_and_margin_to_the_step():
    cfg = _cfg(64, 1, False, "bf16", optim="emoairy")
    p = vram.plan(cfg)
    row = p["optimizers"]["emoairy"]
    a = p["activations"]
    assert row["activation_bytes"] == a["activation_bytes"] > 0
    assert row["margin_bytes"] == a["rounding_bytes"] + vram.CUDA_WORKSPACE_BYTES
    assert row["peak_bytes"] == row["training_step_bytes"] + row["activation_bytes"] + row["margin_bytes"]
    assert "Activations" in vram.format_table(p)


def test_gpu_memory_verdict_and_the_changes_that_fit():
    from helpers import run_cli
    # the shapes of the test above (its traces are in the cache)
    base = ["vram", "--model", "tiny", "--rank", "8", "--conv-rank", "4", "--min-snr-gamma", "5", "--resolution",
            "128", "--optim", "emoairy", "--mixed-precision", "bf16", "--json"]
    rows = [json.loads(run_cli(*base, *extra).output)["optimizers"]["emoairy"]
            for extra in ([], ["--gradient-checkpointing"])]
    off, on = (r["peak_bytes"] for r in rows)
    for r in rows:  # the floor that answers an untraced change lies under the traced peak
        assert r["training_step_bytes"] - r["grad_bytes"] + vram.CUDA_WORKSPACE_BYTES <= r["peak_bytes"]
    budget = f"{(on + off) / 2 / vram.GIB:.6f}"  # between the two
    missed = json.loads(run_cli(*base, "--gpu-memory", budget).output)["gpu_memory"]
    assert not missed["fits"] and missed["text"].startswith("misses by")
    fixes = [c for c in missed["changes"] if c["fits"]]
    assert fixes and fixes[0]["flags"] == "--gradient-checkpointing"
    applied = json.loads(run_cli(*base, *fixes[0]["flags"].split(), "--gpu-memory", budget).output)["gpu_memory"]
    assert applied["fits"] and applied["peak_bytes"] == fixes[0]["peak_bytes"]
    text = run_cli(*base[:-1], "--gpu-memory", budget).output
    assert "misses by" in text and "--gradient-checkpointing" in text


def _fake_plans(sizes, calls):
    """A plan_fn for vram.fit: ``sizes(cfg)`` -> (static bytes, gradient bytes, peak)."""
    def plan_fn(c, activations=True):
        static, grads, peak = sizes(c)
        calls.append((c, activations))
        row = {"training_step_bytes": static, "grad_bytes": grads}
        return {"optimizers": {vram.row_key(c.optim, c.shadow): {**row, "peak_bytes": peak} if activations else row}}
    return plan_fn


def test_a_change_whose_floor_misses_is_not_traced():
    """fit plans each change without activations first: what the step holds besides them
    (less the gradients) plus the workspaces is a floor under the peak, and a floor over the
    budget answers "misses by at least" without the trace."""
    ws = vram.CUDA_WORKSPACE_BYTES
    cfg = _cfg(1024, 4, False, "bf16", optim="emosens")
    calls = []
    # static bytes fall with each change; the peak adds 3 GiB of activations (1 GiB with checkpointing)
    def sizes(c):
        static = (10 - (c.optim == "emoairy") - 2 * (c.batch_size == 1) - c.fp8_base) * vram.GIB
        return static, vram.GIB // 2, static + (vram.GIB if c.gradient_checkpointing else 3 * vram.GIB) + ws
    budget = 8 * vram.GIB
    f = vram.fit(cfg, budget, sizes(cfg)[2], _fake_plans(sizes, calls))
    first = f["changes"][0]  # checkpointing: static 10 GiB - 0.5 GiB of grads + ws > 8 GiB, untraced
    assert first["flags"] == "--gradient-checkpointing" and first["floor"] and not first["fits"]
    assert first["peak_bytes"] == 10 * vram.GIB - vram.GIB // 2 + ws
    assert first["text"] == f"misses by at least {(first['peak_bytes'] - budget) / vram.GIB:.1f} GiB"
    traced = [c for c, activations in calls if activations]
    # floors under the budget are traced: the batch change alone (static 8 GiB less grads) and the
    # changes together from the batch change on, up to the first that fits (with --fp8-base)
    assert [(c.batch_size, c.fp8_base, c.optim) for c in traced] == [(1, False, "emosens"), (1, False, "emoairy"),
                                                                      (1, True, "emoairy")]
    assert f["together"]["fits"] and not f["together"].get("floor")
    assert f["together"]["flags"].endswith("--fp8-base")
    text = vram.format_fit(f, "8 GiB")
    assert "> 9.56 GiB  misses by at least 1.6 GiB" in text and "not traced" in text


def test_together_names_each_setting_once():
    # only rank 4 at 512 px fits: the changes together end there, each setting named once
    cfg = _cfg(1024, 1, True, "bf16", optim="emoairy", fp8_base=True).replace(rank=16, conv_rank=8)
    def sizes(c):
        return 0, 0, (4 if c.resolution > 512 or c.rank > 4 else 1) * vram.GIB
    f = vram.fit(cfg, 2 * vram.GIB, 4 * vram.GIB, _fake_plans(sizes, []))
    assert [c["flags"] for c in f["changes"]] == ["--rank 8 --conv-rank 4", "--rank 4 --conv-rank 2",
                                                   "--resolution 768", "--resolution 512"]
    assert f["together"]["fits"] and f["together"]["flags"] == "--rank 4 --conv-rank 2 --resolution 512"


def test_no_change_left_to_offer_answers_without_error():
    cfg = _cfg(512, 1, True, "bf16", optim="emoairy", fp8_base=True).replace(rank=4)
    f = vram.fit(cfg, 1, 2 * vram.GIB, _fake_plans(lambda c: (vram.GIB, 0, 2 * vram.GIB), []))
    assert f["changes"] == [] and f["together"] is None and not f["fits"]
    assert "No change here makes it fit" in vram.format_fit(f, "1 byte")


def test_trained_text_encoders_are_part_of_the_step():
    cfg = _cfg(64, 1, False, "bf16", optim="emoairy")
    alone = vram.plan(cfg)
    both = vram.plan(cfg.replace(train_text_encoders=True))
    # the encoders' forward is traced too: their LoRA's gradients and their activations
    assert alone["activations"]["trace"]["grad_bytes"] == 4 * alone["lora_params"]
    # every encoder LoRA but those of layers past the hidden state SDXL reads gets a gradient
    assert 4 * alone["lora_params"] < both["activations"]["trace"]["grad_bytes"] <= 4 * both["lora_params"]
    assert both["activations"]["activation_bytes"] > alone["activations"]["activation_bytes"]


def test_a_step_that_cannot_be_traced_says_so_and_gives_no_verdict(monkeypatch):
    """A forward that reads a tensor's value cannot run on fake tensors (peft's LoHa/LoKr
    did, until lycoris.py's ``_Steady``): the plan says so instead of guessing."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    import importlib

    plan_module = importlib.import_module("emotrain.vram.plan")  # the module, not vram.plan the function
    from helpers import run_cli

    def untraceable(*args, **kwargs):
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    base = ["vram", "--model", "tiny", "--resolution", "64", "--rank", "4", "--adapter", "loha", "--optim", "emoairy"]
    traced = json.loads(run_cli(*base, "--json").output)  # LoHa itself is traced now
    assert traced["activations_untraced"] is None and traced["optimizers"]["emoairy"]["peak_bytes"] > 0
    monkeypatch.setattr(plan_module, "step_activations", untraceable)
    table = run_cli(*base).output
    assert "activations: not planned for --adapter loha" in table.lower()
    refused = run_cli(*base, "--gpu-memory", "8", expect=2).output.strip()
    assert refused.count("\n") == 0 and "drop --gpu-memory" in refused and "Traceback" not in refused


def test_fp8_base_is_offered_when_it_is_the_cheapest_change_that_fits():
    from helpers import run_cli
    base = ["vram", "--model", "tiny", "--rank", "8", "--resolution", "64", "--optim", "emoairy",
            "--mixed-precision", "bf16", "--gradient-checkpointing", "--json"]
    plain = json.loads(run_cli(*base).output)
    fp8 = json.loads(run_cli(*base, "--fp8-base").output)
    off, on = plain["optimizers"]["emoairy"]["peak_bytes"], fp8["optimizers"]["emoairy"]["peak_bytes"]
    # the UNet's stored layers at one byte a value instead of two, plus one layer's bf16 copy
    saved = plain["base_bytes_by_component"]["unet"] - fp8["base_bytes_by_component"]["unet"]
    assert saved > 0 and off - on == saved - fp8["fp8_cast_bytes"] and fp8["fp8_cast_bytes"] > 0
    budget = f"{(on + off) / 2 / vram.GIB:.6f}"
    missed = json.loads(run_cli(*base, "--gpu-memory", budget).output)["gpu_memory"]
    assert missed["changes"][0]["flags"] == "--fp8-base" and missed["changes"][0]["fits"]
    applied = json.loads(run_cli(*base, "--fp8-base", "--gpu-memory", budget).output)["gpu_memory"]
    assert applied["fits"] and applied["peak_bytes"] == missed["changes"][0]["peak_bytes"]


def test_a_hopeless_budget_is_answered_from_floors_through_the_cli():
    # the run of the test above with --fp8-base (its trace is in the cache): on 10 MiB
    from helpers import run_cli
    base = ["vram", "--model", "tiny", "--rank", "8", "--resolution", "64", "--optim", "emoairy",
            "--mixed-precision", "bf16", "--gradient-checkpointing", "--fp8-base", "--gpu-memory", "0.01"]
    f = json.loads(run_cli(*base, "--json").output)["gpu_memory"]
    assert not f["fits"] and f["changes"] and f["changes"][-1]["flags"].startswith("--rank 4")
    assert all(c["floor"] and c["text"].startswith("misses by at least") for c in f["changes"])
    assert f["together"]["floor"] and not f["together"]["fits"]
    text = run_cli(*base).output
    assert "No change here makes it fit" in text and "not traced" in text


def test_the_fused_forward_s_factor_copies_are_planned_as_the_layers_hold_them():
    from emotrain.lora import fast

    cfg = _cfg(64, 1, False, "bf16", optim="emoairy")
    planned = vram.plan(cfg)
    torch.manual_seed(0)
    unet = random_lora_unet("tiny", lora_config_for_run(cfg), "cpu", torch.bfloat16)
    layer = next(m for m in unet.modules() if isinstance(m, fast.FastLinear))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the first fused forward makes every copy
        layer(torch.randn(1, layer.in_features, dtype=torch.bfloat16))
    held = {c.untyped_storage().data_ptr(): c.untyped_storage().nbytes() for c in getattr(layer, fast.SHADOWS).copies}
    assert planned["fused_copy_bytes"] == sum(held.values()) == 2 * planned["lora_params"]
    row = planned["optimizers"]["emoairy"]
    assert row["fused_copy_bytes"] == planned["fused_copy_bytes"]  # held between steps: in the step's bytes
    assert "Fused LoRA forward: bf16 copies" in vram.format_table(planned)  # what `emotrain vram` prints
    fp32 = vram.plan(cfg.replace(mixed_precision="no"))
    assert fp32["fused_copy_bytes"] == 0  # no autocast, no copies
    # --compile: the repeated blocks' layers run peft's forward (lora/start.py), the rest keep copies
    from emotrain.sdxl import repeated_blocks
    fast.uninstall(unet, repeated_blocks(unet))
    rest = next(m for m in unet.modules() if isinstance(m, fast.FastLinear) or isinstance(m, fast.FastConv2d))
    kept = 2 * sum(p.numel() for m in getattr(rest, fast.SHADOWS).layers for p in fast._factors(m))
    assert 0 < vram.plan(cfg.replace(compile=True))["fused_copy_bytes"] == kept < planned["fused_copy_bytes"]
    # the trace's forward made them too: counted once, with what stays between steps
    raw = step_activations(cfg, meta_sdxl(cfg)["unet"])
    assert row["activation_bytes"] == raw["activation_bytes"] - planned["fused_copy_bytes"]
