"""A small GPT-style decoder: the model the demo, the benchmarks and the tests train.

It is the model of the reference workloads in docs/benchmarks.md (pre-norm blocks, SDPA attention, GELU MLP,
untied head), so figures measured on it compare with PyTorch's own tools on the same model.

Example:
    >>> import torch
    >>> from ckpt_wrapper.testing.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=4, seq_len=16, vocab_size=64))
    >>> tokens = torch.randint(0, 64, (2, 16))
    >>> model(tokens).shape
    torch.Size([2, 16, 64])
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ckpt_wrapper.testing.data import lm_loss

__all__ = ["GPTConfig", "GPT", "Block", "CausalSelfAttention", "MLP", "CPU_REFERENCE", "GPU_REFERENCE"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig:
    """Shape of a GPT-style decoder."""

    n_layer: int = 8
    """Number of transformer blocks."""
    d_model: int = 512
    """Hidden width."""
    n_head: int = 8
    """Attention heads; must divide ``d_model``."""
    seq_len: int = 256
    """Sequence length (and the size of the learned position table)."""
    vocab_size: int = 8000
    """Vocabulary size; the head is untied from the embedding."""
    dropout: float = 0.0
    """Dropout probability after attention and MLP (exercises RNG preservation)."""

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
        for field in ("n_layer", "d_model", "n_head", "seq_len", "vocab_size"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")


CPU_REFERENCE = GPTConfig()
"""The CPU reference workload: 8 blocks, width 512, 8 heads, sequence 256, vocabulary 8000 (batch 4)."""
GPU_REFERENCE = GPTConfig(n_layer=16, d_model=2048, n_head=16, seq_len=2048, vocab_size=32000)
"""The GPU reference workload: 16 blocks, width 2048, 16 heads, sequence 2048, vocabulary 32000 (batch 4)."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(batch, seq, width)))


class MLP(nn.Module):
    """The feed-forward half of a block: width -> 4x width -> GELU -> width."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model)
        self.act = nn.GELU()
        self.proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: the unit ckpt_wrapper checkpoints."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token and position embeddings, ``n_layer`` blocks in ``self.layers``, a final norm and a head."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(batch, seq, vocab_size)`` for integer ``tokens`` of shape ``(batch, seq)``."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln_f(x))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (``lm_loss``) of ``tokens`` against ``targets``."""
        return lm_loss(self(tokens), targets)
