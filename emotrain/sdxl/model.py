"""Loading an SDXL model from wherever the user keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from ..sources import check_model, is_hub_id, tiny_seed, tiny_vpred


@dataclass
class SDXL:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    tokenizer: object
    tokenizer_2: object
    noise_scheduler: object  # a DDPMScheduler with the model's training schedule
    source: str  # the local folder or file the weights came from

    @property
    def text_encoders(self):
        return (self.text_encoder, self.text_encoder_2)


def resolve_model(model: str) -> str:
    """``tiny[:SEED]``, a diffusers folder, a single checkpoint file, or a hub repo id
    (through huggingface_hub's cache) -> a local path."""
    seed = tiny_seed(model)
    if seed is not None:
        from .tiny import tiny_sdxl_path
        return str(tiny_sdxl_path(seed, tiny_vpred(model)))
    check_model(model)
    if is_hub_id(model):
        from huggingface_hub import snapshot_download
        try:
            return snapshot_download(model, allow_patterns=["*.json", "*.txt", "*.safetensors"],
                                     ignore_patterns=["*.fp16.safetensors", "*refiner*", "*.onnx*"])
        except Exception as exc:  # network, auth or a missing repo: one line, not a traceback
            raise UserError(f"could not fetch model {model!r} from the hub ({type(exc).__name__}): "
                            "check the repo id and your connection, or pass a local folder") from None
    return str(Path(model).expanduser())


def load_pipeline(model: str, weight_dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32):
    """The diffusers SDXL pipeline for anything --model accepts -> (pipeline, local source)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their per-component bars would interleave with ours; our own bar covers the load.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    source = resolve_model(model)
    try:
        if Path(source).is_file():
            pipe = StableDiffusionXLPipeline.from_single_file(source, dtype=weight_dtype)
        else:
            dtypes = {"default": weight_dtype, "vae": vae_dtype}
            pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=dtypes, use_safetensors=True)
    except Exception as exc:
        raise UserError(f"could not load SDXL model from {source}: {exc}".splitlines()[0]) from None
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(vae_dtype)
    return pipe, source


@dataclass(frozen=True)
class Schedule:
    """What the model predicts and whether its noise schedule reaches zero terminal SNR,
    with the notes that say where that came from."""
    prediction_type: str  # "epsilon" or "v_prediction"
    zero_terminal_snr: bool
    notes: tuple[str, ...] = ()

    @property
    def v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"


def file_markers(path: str) -> set[str]:
    """The marker keys a single-file checkpoint may carry (``v_pred``, ``ztsnr``: empty
    tensors some v-prediction files hold, which ComfyUI reads), from the header only."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            return {k for k in f.keys() if k in ("v_pred", "ztsnr")}
    except Exception as exc:
        raise UserError(f"cannot read {path} ({exc}): pass an intact .safetensors checkpoint".splitlines()[0]) from None


def model_schedule(source: str, v_parameterization: bool | None = None,
                   zero_terminal_snr: bool | None = None) -> Schedule:
    """The schedule of a resolved model (a local folder or file), read without its
    weights: a diffusers folder's scheduler config, a single file's marker keys. The
    flags (None: not given) win over the model, with a note where they disagree."""
    import json

    notes = []
    path = Path(source)
    if path.is_file():
        markers = file_markers(source)
        v_model, z_model = "v_pred" in markers, "ztsnr" in markers
        if markers:
            notes.append(f"{path.name} marks itself {' and '.join(sorted(markers))} (as ComfyUI reads it): "
                         + ", ".join((["v-prediction"] if v_model else []) + (["zero terminal SNR"] if z_model else [])))
    else:
        config_file = path / "scheduler" / "scheduler_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        v_model = config.get("prediction_type", "epsilon") == "v_prediction"
        z_model = bool(config.get("rescale_betas_zero_snr", False))
    v = v_model if v_parameterization is None else v_parameterization
    z = z_model if zero_terminal_snr is None else zero_terminal_snr
    for flag, given, model_says in (("v-parameterization", v_parameterization, v_model),
                                    ("zero-terminal-snr", zero_terminal_snr, z_model)):
        if given is not None and given != model_says:
            notes.append(f"note: --{'' if given else 'no-'}{flag} overrides the model, which says "
                         f"{'on' if model_says else 'off'}")
    if z and not v:
        raise UserError("zero_terminal_snr: a zero-terminal-SNR schedule needs a v-prediction model (at the last "
                        "timestep epsilon says nothing about the image): add --v-parameterization or drop "
                        "--zero-terminal-snr")
    return Schedule("v_prediction" if v else "epsilon", z, tuple(notes))


def load_sdxl(model: str, weight_dtype: torch.dtype = torch.float32, vae_dtype: torch.dtype = torch.float32,
              schedule: Schedule | None = None) -> SDXL:
    """The parts training needs, frozen, with a DDPM scheduler of the model's schedule
    (``schedule``: a prediction type and zero terminal SNR other than the model's own)."""
    from diffusers import DDPMScheduler

    pipe, source = load_pipeline(model, weight_dtype, vae_dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
        m.eval()
    schedule = schedule or model_schedule(source)
    # rescale_betas_zero_snr: diffusers' rescale_zero_terminal_snr on the betas (the last alpha-bar is 0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=schedule.prediction_type,
                                                rescale_betas_zero_snr=schedule.zero_terminal_snr)
    return SDXL(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                noise_scheduler, source)
