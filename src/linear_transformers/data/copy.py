"""The copy task of the paper's Figure 2: a random string of symbols, a separator, the same string.

Tokens: 0 padding, 1 separator, 2 .. n_symbols + 1 symbols. A sequence of length L (uniform in
min_symbols .. max_symbols) is laid out as

    SEP x_1 .. x_L SEP x_1 .. x_L PAD ..       (2 * max_symbols + 2 tokens in all)

The model sees the separators; the copied half (the second x_1 .. x_L) is what it is scored on: every
token of it is determined by the first half, so a model that copies perfectly reaches zero loss there.

The paper's "sequence length 128" is the whole sequence, as in the authors' public copy-task code:
strings of 32 .. 62 symbols padded to 128 tokens. Here max_symbols=63, min_symbols=32 gives the same
(2 * 63 + 2 = 128 tokens, strings a quarter to a half of the sequence).
"""

from __future__ import annotations

import torch

PAD, SEP = 0, 1


def vocab_size(n_symbols: int) -> int:
    return n_symbols + 2


def seq_len(max_symbols: int) -> int:
    return 2 * max_symbols + 2


def copy_batch(
    batch: int,
    max_symbols: int = 63,
    n_symbols: int = 10,
    generator: torch.Generator | None = None,
    min_symbols: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [batch, 2 * max_symbols + 2] (int64) and the mask of the copied half (bool, same shape)."""
    if batch < 1 or max_symbols < 1 or n_symbols < 1:
        raise ValueError(
            f"copy_batch: batch, max_symbols and n_symbols must be >= 1, got {batch}, {max_symbols}, {n_symbols}"
        )
    if not 1 <= min_symbols <= max_symbols:
        raise ValueError(f"copy_batch: min_symbols must be in 1 .. max_symbols={max_symbols}, got {min_symbols}")
    T = seq_len(max_symbols)
    lengths = torch.randint(min_symbols, max_symbols + 1, (batch, 1), generator=generator)
    symbols = torch.randint(2, n_symbols + 2, (batch, max_symbols), generator=generator)
    i = torch.arange(max_symbols)[None]
    first = torch.where(i < lengths, symbols, PAD)
    pos = torch.arange(T)[None]
    tokens = torch.full((batch, T), PAD, dtype=torch.long)
    tokens[:, 1 : max_symbols + 1] = first
    # the second separator sits right after the string, then the copy
    second = lengths + 1
    tokens[pos == second] = SEP
    src = (pos - second - 1).clamp(0, max_symbols - 1)
    copied = (pos > second) & (pos <= 2 * lengths + 1)
    tokens = torch.where(copied, first.gather(1, src), tokens)
    tokens[:, 0] = SEP
    return tokens, copied
