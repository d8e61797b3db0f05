"""Captions into SDXL's text conditioning: both text encoders' penultimate hidden states
side by side and the second encoder's pooled projection. Captions longer than 75 tokens
are encoded as sd-scripts (and A1111) do: chunks of 75 tokens, each between its own
<BOS> and <EOS>, encoded separately; the hidden states are joined back into one
<BOS> + 75n + <EOS> sequence, and the pooled output is the first chunk's."""

from __future__ import annotations

import torch

CHUNK = 75  # tokens per chunk between <BOS> and <EOS>


def token_ids(tokenizer, captions: list[str], max_tokens: int = CHUNK) -> torch.Tensor:
    """-> [batch, chunks, 77] token ids."""
    ids = tokenizer(captions, padding="max_length", max_length=max_tokens + 2, truncation=True,
                    return_tensors="pt").input_ids
    if max_tokens == CHUNK:
        return ids[:, None]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, max_tokens + 1, CHUNK):
        chunk = torch.cat([ids[:, :1], ids[:, start:start + CHUNK], ids[:, -1:]], dim=1)
        chunk[(chunk[:, -2] != eos) & (chunk[:, -2] != pad), -1] = eos  # cut inside the text: close it
        chunk[chunk[:, 1] == pad, 1] = eos  # an empty chunk reads <BOS><EOS><PAD>...
        chunks.append(chunk)
    return torch.stack(chunks, dim=1)


def count_tokens(tokenizer, caption: str) -> int:
    """Tokens of a caption, without <BOS>/<EOS>."""
    return len(tokenizer(caption, add_special_tokens=False, verbose=False).input_ids)


def encode_prompts(sdxl, captions: list[str], device, max_tokens: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (prompt embeddings [B, 2 + max_tokens, d1 + d2], pooled embeddings [B, d2])."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip((sdxl.tokenizer, sdxl.tokenizer_2), sdxl.text_encoders):
        ids = token_ids(tokenizer, captions, max_tokens).to(device)
        b, n, length = ids.shape
        out = encoder(ids.reshape(b * n, length), output_hidden_states=True)
        states = out.hidden_states[-2].reshape(b, n, length, -1)
        if n > 1:  # <BOS> of the first chunk, each chunk's 75, the last chunk's final token
            states = torch.cat([states[:, 0, :1], states[:, :, 1:-1].reshape(b, n * (length - 2), -1),
                                states[:, -1, -1:]], dim=1)
        hidden.append(states if n > 1 else states[:, 0])
        pooled = out[0].reshape(b, n, -1)[:, 0]  # the last encoder's projected pooled output (text_embeds)
    return torch.cat(hidden, dim=-1), pooled
