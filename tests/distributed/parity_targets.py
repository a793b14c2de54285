"""A user-style model for the parity command's negative test: its block drifts when recomputed."""

from __future__ import annotations

import torch
from torch import nn


class Drifting(nn.Module):
    """Adds a call count to its output: recomputation sees a different count, so gradients change."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.linear(x)) * self.calls


def drifting_model() -> nn.Module:
    return nn.Sequential(Drifting(), Drifting(), nn.Linear(8, 8))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(4, 8, generator=generator), torch.randn(4, 8, generator=generator)
