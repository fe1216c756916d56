"""Speech token ids as the decoder takes them: checked once, at the door."""

from __future__ import annotations

import numpy as np
import torch


def check_tokens(tokens: object, codebook_size: int, what: str = "tokens") -> torch.Tensor:
    """Token ids as a 1-D int64 tensor; ValueError naming `what` unless `tokens` is a non-empty
    1-D sequence of integers in [0, codebook_size)."""
    if isinstance(tokens, torch.Tensor):
        t = tokens.detach().cpu()
    else:
        try:
            t = torch.as_tensor(np.asarray(tokens))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{what}: expected a sequence of integer token ids ({err})") from err
    if t.numel() == 0:
        raise ValueError(f"{what}: no tokens to decode")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{what}: token ids must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(
            f"{what}: expected a 1-D sequence of token ids, got shape {tuple(t.shape)}"
        )
    low, high = int(t.min()), int(t.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(_out_of_range(what, low if low < 0 else high, codebook_size))
    return t.long()


def check_token_list(tokens: list[int], codebook_size: int, what: str = "tokens") -> list[int]:
    """The fast path for what token sources hand over, a list of plain ints: only the range is
    checked. Returns `tokens`."""
    low, high = min(tokens), max(tokens)
    if low < 0 or high >= codebook_size:
        raise ValueError(_out_of_range(what, low if low < 0 else high, codebook_size))
    return tokens


def _out_of_range(what: str, token: int, codebook_size: int) -> str:
    return f"{what}: token id {token} is outside 0..{codebook_size - 1}"
