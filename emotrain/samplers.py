"""The samplers of sample images, in one table: the names users give (``--sample-sampler``
and a prompt line's ``--ss``, as sd-scripts spells them), the diffusers scheduler class
and settings each one means, and the label A1111 writes into an image's parameters.
``k_`` names are sd-scripts' aliases of the same samplers. Pure Python: the command line
checks names before torch is imported; watch/samples.py builds the schedulers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler: str  # the diffusers class
    label: str  # A1111's name, written into the PNG's parameters
    settings: dict = field(default_factory=dict)  # from_config keyword arguments
    zero_snr: bool = True  # the diffusers class honours rescale_betas_zero_snr


_TABLE = (
    Sampler("euler", "EulerDiscreteScheduler", "Euler"),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
    Sampler("dpm++2m", "DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++"}),
    Sampler("dpm++2m_karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    Sampler("ddim", "DDIMScheduler", "DDIM"),
    Sampler("pndm", "PNDMScheduler", "PNDM", {"skip_prk_steps": True}, zero_snr=False),
    Sampler("heun", "HeunDiscreteScheduler", "Heun", zero_snr=False),
    Sampler("dpm_2", "KDPM2DiscreteScheduler", "DPM2", zero_snr=False),
    Sampler("dpm_2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a", zero_snr=False),
    Sampler("dpmsolver", "DPMSolverMultistepScheduler", "DPM-Solver", {"algorithm_type": "dpmsolver"}),
    Sampler("dpmsolver++", "DPMSolverMultistepScheduler", "DPM-Solver++", {"algorithm_type": "dpmsolver++"}),
    Sampler("dpmsingle", "DPMSolverSinglestepScheduler", "DPM-Solver single-step", zero_snr=False),
    Sampler("unipc", "UniPCMultistepScheduler", "UniPC"),
)
ALIASES = {"k_euler": "euler", "k_euler_a": "euler_a", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a"}
SAMPLERS = {s.name: s for s in _TABLE}
NAMES = tuple(SAMPLERS) + tuple(ALIASES)  # every name a user may give


# What a v-prediction or zero-terminal-SNR model samples with (Lin et al. 2023, "Common
# Diffusion Noise Schedules and Sample Steps are Flawed"): timesteps that start at the last
# one, and classifier-free guidance rescaled by this factor.
V_PRED_SETTINGS = {"timestep_spacing": "trailing"}
V_PRED_GUIDANCE_RESCALE = 0.7


def sampler(name: str) -> Sampler:
    """The sampler a name (or an alias) means."""
    return SAMPLERS[ALIASES.get(name, name)]


def without_zero_snr(names) -> list[str]:
    """The names among ``names`` whose scheduler cannot sample a zero-terminal-SNR schedule."""
    return sorted({n for n in names if not sampler(n).zero_snr})
