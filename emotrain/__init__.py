"""emotrain: SDXL LoRA training with the Emo optimizer family."""
__version__ = "0.1.0"
