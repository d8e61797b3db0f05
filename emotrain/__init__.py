"""emotrain: SDXL LoRA training with the Emo optimizer family."""

import logging

__version__ = "0.1.0"

# bitsandbytes' CPU backend warns on import that an optional kernel from the model hub is
# missing; emotrain never fetches it, so the warning is only noise on every command.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# diffusers' SDXL pipeline imports CLIP image processors that training never uses; without
# torchvision transformers warns about each one.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)
