"""Every training option, declared once.

An ``Option`` holds what all the places that deal with options need: its name and type,
its default, the help line, the command-line spelling, the help-panel group, the checks
on its value, and whether a resumed run may change it. ``TrainConfig`` (config.py), the
``sdxl-lora`` and ``vram`` commands (cli.py), preset reading, the resume rule, run.json
and the options table in docs/options.md are all built from ``OPTIONS``: adding an
option means adding one entry here (and using it where it acts).

Pure Python on purpose: the command line checks every value before torch is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .optimizers import NAMES as OPTIMIZER_NAMES
from .precision import PRECISIONS
from .samplers import NAMES as SAMPLERS
from .sources import model_name

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# LoRA placements on the UNet. "transformer": sd-scripts' default LoRA (networks.lora
# without conv_dim): the linear layers of the transformer blocks only. "full": sd-scripts
# with conv_dim (LoCon): also the ResNets (3x3 convs, time-embedding projection, 1x1
# shortcut) and the down/up-sampler convs.
TARGETS = ("full", "transformer")
# Adapter kinds (emotrain.lora.kinds.KINDS, named here without importing torch).
ADAPTERS = ("lora", "dora", "loha", "lokr")

# Upper bounds: far beyond any real run, low enough that no count overflows torch's int64
# or asks for absurd memory before a message can say so.
MAX_RANK = 4096
MAX_COUNT = 10**9

# Help panels, in the order --help shows them.
GROUPS = ("Model", "Data", "Captions", "Augmentation", "Cache", "LoRA", "Optimizer", "Schedule", "Loss",
          "Precision and memory", "Checkpoints", "Validation", "Samples", "Logging", "Outputs")
TRACKERS = ("tensorboard", "wandb", "none")
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")  # loss.py
HUBER_SCHEDULES = ("constant", "exponential", "snr")
EVERY_DEFAULT = "save_every, else 10% of the steps"  # watch/schedule.py


@dataclass(frozen=True)
class Option:
    name: str
    type: type  # bool, int, float, str or list (of strings)
    default: Any
    help: str
    group: str
    flag: str | None = None  # the command-line spelling when it is not --name-with-dashes
    nullable: bool = False  # None is a value of its own ("derived from another option")
    default_text: str | None = None  # what --help and the docs show as the default
    choices: tuple[str, ...] | None = None
    choice_word: str = ""  # "optimizer": an unknown value reads "unknown optimizer 'x'"
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    below: float | None = None  # exclusive upper bound
    positive: bool = False  # > 0
    multiple_of: int | None = None
    resumable: bool = False  # a resumed run may change it (anything else would break exactness)
    memory: bool = False  # changes what `emotrain vram` plans
    split: bool = False  # list items are also split shell-style ("a=1 b=2")
    items: int | None = None  # a list of numbers, at most this many (checked like a float option)
    hint: str = ""  # appended to a rejected value's message: how to fix it

    @property
    def flags(self) -> str:
        dashed = "--" + self.name.replace("_", "-")
        if self.flag:
            return self.flag
        return f"{dashed}/--no-{dashed[2:]}" if self.type is bool else dashed

    @property
    def cli_name(self) -> str:
        return self.flags.split("/")[0]

    def shown_default(self) -> str:
        if self.default_text is not None:
            return self.default_text
        if self.type is bool:
            return "on" if self.default else "off"
        if self.default is None or self.default == []:
            return "-"
        return str(self.default)

    def problem(self, value) -> str | None:
        """What is wrong with a well-typed value, or None."""
        if self.items and value:
            if len(value) > self.items:
                return f"takes at most {self.items} values, got {len(value)}: {' '.join(value)}"
            for item in value:
                try:
                    number = float(item)
                except ValueError:
                    return f"must be a number, got {item!r}"
                problem = Option(self.name, float, None, "", self.group, positive=self.positive,
                                 maximum=self.maximum).problem(number)
                if problem:
                    return problem
            return None
        if value is None or self.type in (bool, list):
            return None
        if self.choices and value not in self.choices and not (self.name == "optim" and "." in value):
            if self.choice_word:
                extra = " or package.module.Class" if self.name == "optim" else ""
                return f"unknown {self.choice_word} {value!r}: use one of {', '.join(self.choices)}{extra}"
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.type in (int, float):
            if not math.isfinite(value):
                return f"must be a finite number, got {value}"
            if self.positive and not value > 0:
                return f"must be positive, got {value}"
            if self.multiple_of and value % self.multiple_of:
                return f"must be a multiple of {self.multiple_of}, got {value}"
            if self.minimum is not None and value < self.minimum:
                return f"must be at least {_num(self.minimum)}, got {value}"
            if self.maximum is not None and value > self.maximum:
                return f"must be at most {_num(self.maximum)}, got {value}"
            if self.below is not None and value >= self.below:
                return f"must be below {_num(self.below)}, got {value}"
        return None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _o(*args, **kwargs) -> Option:
    return Option(*args, **kwargs)


OPTIONS: tuple[Option, ...] = (
    # -- model ---------------------------------------------------------------------------
    _o("model", str, None, "Diffusers SDXL folder, hub repo id, single-file .safetensors, or 'tiny' (built in).",
       "Model", memory=True),
    _o("network_weights", str, None, "Start from an existing LoRA file (kohya or diffusers); its ranks win.",
       "Model", memory=True),
    _o("base_lora", list, [], "FILE[:WEIGHT] merged into the frozen base before training (repeatable).", "Model"),
    _o("v_parameterization", bool, None, "Train the model as v-prediction (--no-v-parameterization: as epsilon). "
       "Needed for a v-pred single file without marker keys; a diffusers folder's scheduler config and a single "
       "file's v_pred key already say so.", "Model", nullable=True, default_text="from the model"),
    _o("zero_terminal_snr", bool, None, "Rescale the noise schedule to zero terminal SNR (diffusers' "
       "rescale_zero_terminal_snr), for training and samples; needs v-prediction.", "Model", nullable=True,
       default_text="from the model"),
    # -- data ----------------------------------------------------------------------------
    _o("data", str, None, "Folder of images with captions (N_name sub-folders repeat N times; 'name' is the "
       "caption of images without one), or 'demo'.", "Data"),
    _o("resolution", int, 1024, "Training resolution: buckets hold at most resolution^2 pixels.", "Data",
       minimum=64, maximum=8192, multiple_of=32, memory=True, hint="(the VAE and UNet scales)"),
    _o("bucket", bool, True, "Aspect-ratio buckets; --no-bucket centre-crops every image to a square.", "Data"),
    _o("dataset_config", str, None, "sd-scripts dataset TOML ([general], [[datasets]], [[datasets.subsets]]) "
       "instead of --data; the flags below fill what it leaves out.", "Data", memory=True),
    _o("reg_data", str, None, "Folder of regularization images (prior preservation), laid out like --data.", "Data"),
    _o("alpha_mask", bool, False, "Weight the loss by each image's alpha channel (or a same-named NAME_mask.png); "
       "off: transparency is composited on white.", "Data"),
    _o("max_upscale", float, 2.0, "Leave out images that must be enlarged more than this to fill their bucket.",
       "Data", minimum=1, hint="(a larger value keeps small images, blurred)"),
    _o("strict_data", bool, False, "Stop on any data warning (missing captions, small images, ...) instead of "
       "reporting it.", "Data", resumable=True),
    _o("record_draws", bool, False, "Write every drawn image with its caption text and flip to draws.jsonl in "
       "the output folder.", "Data", resumable=True),
    # -- captions ------------------------------------------------------------------------
    _o("caption_extension", str, ".txt", "Caption file extension (.txt, .caption, ...).", "Captions",
       hint="(a file suffix such as .txt)"),
    _o("caption_prefix", str, None, "Text put before every caption (a trigger word).", "Captions"),
    _o("caption_suffix", str, None, "Text put after every caption.", "Captions"),
    _o("shuffle_captions", bool, False, "Shuffle the comma-separated tags each time an image is drawn.", "Captions",
       memory=True),
    _o("keep_tokens", int, 0, "With shuffling or tag dropout: the first N tags stay in front.", "Captions",
       minimum=0, maximum=MAX_COUNT),
    _o("keep_tokens_separator", str, None, "Tags before this separator stay in front (instead of --keep-tokens).",
       "Captions"),
    _o("caption_dropout", float, 0.0, "Probability that a drawn image's whole caption is empty.", "Captions",
       minimum=0, maximum=1, memory=True),
    _o("tag_dropout", float, 0.0, "Probability that each (not kept) tag is dropped when an image is drawn.",
       "Captions", minimum=0, maximum=1, memory=True),
    _o("max_token_length", int, 75, "Caption tokens seen: 75, or 150/225 (chunks of 75 encoded separately and "
       "joined, as sd-scripts does).", "Captions", minimum=75, maximum=225, multiple_of=75, memory=True),
    # -- augmentation --------------------------------------------------------------------
    _o("flip", bool, False, "Flip images horizontally at random (both orientations are cached).", "Augmentation"),
    _o("random_crop", bool, False, "Crop at a random place each draw instead of the centre (no latent cache: the "
       "VAE encodes every step).", "Augmentation", memory=True),
    # -- cache ---------------------------------------------------------------------------
    _o("cache_dir", str, None, "Folder of the latent and text-embedding cache.", "Cache",
       default_text="$EMOTRAIN_CACHE/data or ~/.cache/emotrain/data", resumable=True),
    _o("disk_cache", bool, True, "Keep encoded latents and text embeddings on disk and reuse them on the next "
       "start; --no-disk-cache keeps them in memory only.", "Cache", resumable=True),
    # -- LoRA ----------------------------------------------------------------------------
    _o("targets", str, "full", "UNet layers with a LoRA: 'full' (attention, feed-forward, ResNets, samplers) "
       "or 'transformer' (sd-scripts' default set: the transformer blocks only).", "LoRA",
       choices=TARGETS, memory=True),
    _o("rank", int, 16, "LoRA rank of linear layers and 1x1 convs.", "LoRA", minimum=1, maximum=MAX_RANK, memory=True),
    _o("alpha", float, None, "LoRA alpha; the scale is alpha/rank.", "LoRA", nullable=True,
       default_text="the rank", positive=True),
    _o("conv_rank", int, None, "Rank of 3x3 convolutions; 0 leaves them out (full targets only).", "LoRA",
       nullable=True, default_text="the rank", minimum=0, maximum=MAX_RANK, memory=True),
    _o("conv_alpha", float, None, "Alpha of 3x3 convolutions.", "LoRA", nullable=True,
       default_text="the alpha", positive=True),
    _o("train_text_encoders", bool, False, "Give both text encoders a LoRA too.", "LoRA", memory=True),
    _o("adapter", str, "lora", "Adapter kind: 'lora' (LoCon on 3x3 convs), 'dora' (LoRA with a trained magnitude "
       "per output channel), 'loha' (LyCORIS' Hadamard product), 'lokr' (LyCORIS' Kronecker product).", "LoRA",
       choices=ADAPTERS, choice_word="adapter", memory=True),
    _o("lokr_factor", int, -1, "LoKr: LyCORIS' factor splitting each dimension (-1: the pair nearest its square "
       "root); it must divide every adapted layer's channels.", "LoRA", minimum=-1, maximum=MAX_RANK, memory=True,
       hint="(-1, or a positive factor such as 4, 8 or 16)"),
    _o("network_dropout", float, 0.0, "Dropout on each LoRA's down-projection output (its rank neurons), kept ones "
       "scaled by 1/(1-p), training steps only (sd-scripts' --network_dropout); --adapter lora only.", "LoRA",
       minimum=0, maximum=0.99),
    _o("rank_dropout", float, 0.0, "Per sample, each rank of each LoRA dropped with this probability and the "
       "LoRA's scale times 1/(1-p) (sd-scripts' rank_dropout); --adapter lora only.", "LoRA", minimum=0,
       maximum=0.99),
    _o("module_dropout", float, 0.0, "Each LoRA module left out of a training micro-batch with this probability "
       "(sd-scripts' module_dropout); --adapter lora only.", "LoRA", minimum=0, maximum=0.99),
    _o("scale_weight_norms", float, None, "Max-norm: after each step, each LoRA module whose delta (up @ down x "
       "alpha/rank) has a Frobenius norm above this is scaled down to it (sd-scripts'; 1 is usual); the count "
       "and the norms go to the logs; --adapter lora only.", "LoRA", nullable=True, positive=True),
    _o("lokr_full_matrix", bool, False, "LoKr: both Kronecker factors full matrices (LyCORIS' full_matrix; the "
       "rank then only names the file).", "LoRA", memory=True),
    # -- optimizer -----------------------------------------------------------------------
    _o("optim", str, "emoairy", "emosens, emoairy, emocats, adamw, adamw8bit, adafactor, lion, prodigy (lr 1.0 by "
       "default), adamw-schedulefree, or package.module.Class.",
       "Optimizer", choices=OPTIMIZER_NAMES, choice_word="optimizer", memory=True),
    _o("shadow", bool, False, "The Emo shadow-system (one parameter-sized buffer).", "Optimizer", memory=True),
    _o("optim_args", list, [], "Optimizer keyword arguments key=value (repeatable, or several in one quoted string).",
       "Optimizer", split=True, memory=True),
    _o("lr", float, 3e-4, "Learning rate.", "Optimizer", positive=True, maximum=10,
       hint="(the Emo family works well at 2e-4 to 4e-4)"),
    _o("unet_lr", float, None, "Learning rate of the UNet's LoRA.", "Optimizer", nullable=True,
       default_text="--lr", positive=True, maximum=10),
    _o("text_encoder_lr", list, [], "Learning rate of the text encoders' LoRA: one value for both, or two (TE1 "
       "then TE2: --text-encoder-lr 1e-4 2e-4); needs --train-text-encoders.", "Optimizer",
       default_text="--lr", split=True, items=2, positive=True, maximum=10),
    _o("loraplus_ratio", float, None, "LoRA+: the up (B) matrices learn at lr x this ratio (sd-scripts' "
       "loraplus_lr_ratio; 16 is usual).", "Optimizer", nullable=True, positive=True, maximum=1000),
    _o("max_grad_norm", float, 1.0, "Gradient clipping norm; 0 turns clipping off.", "Optimizer", nullable=True,
       minimum=0),
    _o("ema_decay", float, 0.0, "Keep an exponential moving average of the LoRA weights in fp32: after every "
       "optimizer step ema = decay x ema + (1 - decay) x weights, from the starting weights, no warm-up; saved "
       "as lora-ema.safetensors (and its diffusers twin) beside the LoRA (0: off; 0.999 is usual).", "Optimizer",
       minimum=0, below=1, memory=True, hint="(0 turns it off; 0.99 to 0.9999 is usual)"),
    _o("ema_on_cpu", bool, False, "Keep the EMA in CPU memory instead of on the training device (a copy of the "
       "weights to the CPU every step; needs --ema-decay).", "Optimizer", memory=True),
    _o("ema_for_eval", bool, False, "Samples during training use the EMA weights (validation reports the raw and "
       "the EMA loss whenever --ema-decay is on); needs --ema-decay.", "Optimizer", resumable=True),
    # -- schedule ------------------------------------------------------------------------
    _o("steps", int, 1000, "Optimizer steps in all.", "Schedule", minimum=1, maximum=MAX_COUNT, resumable=True),
    _o("batch_size", int, 1, "Images per micro-batch.", "Schedule", minimum=1, maximum=4096, memory=True),
    _o("grad_accum", int, 1, "Micro-batches per optimizer step.", "Schedule", minimum=1, maximum=MAX_COUNT),
    _o("lr_scheduler", str, "constant", "LR schedule.", "Schedule", choices=LR_SCHEDULERS, choice_word="scheduler"),
    _o("warmup_steps", int, 0, "Warm-up steps of the LR schedule (adamw-schedulefree: its own warm-up).", "Schedule",
       minimum=0, maximum=MAX_COUNT),
    _o("seed", int, 42, "Seed of the LoRA init, data order and noise.", "Schedule", minimum=0,
       maximum=2**32 - 1),
    # -- loss ----------------------------------------------------------------------------
    _o("min_snr_gamma", float, None, "Min-SNR-gamma loss weighting (5 is usual).", "Loss", nullable=True,
       positive=True),
    _o("noise_offset", float, 0.0, "Noise offset: a per-channel constant of this strength added to the noise.", "Loss",
       minimum=0, maximum=1),
    _o("prior_loss_weight", float, 1.0, "Loss weight of regularization images.", "Loss", minimum=0),
    _o("loss_type", str, "l2", "Per-element loss (sd-scripts'): l2 (squared error), l1, huber 2c(sqrt(d^2+c^2)-c), "
       "smooth_l1 2(sqrt(d^2+c^2)-c).", "Loss", choices=LOSS_TYPES),
    _o("huber_c", float, 0.1, "c of the huber and smooth_l1 losses (at its schedule's end).", "Loss", positive=True,
       maximum=1),
    _o("huber_schedule", str, "snr", "How c follows the timestep t of T: constant c, exponential c^(t/T), snr "
       "(1-c)/(1+sigma_t)^2+c with sigma_t = sqrt((1-ab_t)/ab_t) (sd-scripts').", "Loss", choices=HUBER_SCHEDULES),
    _o("debiased_estimation", bool, False, "Weight each sample's loss by 1/sqrt(SNR) (v-prediction: 1/(SNR+1)), the "
       "SNR capped at 1000, as sd-scripts' debiased estimation loss.", "Loss"),
    _o("min_timestep", int, 0, "Train on timesteps from this one (inclusive); validation spreads over the same "
       "range.", "Loss", minimum=0, maximum=999),
    _o("max_timestep", int, None, "Train on timesteps below this one (exclusive).", "Loss", nullable=True,
       default_text="1000 (the schedule's end)", minimum=1, maximum=1000),
    _o("ip_noise_gamma", float, 0.0, "Input perturbation: noise of this strength added to the UNet's input only, "
       "not to the target (0.1 is usual).", "Loss", minimum=0, maximum=1),
    _o("multires_noise_iterations", int, 0, "Multi-resolution (pyramid) noise levels, sd-scripts' (6-10 is usual; "
       "0: off).", "Loss", minimum=0, maximum=64),
    _o("multires_noise_discount", float, 0.3, "Weight of each coarser level of multi-resolution noise is this to "
       "its level.", "Loss", minimum=0, maximum=1),
    _o("noise_offset_random_strength", bool, False, "Draw the noise offset's strength in [0, --noise-offset) each "
       "step.", "Loss"),
    _o("scale_v_pred_loss_like_noise_pred", bool, False, "v-prediction: weight each sample's loss by "
       "SNR/(SNR+1) (SNR at most 1000), as sd-scripts does, so it scales like an epsilon loss.", "Loss"),
    # -- precision and memory ------------------------------------------------------------
    _o("mixed_precision", str, "no", "Frozen weights and compute in no (fp32), fp16 or bf16; the LoRA stays fp32.",
       "Precision and memory", choices=PRECISIONS, memory=True),
    _o("gradient_checkpointing", bool, False, "Recompute activations in the backward pass: less memory, slower.",
       "Precision and memory", memory=True),
    _o("fp8_base", bool, False, "Store the frozen UNet's weights in float8 (e4m3) and compute each layer in bf16 "
       "(one layer at a time, in the forward and again in the backward): about half the UNet's memory; the LoRA stays fp32. Needs --mixed-precision "
       "bf16.", "Precision and memory", memory=True),
    _o("memory_check", bool, True, "On CUDA, compare the planned peak (`emotrain vram`) with the device's free "
       "memory before loading the model, and stop when it will not fit.", "Precision and memory", resumable=True),
    _o("compile", bool, False, "torch.compile the UNet's repeated blocks (regional: the first step compiles for "
       "seconds to minutes, later steps run the compiled kernels); the loss agrees with eager's to float rounding.",
       "Precision and memory"),
    # -- checkpoints ---------------------------------------------------------------------
    _o("save_every", int, 0, "Write a checkpoint every N optimizer steps (0: only at the end).", "Checkpoints",
       minimum=0, maximum=MAX_COUNT, resumable=True),
    _o("keep_checkpoints", int, 3, "Keep the newest K checkpoints.", "Checkpoints", minimum=1, maximum=MAX_COUNT,
       resumable=True),
    # -- validation ----------------------------------------------------------------------
    _o("val_data", str, None, "Folder of validation images with .txt captions (same conventions as --data), or "
       "'demo'; never trained on.", "Validation"),
    _o("val_split", float, 0.0, "Hold out this fraction of the training images for validation (chosen from "
       "their file names, never trained on).", "Validation", minimum=0, maximum=0.9),
    _o("val_every", int, None, "Validation loss every N steps, and at step 0 and the end (0: only those).",
       "Validation", nullable=True, default_text=EVERY_DEFAULT, minimum=0, maximum=MAX_COUNT, resumable=True),
    _o("val_timesteps", int, 4, "Timesteps per validation image, spread over the schedule (fixed with their "
       "noise from --seed).", "Validation", minimum=1, maximum=100),
    # -- samples -------------------------------------------------------------------------
    _o("sample_prompts", str, None, "Prompt file: one prompt a line, kohya's options --n --w --h --d --s --l --ss.",
       "Samples", resumable=True),
    _o("sample_prompt", list, [], "A sample prompt, same options as a prompt-file line (repeatable).", "Samples",
       resumable=True),
    _o("sample_every", int, None, "Sample images every N steps, and at step 0 and the end (0: only those).",
       "Samples", nullable=True, default_text=EVERY_DEFAULT, minimum=0, maximum=MAX_COUNT, resumable=True),
    _o("sample_sampler", str, "euler", "Sampler of the samples (kohya's names; --ss per prompt).", "Samples",
       choices=SAMPLERS, choice_word="sampler", resumable=True),
    _o("sample_steps", int, 25, "Denoising steps per sample (--s per prompt).", "Samples", minimum=1, maximum=1000,
       resumable=True),
    _o("sample_keep_models", bool, False, "Keep the VAE and text encoders on the GPU between samples instead of "
       "moving them to the CPU.", "Samples", memory=True, resumable=True),
    # -- logging -------------------------------------------------------------------------
    _o("log_with", str, "tensorboard", "Where scalars and samples go: tensorboard (OUTPUT/logs/), wandb, none.",
       "Logging", choices=TRACKERS, resumable=True),
    _o("log_every", int, 10, "Figures that cost a pass or a sync (gradient norm, filter count, memory, it/s) "
       "every N steps and at the end.", "Logging", minimum=1, maximum=MAX_COUNT, resumable=True),
    # -- outputs -------------------------------------------------------------------------
    _o("output", str, "output", "Output folder.", "Outputs", resumable=True),
    _o("progress_every", float, 30.0, "Without a terminal (nohup, CI, > log): a plain progress line every N seconds.",
       "Outputs", minimum=0, maximum=86400, resumable=True),
)

BY_NAME = {o.name: o for o in OPTIONS}
assert all(o.group in GROUPS for o in OPTIONS)
RESUMABLE = tuple(o.name for o in OPTIONS if o.resumable)


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``path`` or ``path:weight`` -> (path, weight). A path that exists is a path, colons
    and all; otherwise what follows the last colon must be a finite number when what
    precedes it is an existing file (``a.safetensors:abc`` is a bad weight, not a missing
    file)."""
    from pathlib import Path

    if not spec.strip():
        raise UserError("an empty LoRA entry: pass FILE.safetensors[:WEIGHT]")
    head, sep, tail = spec.rpartition(":")
    if not sep or not head or Path(spec).expanduser().exists():
        return spec, 1.0
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).expanduser().exists():
            raise UserError(f"bad weight {tail!r} in {spec!r}: write FILE:WEIGHT with a number, e.g. "
                            f"{head}:0.8") from None
        return spec, 1.0
    if not math.isfinite(weight):
        raise UserError(f"bad weight {tail!r} in {spec!r}: a LoRA's weight must be a finite number, e.g. {head}:0.8")
    return head, weight


# Options that name local files and folders. A file a user may share (a LoRA's header,
# a sample's PNG text, report.html) names them, never gives their path: a path often
# holds the user's name. run.json and checkpoints keep the paths (a resume needs them).
PATH_OPTIONS = ("model", "network_weights", "base_lora", "data", "dataset_config", "reg_data", "cache_dir",
                "val_data", "sample_prompts", "output")


def shareable(config: dict) -> dict:
    """A config (``TrainConfig.to_dict()``) with each local path cut to its last name, as
    sd-scripts writes ``ss_output_name``; a hub id, ``tiny`` and ``demo`` stay as given."""
    from pathlib import Path

    def name(path: str) -> str:
        return Path(path).name or path

    out = dict(config)
    for key in PATH_OPTIONS:
        value = out.get(key)
        if key == "base_lora":
            out[key] = [name(path) + ("" if path == spec else f":{weight!r}")
                        for spec in value or [] for path, weight in [parse_lora_spec(spec)]]
        elif key == "model" and value:
            out[key] = model_name(value)
        elif isinstance(value, str) and value:
            out[key] = name(value)
    return out


def markdown_table() -> str:
    """The options table of docs/options.md (a test keeps that file equal to this)."""
    lines = ["# `emotrain sdxl-lora` options", "",
             "Generated from `emotrain/options.py` (`python -m emotrain.options > docs/options.md`). "
             "Every option can be set on the command line or in a preset (TOML key = the option name, "
             "with `_` or `-`); the command line wins. *Resume* marks what `--resume` may change.", ""]
    for group in GROUPS:
        rows = [o for o in OPTIONS if o.group == group]
        if not rows:
            continue
        lines += [f"## {group}", "", "| flag | TOML key | default | resume | what |", "|---|---|---|---|---|"]
        for o in rows:
            what = o.help + (f" One of: {', '.join(o.choices)}." if o.choices and o.name != "optim" else "")
            lines.append(f"| `{o.flags}` | `{o.name}` | {o.shown_default()} | {'yes' if o.resumable else ''} | {what} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
