"""Two processes under `accelerate launch` on the CPU (gloo) on the tiny model: each trains on
its own batches of the same epoch order, with its own noise; the replicas stay identical;
the Emo family gets the mean loss over processes; a stop and a resume end bit-exact."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAST

ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = ["--optim", "emoairy", "--shadow", "--steps", "6", "--save-every", "2"]


def free_port() -> int:
    with socket.socket() as s:  # other test sessions may be launching too: never the default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, trace=False, **kwargs):
    # --multi_gpu is accelerate's torchrun launcher; without GPUs emotrain runs it on the CPU over
    # gloo (its --cpu flag would start a single process: it needs mpirun for more).
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "emotrain", "sdxl-lora",
           *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMOTRAIN_TRACE": "1" if trace else "0"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, **kwargs)


def finish(proc, timeout=300):
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "straight"
    code, output = finish(launch(*FAST, *STEPS, "--output", out, trace=True))
    assert code == 0, output
    return out, output


def trace(out, rank):
    return [json.loads(line) for line in (out / f"trace-rank-{rank}.jsonl").read_text().splitlines()]


def test_two_processes_split_the_data_and_agree(straight):
    out, output = straight
    run = json.loads((out / "run.json").read_text())
    assert run["processes"] == 2 and run["effective_batch_size"] == 4
    assert "effective batch 4 = batch 2 x grad-accum 1 x 2 processes" in output
    ranks = [trace(out, r) for r in (0, 1)]
    batches = [[t for t in ranks[r] if "examples" in t] for r in (0, 1)]
    assert [t["step"] for t in batches[0]] == [t["step"] for t in batches[1]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(*batches):
        assert not set(a["examples"]) & set(b["examples"]), (a, b)  # different images in a step
    epoch = [i for r in (0, 1) for t in batches[r][:4] for i in t["examples"]]
    assert sorted(epoch) == list(range(16))  # 16 images, 2 x 2 per step: each once in 4 steps
    # The step's loss is the mean over the two processes, and the optimizer was given it.
    for step, (a, b) in enumerate(zip(*batches)):
        assert run["losses"][step] == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-12, abs=1e-12)
        assert a["loss"] != b["loss"]
    short = long = run["losses"][0]
    for loss, s in zip(run["losses"], run["emotion_scalar"]):
        short, long = 0.3 * loss + 0.7 * short, 0.01 * loss + 0.99 * long
        assert s == pytest.approx(torch.tanh(torch.tensor(5 * (short - long), dtype=torch.float64)).item(), abs=1e-9)
    sums = [[t["lora_sha256"] for t in ranks[r] if "lora_sha256" in t] for r in (0, 1)]
    assert sums[0] == sums[1] and len(sums[0]) == 1  # the replicas' LoRA is identical
    saved = load_file(out / "checkpoints" / "step-000006" / "trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_a_stop_and_resume_under_two_processes_is_bit_exact(straight, tmp_path):
    out = tmp_path / "stopped"
    proc = launch(*FAST, *STEPS, "--output", out)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, finish(proc)[1]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: every process gets it
    code, output = finish(proc)
    assert code != 0 and "interrupted at step" in output, output
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-1] < "step-000006", ckpts
    code, output = finish(launch("--resume", out))
    assert code == 0, output
    want = load_file(straight[0] / "pytorch_lora_weights.safetensors")
    got = load_file(out / "pytorch_lora_weights.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    run = json.loads((out / "run.json").read_text())
    assert run["losses"] == json.loads((straight[0] / "run.json").read_text())["losses"]


def test_the_survivor_of_a_killed_process_saves_its_replica_and_the_run_resumes(tmp_path):
    # Under bf16 with --fp8-base: the stored float8 weights are not broadcast by
    # DistributedDataParallel (gloo has no float8), and the run trains and resumes on two processes.
    import psutil

    out = tmp_path / "killed"
    proc = launch(*FAST, "--optim", "emoairy", "--steps", "6", "--save-every", "0", "--mixed-precision", "bf16",
                  "--fp8-base", "--output", out, trace=True)
    deadline = time.time() + 300
    while not (out / "trace-rank-0.jsonl").exists() or len(trace(out, 0)) < 2:  # two steps trained
        assert proc.poll() is None and time.time() < deadline, finish(proc)[1]
        time.sleep(0.05)
    main = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "0")
    main.kill()  # the main process, which holds the lock and writes run.json: the survivor does it
    code, output = finish(proc)
    lines = [line for line in output.splitlines() if line.startswith("error")]
    assert code != 0 and len(lines) == 1 and "[rank1]" not in output, output
    assert lines[0].startswith("error [process 1]: process 0 of 2 is gone (killed or crashed) at step ")
    ckpt = Path(lines[0].split("saved its replica as checkpoint ")[1].split(";")[0])
    assert ckpt.parent == out / "checkpoints" and (ckpt / "trainable.safetensors").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "stopped-process" and len(run["losses"]) == int(ckpt.name.split("-")[1])
    code, output = finish(launch("--resume", out))
    assert code == 0 and f"resumed from {ckpt}" in output and "not bit-identically" in output, output
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["steps"] == len(run["losses"]) == 6
    assert run["config"]["fp8_base"] is True and all(map(math.isfinite, run["losses"]))
