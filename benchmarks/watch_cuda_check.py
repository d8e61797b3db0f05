"""Watching a run on a GPU: the checks a CPU cannot make (tiny model, bf16 on CUDA).

    python benchmarks/watch_cuda_check.py

1. Validation, samples and TensorBoard on, bf16: the final LoRA equals, bit for bit, the
   same run with them off (the CUDA RNG is guarded like the CPU's).
2. Between samples the VAE and text encoders sit on the CPU and come to the GPU only
   for the sample; --sample-keep-models leaves them on the GPU.
3. The memory scalars come from the CUDA allocator; the samples are written.
Prints one line per check and exits non-zero if one fails. Runs on the CPU too (the
device checks then only say where the models were).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

COMMON = ["--model", "tiny", "--data", "demo", "--resolution", "64", "--batch-size", "2", "--rank", "4",
          "--lr", "1e-3", "--seed", "0", "--steps", "6", "--optim", "emosens", "--shadow", "--mixed-precision", "bf16"]


def main() -> int:
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    import emotrain.watch.samples as samples
    from emotrain.cli import app
    from emotrain.dataset.demo import demo_folder

    tmp = Path(tempfile.mkdtemp(prefix="watch-cuda-"))
    val = str(demo_folder(count=3, size=64, seed=5))
    seen = []
    real_on_device = samples.on_device

    def spying(modules, device):  # where the parked models are before, during and after a sample
        before = [next(m.parameters()).device.type for m in modules]
        context = real_on_device(modules, device)

        class Spy:
            def __enter__(self):
                context.__enter__()
                seen.append(("during", [next(m.parameters()).device.type for m in modules], before))

            def __exit__(self, *exc):
                context.__exit__(*exc)
                seen.append(("after", [next(m.parameters()).device.type for m in modules], before))

        return Spy()

    samples.on_device = spying

    def run(name, *extra):
        result = CliRunner().invoke(app, ["sdxl-lora", *COMMON, "--output", str(tmp / name), *extra])
        assert result.exit_code == 0, result.output
        return load_file(tmp / name / "lora.safetensors")

    watch = ["--val-data", val, "--val-every", "2", "--sample-prompt", "a red circle --s 4", "--sample-every", "3",
             "--log-every", "2", "--log-with", "tensorboard"]
    on, off = run("on", *watch), run("off", "--log-with", "none")
    failures = 0

    def check(ok, what):
        nonlocal failures
        failures += not ok
        print(("ok    " if ok else "FAIL  ") + what)

    cuda = torch.cuda.is_available()
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
    check(all(torch.equal(on[k], off[k]) for k in on), "watched bf16 run ends with the unwatched run's LoRA")
    during = {tuple(d) for kind, d, _ in seen if kind == "during"}
    after = {tuple(d) for kind, d, _ in seen if kind == "after"}
    want = "cuda" if cuda else "cpu"
    check(during == {(want,) * 3} and after == {("cpu",) * 3},
          f"VAE + 2 text encoders: {sorted(after)} between samples, {sorted(during)} while sampling")
    seen.clear()
    run("keep", *watch, "--sample-keep-models")
    check({tuple(d) for _, d, _ in seen} == {(want,) * 3}, f"--sample-keep-models: always on {want}")
    rows = [json.loads(line) for line in (tmp / "on" / "metrics.jsonl").read_text().splitlines()]
    peak = [r["memory/peak_mib"] for r in rows if "memory/peak_mib" in r]
    check(bool(peak) and all(p > 0 for p in peak), f"memory/peak_mib logged: {[round(p, 1) for p in peak]}")
    names = sorted(p.name for p in (tmp / "on" / "samples").iterdir())
    check(names == ["step-000000-00.png", "step-000003-00.png", "step-000006-00.png"], f"samples: {names}")
    val_loss = [round(r["val/loss"], 5) for r in rows if "val/loss" in r]
    print(f"      validation loss at steps 0, 2, 4, 6: {val_loss}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
