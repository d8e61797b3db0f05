"""The model's schedule: v-prediction and zero terminal SNR, from a diffusers folder's
scheduler config, a single file's marker keys (as ComfyUI reads them) or the flags."""

import pytest
import torch
from safetensors.torch import save_file

from emotrain.errors import UserError
from emotrain.sdxl import model_schedule, tiny_sdxl_path


def test_a_folder_says_its_schedule_and_the_flags_win_with_a_note():
    eps, vpred = str(tiny_sdxl_path()), str(tiny_sdxl_path(vpred=True))
    assert model_schedule(eps) == model_schedule(eps, None, None)
    assert (model_schedule(eps).prediction_type, model_schedule(eps).zero_terminal_snr) == ("epsilon", False)
    s = model_schedule(vpred)
    assert (s.prediction_type, s.zero_terminal_snr, s.notes) == ("v_prediction", True, ())
    s = model_schedule(eps, True, True)
    assert (s.prediction_type, s.zero_terminal_snr) == ("v_prediction", True)
    assert len(s.notes) == 2 and all(n.startswith("note: --") and "overrides the model" for n in s.notes)
    s = model_schedule(vpred, True, False)
    assert s.zero_terminal_snr is False and s.notes == ("note: --no-zero-terminal-snr overrides the model, which "
                                                        "says on",)
    with pytest.raises(UserError, match="needs a v-prediction model"):
        model_schedule(vpred, False, None)


@pytest.mark.parametrize("keys,expected", [((), ("epsilon", False)), (("v_pred",), ("v_prediction", False)),
                                           (("v_pred", "ztsnr"), ("v_prediction", True))])
def test_single_file_marker_keys(tmp_path, keys, expected):
    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), **{k: torch.tensor([]) for k in keys}}, path)
    s = model_schedule(str(path))
    assert (s.prediction_type, s.zero_terminal_snr) == expected
    assert bool(s.notes) == bool(keys) and all("as ComfyUI reads it" in n for n in s.notes)
    if keys:  # the flag wins over the file
        s = model_schedule(str(path), False, False)
        assert s.prediction_type == "epsilon" and any(n.startswith("note: --no-v-parameterization") for n in s.notes)
