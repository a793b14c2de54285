"""The driver's models, data and checkpointing modes.

Example:
    >>> import argparse
    >>> from ckpt_wrapper.tools.train_driver.modes import learning_rate
    >>> args = argparse.Namespace(steps=10, lr=1.0)
    >>> learning_rate(1, args), learning_rate(10, args)
    (1.0, 0.1)
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import ckpt_wrapper
from ckpt_wrapper import (
    OffloadOptions, apply_activation_checkpointing, apply_selective_checkpointing, by_class_name, checkpoint_wrapper,
    every_nth, offload_wrapper,
)
from ckpt_wrapper.budget import Budget
from ckpt_wrapper.testing.data import counting_batch
from ckpt_wrapper.testing.models import GPT, GPTConfig

__all__ = [
    "Batches", "block_names", "build_model", "compile_blocks", "learning_rate", "make_checkpointing", "model_logits",
    "plan_checkpointing", "selective_checkpointing", "wrapper_for",
]


def block_names(args: argparse.Namespace) -> list[str]:
    """The class names of the blocks: ``--blocks``, else the model's own block class."""
    default = "Block" if args.model == "gpt" else "LlamaDecoderLayer"
    return [name.strip() for name in (args.blocks or default).split(",") if name.strip()]


def build_model(args: argparse.Namespace) -> nn.Module:
    """The seeded model (on CPU), the same on every rank.

    Raises:
        ValueError: for ``--model llama`` without HF transformers.
    """
    torch.manual_seed(args.seed)
    if args.model == "gpt":
        return GPT(GPTConfig(n_layer=args.n_layer, d_model=args.d_model, n_head=args.n_head, seq_len=args.seq_len,
                             vocab_size=args.vocab_size, dropout=args.dropout))
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise ValueError(f"--model llama needs HF transformers, found none ({error}); pip install transformers"
                         ) from None
    config = LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.n_layer, num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
        max_position_embeddings=args.seq_len, attention_dropout=args.dropout, use_cache=False,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def model_logits(model: nn.Module, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """The logits of the GPT (``kind`` gpt: a tensor) or an HF model (``.logits`` of its output)."""
    return model(tokens) if kind == "gpt" else model(input_ids=tokens, use_cache=False).logits


class Batches:
    """The global batch of each step, a function of (seed, step) only: the data position is the step.

    Synthetic counting sequences (``ckpt_wrapper.testing.data.counting_batch``), or random windows of
    a local text file read as bytes.
    """

    def __init__(self, args: argparse.Namespace, global_batch: int) -> None:
        self.seed, self.rows, self.seq, self.vocab = args.seed, global_batch, args.seq_len, args.vocab_size
        self.text: torch.Tensor | None = None
        self.source = "synthetic sequences"
        if args.data is not None:
            raw = args.data.read_bytes()
            if len(raw) <= self.seq + 1:
                raise ValueError(f"--data {args.data} holds {len(raw)} bytes; expected more than --seq-len + 1 "
                                 f"({self.seq + 1}): use a longer file or a smaller --seq-len")
            self.text = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
            self.source = f"{args.data} ({len(raw)} bytes)"

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens, targets)`` of ``step``, each ``(global batch, seq_len)``, on the CPU."""
        if self.text is None:
            return counting_batch(step=step, rows=self.rows, seq_len=self.seq, vocab_size=self.vocab, seed=self.seed)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.text) - self.seq - 1, (self.rows,), generator=generator)
        rows = torch.stack([self.text[s: s + self.seq + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over the first 10% of steps, then cosine decay to 10%: a function of the step alone."""
    warmup = max(1, args.steps // 10)
    if step <= warmup:
        return args.lr * step / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def selective_checkpointing(model: nn.Module, selector: Any, preset: str) -> list[str]:
    """``--ac selective``: op-level checkpointing of the selected blocks with ``preset``."""
    return apply_selective_checkpointing(model, check_fn=selector, policy=preset)


def plan_checkpointing(model: nn.Module, selector: Any, example: torch.Tensor, budget: Budget, rank: int) -> list[str]:
    """``--ac plan``: the planner's per-block choice within ``budget``; rank 0 prints the plan."""
    chosen = ckpt_wrapper.plan(model, example, memory_budget=budget, check_fn=selector)
    if rank == 0:
        print(chosen, flush=True)
    return list(chosen.apply(model))


def wrapper_for(args: argparse.Namespace) -> Callable[..., nn.Module]:
    """The wrapper function of ``--ac full``, ``offload`` or ``full+offload``."""
    return {
        "full": checkpoint_wrapper,
        "offload": functools.partial(offload_wrapper, cpu_copy=args.offload_cpu_copy),
        "full+offload": functools.partial(checkpoint_wrapper, offload=OffloadOptions(cpu_copy=args.offload_cpu_copy)),
    }[args.ac]


def make_checkpointing(args: argparse.Namespace, names: list[str], example: Callable[[], torch.Tensor],
                       rank: int) -> Callable[[nn.Module], list[str]]:
    """A function that applies ``--ac`` to a model in place and returns the blocks it wrapped."""
    selector = by_class_name(*names)
    if args.every > 1:
        selector = every_nth(args.every, selector)

    def apply(model: nn.Module) -> list[str]:
        if args.ac == "none":
            return []
        if args.ac == "selective":
            return selective_checkpointing(model, selector, args.selective_preset)
        if args.ac == "plan":
            return plan_checkpointing(model, selector, example(), args.memory_budget, rank)
        return apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper_for(args), check_fn=selector)

    return apply


def compile_blocks(model: nn.Module, names: list[str], backend: str) -> None:
    """Compile each block in place (``nn.Module.compile``): names and state-dict keys gain no ``_orig_mod.``."""
    for _, block in by_class_name(*names).select(model):
        block.compile(backend=backend)
