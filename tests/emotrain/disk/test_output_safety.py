"""merge and convert never destroy what is in the way: a folder where a file goes (or
the reverse) is refused, an existing file is replaced only with --overwrite."""

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from emotrain.disk.atomic import atomic_path
from emotrain.errors import UserError
from helpers import run_cli, train


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs") / "run"
    train(out, "--steps", "1")
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_merge_into_a_run_folder_is_refused_and_harmless(run_folder):
    before = snapshot(run_folder)
    out = subprocess.run([sys.executable, "-m", "emotrain", "merge", "--lora", str(run_folder / "lora.safetensors"),
                          "--output", str(run_folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "lora.safetensors already exists: pass --overwrite" in out.stderr and len(out.stderr.splitlines()) == 1
    assert snapshot(run_folder) == before


def test_a_folder_is_never_replaced_by_a_file(run_folder, tmp_path):
    lora = run_folder / "lora.safetensors"
    folder = tmp_path / "named.safetensors"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "keep.txt").write_text("mine")
    for args in (["convert", lora, folder, "--to", "diffusers", "--overwrite"],
                 ["merge", "--lora", lora, "--output", folder, "--overwrite"]):
        result = run_cli(*args, expect=2)
        assert "is a folder, not a file" in result.output
    assert (folder / "sub" / "keep.txt").read_text() == "mine"
    afile = tmp_path / "model-out"
    afile.write_text("mine")
    result = run_cli("merge", "--model", "tiny", "--lora", lora, "--output", afile, expect=2)
    assert "is a file, not a folder" in result.output and afile.read_text() == "mine"


def test_overwrite_replaces_a_file(run_folder, tmp_path):
    lora = run_folder / "lora.safetensors"
    target = tmp_path / "out.safetensors"
    run_cli("convert", lora, target, "--to", "diffusers")
    result = run_cli("convert", lora, target, "--to", "kohya", expect=2)
    assert "pass --overwrite" in result.output
    assert any(k.endswith("lora_A.weight") for k in load_file(target))  # still the first one
    run_cli("convert", lora, target, "--to", "kohya", "--overwrite")
    assert any(k.endswith("lora_down.weight") for k in load_file(target))
    run_cli("merge", "--lora", f"{lora}:0.5", "--output", target, "--overwrite")


@pytest.mark.parametrize("weight,message", [("nan", "finite number"), ("inf", "finite number"),
                                            ("-inf", "finite number"), ("abc", "bad weight 'abc'")])
def test_merge_weights_must_be_finite_numbers(run_folder, tmp_path, weight, message):
    result = run_cli("merge", "--lora", f"{run_folder / 'lora.safetensors'}:{weight}",
                     "--output", tmp_path / "x.safetensors", expect=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_the_atomic_writer_never_removes_a_folder_it_did_not_make(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "data.txt").write_text("mine")
    with pytest.raises(UserError, match="is a folder"):
        with atomic_path(folder) as tmp:
            tmp.write_text("file")
    with pytest.raises(UserError, match="not empty"):
        with atomic_path(folder, directory=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (folder / "data.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["work"]
