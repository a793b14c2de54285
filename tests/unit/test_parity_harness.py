"""The parity harness sees all state, and refuses a wrap that checkpoints nothing (one process, CPU)."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing as torch_apply

from ckpt_wrapper import apply_activation_checkpointing, by_class
from ckpt_wrapper.testing import ParityConfig, check_parity
from ckpt_wrapper.testing.recipes import ShardRecipe


class BNBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.act = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.bn(self.fc(x)))


def _model() -> nn.Module:
    return nn.Sequential(BNBlock(), BNBlock(), nn.Linear(8, 1))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 8, generator=generator), torch.randn(16, 1, generator=generator)


def _check(wrap) -> object:
    return check_parity(_model, _batch, wrap=wrap, is_block=lambda m: isinstance(m, BNBlock),
                        shard=ShardRecipe(kind="none"), config=ParityConfig(steps=2, reference="sharded"))


def test_ckpt_wrapper_on_batchnorm_blocks_passes_with_every_buffer_compared() -> None:
    """Buffers (running statistics, ``num_batches_tracked``) and momentum buffers are compared, and match."""
    report = _check(lambda m: apply_activation_checkpointing(m, check_fn=by_class(BNBlock)))
    report.assert_ok()
    assert "buffer:0.bn.num_batches_tracked" in report.max_diff
    assert "optimizer:0.fc.weight:momentum_buffer" in report.max_diff
    assert report.wrapped == ["0", "1"] and report.recomputes == 2


def test_a_wrapper_that_updates_batchnorm_twice_is_caught() -> None:
    """PyTorch's own wrapper updates BatchNorm statistics again in recompute: gradients match, buffers do
    not, and the report says so. Caught on the main of 2026-12-01: the harness compared parameters and
    gradients only and reported OK.
    """
    report = _check(lambda m: torch_apply(m, check_fn=lambda b: isinstance(b, BNBlock)))
    assert not report.ok
    assert any(f.startswith("buffer:0.bn.") for f in report.failures), report.failures
    assert not any(f.startswith("grad:") for f in report.failures), report.failures


def test_a_wrap_that_wraps_nothing_fails() -> None:
    """A ``wrap`` that checkpoints no block cannot prove anything: the report fails and says why.
    Caught on the main of 2026-12-01: it reported OK."""
    report = _check(lambda m: None)
    assert not report.ok
    assert "this wrap did not checkpoint any block" in str(report)


def test_one_process_says_so_plainly() -> None:
    """Without torchrun the report says it ran on one rank only, not a multi-rank result."""
    report = _check(lambda m: apply_activation_checkpointing(m, check_fn=by_class(BNBlock)))
    assert report.world_size == 1
    assert "on 1 rank only (sharding across ranks was not exercised)" in str(report)


class Unused(nn.Module):
    """Holds a block its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.spare, self.head = BNBlock(), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


def test_a_wrap_that_recomputes_nothing_fails() -> None:
    """Wrapped blocks that never run again in backward (here: off the forward path) fail the check."""
    report = check_parity(Unused, _batch, wrap=lambda m: apply_activation_checkpointing(m, check_fn=by_class(BNBlock)),
                          is_block=lambda m: isinstance(m, BNBlock), shard=ShardRecipe(kind="none"),
                          config=ParityConfig(steps=1, reference="sharded"))
    assert any("this wrap recomputed nothing" in f for f in report.failures), report.failures
