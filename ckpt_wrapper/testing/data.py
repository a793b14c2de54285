"""The one synthetic batch and the one language-model loss that the demo, tools and tests share.

Example:
    >>> import torch
    >>> from ckpt_wrapper.testing.data import counting_batch, lm_loss
    >>> tokens, targets = counting_batch(step=0, rows=2, seq_len=8, vocab_size=50)
    >>> tokens.shape, bool((tokens[:, 1:] == targets[:, :-1]).all())
    (torch.Size([2, 8]), True)
    >>> round(float(lm_loss(torch.zeros(2, 8, 50), targets)), 4)  # uniform logits: log(50)
    3.912
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["counting_batch", "lm_loss", "random_batch"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` ``(..., vocab)`` against integer ``targets`` ``(...)``.

    Computed in float32 whatever the logits' dtype, as mixed-precision training does.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def _generator(seed: int, step: int) -> torch.Generator:
    # A function of (seed, step) only: every rank, and every rerun, draws the same global batch.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def counting_batch(
    *, step: int, rows: int, seq_len: int, vocab_size: int, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sequences (random start and stride, modulo the vocabulary) and their next tokens.

    Learnable, unlike uniform noise, so the loss visibly falls within a few steps.

    Returns:
        ``(tokens, targets)``, each ``(rows, seq_len)`` int64 on ``device``; ``targets`` is ``tokens``
        shifted by one.
    """
    generator = _generator(seed, step)
    start = torch.randint(0, vocab_size, (rows, 1), generator=generator)
    stride = torch.randint(1, 9, (rows, 1), generator=generator)
    sequences = ((start + stride * torch.arange(seq_len + 1)) % vocab_size).to(device)
    return sequences[:, :-1], sequences[:, 1:]


def random_batch(
    *, step: int, rows: int, seq_len: int, vocab_size: int, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random tokens and their next tokens: what benchmarks time (nothing to learn).

    Returns:
        ``(tokens, targets)``, each ``(rows, seq_len)`` int64 on ``device``.
    """
    sequences = torch.randint(0, vocab_size, (rows, seq_len + 1), generator=_generator(seed, step)).to(device)
    return sequences[:, :-1], sequences[:, 1:]
