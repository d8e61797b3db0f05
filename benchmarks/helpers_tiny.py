"""A fixed UNet input of a model's own widths (as tests/helpers.py builds it)."""

import torch


def unet_inputs(unet, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(sample=torch.randn(2, cfg.in_channels, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)})
