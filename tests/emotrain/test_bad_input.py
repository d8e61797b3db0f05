"""The README's promise, fuzzed: every option and every kind of input file fed a table of
bad values (wrong type, negative, zero, nan, inf, huge, empty, non-UTF-8, a folder where a
file goes and the reverse) ends in exit code 2, one line, no traceback, nothing written."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from emotrain.options import OPTIONS
from helpers import run_cli

BASE = ["--model", "tiny", "--data", "demo", "--resolution", "64", "--steps", "2", "--rank", "4"]
NOT_UTF8 = "caf\udce9"  # what Python makes of the bytes b"caf\xe9" in argv


def numeric_cases(o):
    bad = ["abc", "", "nan", "inf", "-inf", "1e400", NOT_UTF8]
    if o.type is int:
        bad += ["1.5", str(10**30), str(-(10**30))]
    else:
        bad += ["-1e400"]
    if o.positive or (o.minimum is not None and o.minimum >= 0):
        bad.append("-1")
    if o.positive or (o.minimum is not None and o.minimum >= 1):
        bad.append("0")
    if o.maximum is not None:
        bad.append(str(int(o.maximum) * 2 + 1) if o.type is int else repr(o.maximum * 2))
    if o.below is not None:  # the bound itself is out (--ema-decay 1)
        bad.append(repr(o.below))
    return bad


def option_cases():
    """(flag values) per declared option: the table grows with the declaration."""
    for o in OPTIONS:
        if o.type is bool:
            yield o.name, [[o.cli_name, "maybe"], [f"{o.cli_name}=yes"]]
        elif o.type in (int, float):
            yield o.name, [[o.cli_name, v] for v in numeric_cases(o)]
        elif o.choices and o.name != "optim":
            yield o.name, [[o.cli_name, v] for v in ("nosuch", "", NOT_UTF8, o.choices[0].upper())]


PATH_CASES = {
    "model": ["", "nosuch-model", "tiny:x", "tiny:-1", "tiny:99999999999", "{dir}", "{file}", "{dir}/x.ckpt",
              "{dir}/missing.safetensors", NOT_UTF8, "a/b/c"],
    "data": ["", "{dir}/missing", "{file}", "{dir}", NOT_UTF8],
    "output": ["", "{file}", "{file}/sub", NOT_UTF8, "/proc/emotrain-no-such-place"],
    "network-weights": ["", "{dir}/missing.safetensors", "{dir}", "{file}", "{garbage}", "{empty}", "{sd15}",
                        "{nan}", "{nokeys}", NOT_UTF8],
    "base-lora": ["", "{dir}/missing.safetensors", "{sd15}:abc", "{sd15}:nan", "{sd15}:inf", "{sd15}:-inf",
                  "{garbage}", "{sd15}", "{nan}:0.5", "{dir}"],
    "optim": ["", "nosuch", "nosuch.module.Opt", "os.path", "os.sep", "collections.OrderedDict", ".x", "x.",
              NOT_UTF8],
    "optim-args": ["novalue", "=1", "a='x", "nosuch=1", "eps=-1", "lr=1", "eps=1e400", "betas=(0.9,1e400)",
                   "weight_decay='high'", "a=" + "(" * 200, NOT_UTF8 + "=1"],
    "preset": ["", "nosuch", "{dir}/missing.toml", "{dir}", "{bin_toml}", "{bad_toml}", "{unknown_toml}",
               "{nan_toml}", "{inf_rank_toml}", "{type_toml}"],
    "dataset-config": ["", "{dir}/missing.toml", "{dir}", "{bin_toml}", "{bad_toml}", "{file}", NOT_UTF8],
    "reg-data": ["", "{dir}/missing", "{file}", NOT_UTF8],
    "cache-dir": ["", "{file}", "{file}/sub", NOT_UTF8, "/proc/emotrain-no-such-place"],
    "caption-extension": ["", "txt", ".", NOT_UTF8],
    "caption-prefix": [NOT_UTF8],
    "keep-tokens-separator": ["", NOT_UTF8],
    "val-data": ["", "{dir}/missing", "{file}", NOT_UTF8, "{dir}"],
    "sample-prompts": ["", "{dir}/missing.txt", "{dir}", "{bin_toml}", NOT_UTF8, "{nan_prompts}"],
    "sample-prompt": ["", " --w 64", "x --w abc", "x --q 1", NOT_UTF8,
                      # issue 15: numbers in ASCII digits, finite, in their option's range, each given once
                      "x --s \u00b2", "x --d \u00b3", "x --w \u0661\u0662\u0668", f"x --d {2**70}", "x --d -1",
                      "x --d " + "9" * 5000, "x --l nan", "x --l inf", "x --l 1e400", "x --l -1", "x --l 1_0",
                      "x --w 99999", "x --s 1001", "x --s 2 --s 3"],
    "text-encoder-lr": ["", "abc", "nan", "inf", "-1", "0", "1e400", "11", "1e-4 2e-4 3e-4", "1e-4 x", NOT_UTF8],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    (d / "folder").mkdir()
    (d / "folder.safetensors").mkdir()
    (d / "file.txt").write_text("not what was asked for")
    (d / "garbage.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{}garbage")
    (d / "empty.safetensors").write_bytes(b"")
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)},
              d / "sd15.safetensors")  # an SD 1.5 LoRA
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.full((4, 64), float("nan")),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, d / "nan.safetensors")
    save_file({"x": torch.zeros(2)}, d / "nokeys.safetensors")
    proj_in = "lora_unet_input_blocks_4_1_proj_in"  # a 64 x 64 linear layer of the tiny model
    save_file({f"{proj_in}.lokr_w1": torch.ones(8, 8), f"{proj_in}.lokr_w2": torch.ones(8, 8),
               f"{proj_in}.alpha": torch.tensor(4.0)}, d / "lokr.safetensors")
    save_file({f"{proj_in}.lora_down.weight": torch.ones(4, 64), f"{proj_in}.lora_up.weight": torch.ones(64, 4),
               f"{proj_in}.dora_scale": torch.ones(64, 1)}, d / "dora.safetensors")
    save_file({f"{proj_in}.hada_w1_a": torch.ones(64, 4), f"{proj_in}.hada_w1_b": torch.ones(4, 64),
               f"{proj_in}.hada_w2_a": torch.ones(64, 4), f"{proj_in}.hada_w2_b": torch.ones(4, 64),
               f"{proj_in}.hada_t1": torch.ones(4, 4, 1, 1)}, d / "tucker.safetensors")
    (d / "bin.toml").write_bytes(bytes(range(256)))
    (d / "bad.toml").write_text("rank = [\n")
    (d / "unknown.toml").write_text("rnak = 4\n")
    (d / "nan.toml").write_text("lr = nan\n")
    (d / "infrank.toml").write_text("rank = inf\n")
    (d / "type.toml").write_text("shadow = 'yes'\n")
    (d / "prompts.txt").write_text("a red circle --w 64\na blue square --l nan\n")
    return {"dir": str(d / "folder"), "folder_lora": str(d / "folder.safetensors"), "file": str(d / "file.txt"), "garbage": str(d / "garbage.safetensors"),
            "empty": str(d / "empty.safetensors"), "sd15": str(d / "sd15.safetensors"),
            "nan": str(d / "nan.safetensors"), "nokeys": str(d / "nokeys.safetensors"),
            "bin_toml": str(d / "bin.toml"), "bad_toml": str(d / "bad.toml"), "unknown_toml": str(d / "unknown.toml"),
            "nan_toml": str(d / "nan.toml"), "inf_rank_toml": str(d / "infrank.toml"), "type_toml": str(d / "type.toml"),
            "nan_prompts": str(d / "prompts.txt"),
            **{k: str(d / f"{k}.safetensors") for k in ("lokr", "dora", "tucker")}}


def assert_refused(result, where, written_before):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    assert sorted(os.listdir(where)) == written_before, "something was written"


def run_cases(tmp_path, monkeypatch, cases, command="sdxl-lora", base=BASE):
    monkeypatch.chdir(tmp_path)
    failures = []
    for args in cases:
        before = sorted(os.listdir(tmp_path))
        result = run_cli(command, *base, *args, "--output", tmp_path / "out", expect=None) \
            if command == "sdxl-lora" and "--output" not in args else run_cli(command, *base, *args, expect=None)
        try:
            assert_refused(result, tmp_path, before)
        except AssertionError as exc:
            failures.append(f"{args}: {exc}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name,cases", list(option_cases()), ids=[n for n, _ in option_cases()])
def test_every_option_refuses_bad_values(tmp_path, monkeypatch, name, cases):
    run_cases(tmp_path, monkeypatch, cases)


@pytest.mark.parametrize("flag", list(PATH_CASES))
def test_paths_and_names_refuse_bad_values(tmp_path, monkeypatch, files, flag):
    drop = {"model": ("--model", "tiny"), "dataset-config": ("--data", "demo")}.get(flag, ())
    base = [a for a in BASE if a not in drop]
    run_cases(tmp_path, monkeypatch, [[f"--{flag}", v.format(**files)] for v in PATH_CASES[flag]], base=base)


# The lr-free optimizers' own arguments: unknown, nan/inf (spelt out, or a literal that
# overflows), values they reject; and an lr schedule schedule-free would fight.
LR_FREE_CASES = {
    "prodigy": [["--optim-args", v] for v in ("nosuch=1", "d_coef=nan", "d_coef=-inf", "d_coef=1e400",
                                              "betas=(0.9,1e400)", "d0=-1", "d_coef='high'")],
    "adamw-schedulefree": [["--optim-args", v] for v in ("nosuch=1", "warmup_steps=nan", "eps=inf", "r=-1e400",
                                                         "weight_decay='high'")] + [["--lr-scheduler", "cosine"]],
}


@pytest.mark.parametrize("optim", list(LR_FREE_CASES))
def test_lr_free_optimizers_refuse_bad_arguments(tmp_path, monkeypatch, optim):
    run_cases(tmp_path, monkeypatch, [["--optim", optim, *case] for case in LR_FREE_CASES[optim]])


def test_vram_refuses_the_same(tmp_path, monkeypatch, files):
    cases = [["--rank", "0"], ["--rank", "nan"], ["--resolution", "1e400"], ["--model", "tiny:x"],
             ["--model", files["dir"]], ["--optim", "nosuch"], ["--optim", "all,nosuch"], ["--optim", ","],
             ["--network-weights", files["sd15"]], ["--network-weights", files["garbage"]],
             ["--optim-args", "eps=1e400"], ["--measure", "--measure-steps", "0"], ["--measure-steps", "-1"],
             ["--preset", files["bin_toml"]], ["--gpu-memory", "twelve"], ["--gpu-memory", "0"],
             ["--gpu-memory", "nan"], ["--measure", "--gpu-memory", "8"]]
    run_cases(tmp_path, monkeypatch, cases, command="vram", base=[])


def test_merge_and_convert_refuse_bad_inputs(tmp_path, monkeypatch, files):
    out = str(tmp_path / "x.safetensors")
    cases = [["merge", "--lora", f"{files['sd15']}:{w}", "--output", out] for w in ("abc", "nan", "inf", "")]
    cases += [["merge", "--lora", files[k], "--output", out] for k in ("garbage", "empty", "nan", "nokeys", "file")]
    cases += [["merge", "--lora", files["sd15"], "--output", out, "--rank", r] for r in ("0", "-1", str(10**30), "x")]
    cases += [["merge", "--lora", files["sd15"], "--output", files["dir"] + "/../file.txt"],
              ["merge", "--lora", "", "--output", out], ["merge", "--lora", files["sd15"], "--output", ""],
              ["merge", "--lora", files["sd15"], "--model", "tiny", "--output", files["file"]],
              ["merge", "--lora", files["sd15"], "--model", "tiny", "--rank", "4", "--output", str(tmp_path / "m")],
              ["merge", "--lora", files["sd15"], "--output", "/proc/emotrain-x.safetensors"],
              ["merge", "--lora", files["sd15"], "--model", "tiny", "--output", "/proc/emotrain-x"]]
    cases += [["convert", files[k], out, "--to", "kohya"] for k in ("garbage", "empty", "nan", "nokeys", "dir")]
    cases += [["convert", files["sd15"], out, "--to", "kohya"],  # SD 1.5: refused by name
              ["convert", files["sd15"], files["file"], "--to", "kohya"], ["convert", files["sd15"], "", "--to", "kohya"],
              ["convert", files["sd15"], files["folder_lora"], "--to", "kohya", "--overwrite"],
              ["convert", files["sd15"], out, "--to", "nope"], ["convert", "", out, "--to", "kohya"],
              ["convert", files["sd15"], "/proc/emotrain-x.safetensors", "--to", "kohya"]]
    # adapter kinds: no exact combine of LoKr (without --rank) or DoRA, no diffusers LoKr, no Tucker
    cases += [["merge", "--lora", files["lokr"], "--lora", files["lokr"], "--output", out],
              ["merge", "--lora", files["dora"], "--lora", files["dora"], "--output", out, "--rank", "2"],
              ["convert", files["lokr"], out, "--to", "diffusers"], ["convert", files["tucker"], out, "--to", "kohya"]]
    monkeypatch.chdir(tmp_path)
    failures = []
    for args in cases:
        before = sorted(os.listdir(tmp_path))
        result = run_cli(*args, expect=None)
        try:
            assert_refused(result, tmp_path, before)
        except AssertionError as exc:
            failures.append(f"{args}: {exc}")
    assert not failures, "\n".join(failures)


def test_adapter_kinds_refuse_bad_input(tmp_path, monkeypatch, files):
    """A LoKr factor that does not split the model's layers (refused on the meta model,
    before the weights load), the kind's own options with another kind, a Tucker file."""
    cases = [["--adapter", "lokr", "--lokr-factor", "7"], ["--adapter", "lokr", "--lokr-factor", "0"],
             ["--adapter", "lora", "--lokr-factor", "4"], ["--adapter", "loha", "--lokr-full-matrix"],
             ["--network-weights", files["tucker"]]]
    run_cases(tmp_path, monkeypatch, cases)


def test_bad_files_in_the_data_folder(tmp_path, monkeypatch):
    cases = []
    for name, make in [("caption", lambda d: (d / "a.txt").write_bytes(b"caf\xe9 \xff")),
                       ("garbage", lambda d: (d / "b.png").write_bytes(b"not a png")),
                       ("empty", lambda d: (d / "b.png").write_bytes(b"")),
                       ("bomb", lambda d: Image.new("1", (20000, 20000)).save(d / "b.png"))]:
        d = tmp_path.parent / f"data-{name}"
        d.mkdir()
        Image.new("RGB", (64, 64), "red").save(d / "a.png")
        make(d)
        cases.append(["--data", str(d)])
    empty = tmp_path.parent / "data-none"
    empty.mkdir()
    cases.append(["--data", str(empty)])
    # issue 15: an animated image and a link to the folder itself are data warnings: refused with --strict-data
    def animated(d):
        Image.new("RGB", (64, 64)).save(d / "b.webp", save_all=True, append_images=[Image.new("RGB", (64, 64), "blue")])
        (d / "b.txt").write_text("black, then blue")

    for name, make in [("animated", animated),
                       ("looped", lambda d: (d / "5_again").symlink_to(d, target_is_directory=True))]:
        d = tmp_path.parent / f"data-{name}"
        d.mkdir()
        Image.new("RGB", (64, 64), "red").save(d / "a.png")
        (d / "a.txt").write_text("red")
        make(d)
        cases.append(["--data", str(d), "--strict-data"])
    run_cases(tmp_path, monkeypatch, cases)


def test_damaged_resume_inputs(tmp_path, monkeypatch, files):
    run = tmp_path.parent / "resume-run"
    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "checkpoint.json").write_text("{ garbage")
    cases = [["--resume", ""], ["--resume", files["file"]], ["--resume", files["dir"]], ["--resume", str(run)],
             ["--resume", str(ckpt)], ["--resume", str(run / "missing")], ["--resume", NOT_UTF8],
             ["--resume", str(run), "--preset", "emoairy"]]
    run_cases(tmp_path, monkeypatch, cases, base=[])


def test_sweep_and_report_refuse_bad_inputs(tmp_path, monkeypatch, files):
    for name, text in [("list", "[1, 2]"), ("cut", '{"status": "finished", "con'), ("bytes", "\udcff")]:
        (tmp_path.parent / f"run-{name}").mkdir()
        (tmp_path.parent / f"run-{name}" / "run.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    (tmp_path.parent / "run-metrics").mkdir()
    (tmp_path.parent / "run-metrics" / "metrics.jsonl").write_text('{"step": 0}\n')
    sweep = tmp_path.parent / "sweep-cut"
    sweep.mkdir()
    (sweep / "sweep.json").write_text('{"runs": [')
    out = str(tmp_path / "out")
    cases = [["--optim", "emosens", "--lr", v, "--output", out] for v in (",", " ", "1e-4,,nan", "1e-4,inf", "0")]
    cases += [["--optim", "emosens", "--shadow", "", "--output", out], ["--optim", ",", "--output", out],
              ["--optim", "emosens", "--output", str(sweep)], ["--optim", "emosens", "--output", files["file"]],
              ["--optim", "a.X,b.X", "--output", out]]
    run_cases(tmp_path, monkeypatch, cases, command="sweep")
    run_cases(tmp_path, monkeypatch, [[str(tmp_path.parent / f"run-{n}")] for n in ("list", "cut", "bytes")] + [
        [str(sweep)], [""], [files["dir"]], [files["file"]], [str(tmp_path.parent / "run-list"), "--out", out],
        [str(tmp_path.parent / "run-metrics"), "--out", files["dir"]]], command="report", base=[])


def test_real_bytes_that_are_not_utf8(tmp_path):
    # argv as bytes, the way a shell passes a Latin-1 file name
    for args in ([b"--data", b"caf\xe9"], [b"--output", b"caf\xe9"], [b"--model", b"caf\xe9"],
                 [b"--preset", b"caf\xe9.toml"]):
        cmd = [sys.executable.encode(), b"-m", b"emotrain", b"sdxl-lora", b"--model", b"tiny", b"--data", b"demo",
               *args]
        out = subprocess.run(cmd, capture_output=True, timeout=120, cwd=tmp_path)
        assert out.returncode == 2 and b"Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_issue_list_answers_in_one_line_before_any_model_loads(tmp_path, files):
    # Fresh processes, as a user meets them: a selection of the issue's tracebacks.
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "a.png")
    (data / "a.txt").write_bytes(b"\xff\xfe")
    for args in (["--data", str(data)], ["--optim", "adamw", "--optim-args", "betas=(2,0)"],
                 ["--optim-args", "a='x"], ["--model", "tiny:x"], ["--seed", str(2**64)], ["--output", files["file"]],
                 ["--network-weights", files["sd15"]]):
        out = subprocess.run([sys.executable, "-m", "emotrain", "sdxl-lora", *BASE, *args], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and out.stdout == "", out.stderr
    for args in (["vram", "--rank", "0"], ["convert", files["sd15"], files["folder_lora"], "--to", "kohya"]):
        out = subprocess.run([sys.executable, "-m", "emotrain", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


CONTRADICTIONS = [  # options that are each fine alone (issue 16)
    ["--zero-terminal-snr", "--no-v-parameterization"],
    ["--scale-v-pred-loss-like-noise-pred", "--no-v-parameterization"],
    ["--zero-terminal-snr"],  # the tiny model is epsilon: zero terminal SNR needs v-prediction
    ["--scale-v-pred-loss-like-noise-pred"],
    ["--model", "tiny-vpred", "--sample-prompt", "x --w 64 --h 64", "--sample-sampler", "heun"],
    ["--min-timestep", "500", "--max-timestep", "500"],
    ["--min-timestep", "900", "--max-timestep", "100"],
    ["--noise-offset-random-strength"],  # no --noise-offset to draw a strength of
    ["--text-encoder-lr", "1e-4"],  # the text encoders are not trained
    ["--optim", "prodigy", "--unet-lr", "1.0", "--loraplus-ratio", "16"],  # Prodigy takes one lr for all groups
    ["--optim", "prodigy", "--train-text-encoders", "--text-encoder-lr", "0.5"],
    ["--fp8-base"],  # float8 storage computes in bf16: needs --mixed-precision bf16
    ["--fp8-base", "--mixed-precision", "fp16"],
    ["--fp8-base", "--mixed-precision", "bf16", "--adapter", "dora"],  # DoRA reads the float8 base weight
    ["--ema-on-cpu"],  # no EMA to keep: --ema-decay is 0
    ["--ema-for-eval"],
    ["--ema-decay", "0.99", "--optim", "adamw-schedulefree"],  # it averages its weights already
    ["--adapter", "dora", "--network-dropout", "0.1"],  # dropout and max-norm: sd-scripts' LoRA's up/down only
    ["--adapter", "loha", "--rank-dropout", "0.1"],
    ["--adapter", "lokr", "--module-dropout", "0.1"],
    ["--adapter", "dora", "--scale-weight-norms", "1"],
    ["--compile", "--network-dropout", "0.1"],  # combinations not tried compiled
    ["--compile", "--fp8-base", "--mixed-precision", "bf16"],
    ["--compile", "--adapter", "loha"],
]


def test_contradictions_are_refused(tmp_path, monkeypatch):
    run_cases(tmp_path, monkeypatch, CONTRADICTIONS)
