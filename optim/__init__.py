"""The Emo optimizer family (EmoSens, EmoAiry, EmoCats), v2.0 as fixed by
optim/SPEC.md (cited in the code as "spec N" / "§N"). torch only."""

from ._emotion import Emotion
from .emoairy import EmoAiry
from .emocats import EmoCats
from .emosens import EmoSens
from .memory import state_nbytes

__all__ = ["EmoSens", "EmoAiry", "EmoCats", "Emotion", "state_nbytes"]
