"""Adapter kinds (issue 17): a real client's loader on emotrain's files, and memory/speed
per kind on the tiny model.

  check LYCORIS_SRC FILE...  every module of each kohya/LyCORIS FILE rebuilt by LyCORIS'
      own loader (``<Module>.make_module_from_state_dict``, lycoris-lora 4.1.3, unpacked
      wheel at LYCORIS_SRC; einops and toml on PYTHONPATH) on the tiny model's layer, its
      merged weight (``get_merged_weight``) against emotrain's (base + LoraModule.delta).
  table   parameters, state bytes (adamw, emoairy) and training-step time vs LoRA, tiny model
      (rank 4, full targets, CPU fp32, AdamW step; kinds interleaved, median of the rounds).

    PYTHONPATH=$PWD:/tmp/lycoris python benchmarks/adapter_kinds.py check /tmp/lycoris run/lora.safetensors
    PYTHONPATH=$PWD python benchmarks/adapter_kinds.py table [ROUNDS]
"""

from __future__ import annotations

import sys
import time

import torch


@torch.no_grad()  # as LyCORIS' own loading runs
def check(files) -> None:
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule
    from safetensors.torch import load_file

    from emotrain import sdxl
    from emotrain.lora.formats import load_lora_file
    unet = sdxl.load_sdxl(sdxl.resolve_model("tiny"), torch.float32).unet
    modules = dict(unet.named_modules())
    for path in files:
        raw, ours = load_file(path), load_lora_file(path)
        groups = {}
        for key, value in raw.items():
            base, _, part = key.partition(".")
            groups.setdefault(base, {})[part] = value
        worst, mapped = 0.0, 0
        for full, m in ours.modules.items():
            name = full.split(".", 1)[1]
            layer = modules[name]
            p = groups.pop(sdxl.kohya_name(full, unet.config))
            g = p.get
            if m.kind == "loha":
                mod = LohaModule.make_module_from_state_dict("x", layer, g("hada_w1_a"), g("hada_w1_b"), g("hada_w2_a"),
                                                             g("hada_w2_b"), None, None, g("alpha"), None)
            elif m.kind == "lokr":
                mod = LokrModule.make_module_from_state_dict("x", layer, g("lokr_w1"), g("lokr_w1_a"), g("lokr_w1_b"),
                                                             g("lokr_w2"), g("lokr_w2_a"), g("lokr_w2_b"), None, None,
                                                             g("alpha"), None)
            else:
                mod = LoConModule.make_module_from_state_dict("x", layer, g("lora_up.weight"), g("lora_down.weight"),
                                                              None, g("alpha"), g("dora_scale"))
            W = layer.weight.detach()
            theirs = mod.get_merged_weight(1, shape=W.shape)[0]
            mine = W + m.delta(torch.float32, base=W).reshape(W.shape)
            err = float((theirs - mine).abs().max() / (theirs - W).abs().max().clamp_min(1e-30))
            worst, mapped = max(worst, err), mapped + 1
        print(f"{path}: {mapped} modules mapped by LyCORIS' loader, {len(groups)} keys left unmapped, "
              f"worst relative difference of the change {worst:.2e}")


def table(rounds: int = 15) -> None:
    """Each kind's UNet built first; then ``rounds`` rounds of one training step per kind,
    interleaved (so that a load change on the machine hits every kind alike); the median
    per kind, the first round (warm-up) left out, of the wall time and of the process' CPU
    time (which other processes on a shared machine disturb less)."""
    from emotrain.config import TrainConfig
    from emotrain.lora.inject import lora_config_for_run, random_lora_unet
    from emotrain.vram.state import planned_state_bytes
    from helpers_tiny import unet_inputs
    rows = []
    for kind, extra in (("lora", {}), ("dora", {}), ("loha", {}), ("lokr", {}), ("lokr", {"lokr_factor": 4})):
        cfg = TrainConfig(model="tiny", rank=4, adapter=kind, **extra)
        torch.manual_seed(0)
        unet = random_lora_unet("tiny", lora_config_for_run(cfg), torch.device("cpu"), torch.float32)
        params = [p for p in unet.parameters() if p.requires_grad]
        n = sum(p.numel() for p in params)
        meta = [torch.nn.Parameter(torch.empty_like(p, device="meta")) for p in params]
        state = {o: planned_state_bytes(o, meta, shadow=False, args={}) for o in ("adamw", "emoairy")}
        name = kind + (f" factor {extra['lokr_factor']}" if extra else "")
        rows.append([name, n, state, unet, torch.optim.AdamW(params, lr=1e-4), unet_inputs(unet), [], []])
    for i in range(rounds):
        for row in rows:
            unet, opt, inputs, times, cpu = row[3:]
            t, c = time.perf_counter(), time.process_time()
            unet(**inputs).sample.square().mean().backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        if i:
            _print_table(rows, i + 1)  # after every round: a slow machine still leaves the medians so far


def _print_table(rows, rounds: int) -> None:
    def median(times):
        return sorted(times[1:])[len(times[1:]) // 2]
    ref, ref_cpu = median(rows[0][6]), median(rows[0][7])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds")
    print("| kind | parameters | adamw state bytes | emoairy state bytes | step wall (median) | vs LoRA "
          "| step CPU time (median) | vs LoRA |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, state, *_, times, cpu in rows:
        t, c = median(times), median(cpu)
        print(f"| {name} | {n:,} | {state['adamw']:,} | {state['emoairy']:,} | {t * 1000:.0f} ms | {t / ref:.2f}x "
              f"| {c * 1000:.0f} ms | {c / ref_cpu:.2f}x |", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "check":
        sys.path.insert(0, sys.argv[2])
        check(sys.argv[3:])
    else:
        table(int(sys.argv[2]) if len(sys.argv) > 2 else 15)
