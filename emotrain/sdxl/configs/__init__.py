"""SDXL 1.0's component configs, shipped so that planning and the tiny model need no
download. The numbers are Stability's published configs."""

from __future__ import annotations

import json
from importlib import resources


def load_config(name: str) -> dict:
    """A shipped config by name: ``sdxl_unet``, ``sdxl_vae``, ``sdxl_text_encoder``,
    ``sdxl_text_encoder_2``, ``sdxl_scheduler``."""
    return json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
