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


def llama() -> nn.Module:
    """A tiny Hugging Face Llama built from a config (nothing downloaded); its blocks are ``LlamaDecoderLayer``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16, use_cache=False)
    return LlamaForCausalLM(config)


def llama_labelled_batch(step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs as keywords with ``labels``: the model computes its own loss (``output.loss``)."""
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, 128, (4, 16), generator=generator)
    return {"input_ids": tokens, "labels": tokens}, tokens


def logits_of(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A user ``--forward``: the model's logits."""
    return model(input_ids=inputs).logits


def loss_of(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A user ``--loss``: next-token cross-entropy of logits against targets."""
    return torch.nn.functional.cross_entropy(output.flatten(0, -2).float(), targets.flatten())
