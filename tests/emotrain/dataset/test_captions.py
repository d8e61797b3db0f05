"""Caption rules per draw (sd-scripts' order), caption files, and captions longer than
75 tokens (chunked as sd-scripts and A1111 do, or counted when cut)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data_helpers import write_images
from emotrain.dataset import Subset
from emotrain.dataset.captions import draw_caption, fixed_caption, read_caption
from emotrain.dataset.loader import Draws
from emotrain.errors import UserError
from emotrain.sdxl import encode_prompts, load_sdxl, token_ids
from helpers import run_cli, run_json, train

N = 4000


def _subset(**kw) -> Subset:
    return Subset(image_dir=Path("."), **kw)


def _draws(seed=0):
    return Draws(torch.Generator().manual_seed(seed))


def test_keep_tokens_stay_in_front_and_the_rest_is_shuffled_uniformly():
    s = _subset(shuffle_caption=True, keep_tokens=2)
    rng = _draws()
    outs = [draw_caption("a, b, c, d, e", s, rng) for _ in range(N)]
    assert all(o.startswith("a, b, ") and sorted(o.split(", ")) == list("abcde") for o in outs)
    firsts = Counter(o.split(", ")[2] for o in outs)
    assert set(firsts) == {"c", "d", "e"}
    assert all(abs(n - N / 3) < 4 * (N * (1 / 3) * (2 / 3)) ** 0.5 for n in firsts.values())


def test_keep_tokens_separator_keeps_a_head_and_a_tail():
    s = _subset(shuffle_caption=True, keep_tokens=4, keep_tokens_separator="|||")
    rng = _draws()
    for _ in range(50):
        tags = draw_caption("sks, style ||| c, d, e ||| last tag", s, rng).split(", ")
        assert tags[:2] == ["sks", "style"] and tags[-1] == "last tag" and sorted(tags[2:5]) == ["c", "d", "e"]


def test_dropout_rates_and_the_order_of_the_rules():
    rng = _draws(1)
    s = _subset(caption_dropout_rate=0.3, caption_prefix="tok", caption_suffix="end")
    empty = sum(draw_caption("x, y", s, rng) == "" for _ in range(N))
    assert abs(empty - 0.3 * N) < 4 * (N * 0.3 * 0.7) ** 0.5  # the prefix goes with the whole caption
    assert fixed_caption("x, y", s) == "tok x, y end"
    s = _subset(caption_tag_dropout_rate=0.25, keep_tokens=1)
    outs = [draw_caption("k, t1, t2, t3, t4", s, rng).split(", ") for _ in range(N)]
    assert all(o[0] == "k" for o in outs)  # kept tags are never dropped
    dropped = sum(4 - (len(o) - 1) for o in outs)
    assert abs(dropped - 0.25 * 4 * N) < 4 * (4 * N * 0.25 * 0.75) ** 0.5
    assert all(o[1:] == sorted(o[1:]) for o in outs)  # dropout alone keeps the order


def test_caption_files(tmp_path):
    image = tmp_path / "a.png"
    (tmp_path / "a.txt").write_bytes("\ufefffirst line, tags\nsecond line\n".encode("utf-8"))
    assert read_caption(image, ".txt") == ("first line, tags", ["multi_line"])
    assert read_caption(image, ".caption") == (None, [])
    (tmp_path / "a.caption").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    with pytest.raises(UserError, match=r"a\.caption is not UTF-8"):
        read_caption(image, ".caption")


@pytest.fixture(scope="module")
def tiny():
    return load_sdxl("tiny")


def test_chunks_are_bos_75_tokens_eos(tiny):
    # the tiny tokenizers give one token per character
    for tok in (tiny.tokenizer, tiny.tokenizer_2):
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        a, a_end = tok("aa", add_special_tokens=False).input_ids  # "a" and the word-final "a</w>"
        ids = token_ids(tok, ["a" * 100, "ab"], 150)
        assert ids.shape == (2, 2, 77)
        assert ids[0, 0].tolist() == [bos] + [a] * 75 + [eos]  # cut inside the text: closed with <EOS>
        assert ids[0, 1].tolist() == [bos] + [a] * 24 + [a_end, eos] + [pad] * 50
        assert ids[1, 1].tolist() == [bos, eos] + [pad] * 75  # an empty chunk still reads <BOS><EOS>
        assert torch.equal(ids[1, 0], token_ids(tok, ["ab"], 75)[0, 0])


def test_long_captions_are_encoded_in_chunks(tiny):
    short = "a red circle, blue"
    e75, p75 = encode_prompts(tiny, [short], "cpu", 75)
    e150, p150 = encode_prompts(tiny, [short], "cpu", 150)
    assert e75.shape[1] == 77 and e150.shape[1] == 152
    # a caption that fits the first chunk means the same at both lengths (but the last slot)
    assert torch.allclose(e150[:, :76], e75[:, :76], atol=1e-6) and torch.allclose(p150, p75, atol=1e-6)
    long_a, long_b = "x" * 90 + "a", "x" * 90 + "b"  # differ at token 91
    assert torch.equal(*[encode_prompts(tiny, [c], "cpu", 75)[0] for c in (long_a, long_b)])  # cut at 75
    assert not torch.allclose(*[encode_prompts(tiny, [c], "cpu", 150)[0] for c in (long_a, long_b)])


def test_truncated_captions_are_counted_and_long_ones_train(tmp_path):
    data = write_images(tmp_path / "d", {"a.png": "z" * 100, "b.png": "short", "c.png": "y" * 80})
    out = tmp_path / "o"
    train(out, "--data", data, "--steps", "1")
    problem = run_json(out)["data"]["problems"]["truncated_captions"]
    assert problem["count"] == 2 and "--max-token-length" in problem["message"]
    train(tmp_path / "o150", "--data", data, "--steps", "2", "--max-token-length", "150", "--shuffle-captions")
    assert "truncated_captions" not in run_json(tmp_path / "o150")["data"]["problems"]
    result = run_cli("sdxl-lora", "--model", "tiny", "--data", data, "--resolution", "64", "--strict-data",
                     "--output", tmp_path / "strict", expect=2)
    assert "longer than --max-token-length" in result.output and "--strict-data" in result.output
    run_cli("sdxl-lora", "--model", "tiny", "--data", data, "--max-token-length", "100", expect=2)
