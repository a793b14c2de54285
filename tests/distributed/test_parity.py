"""Checkpointing never changes what a sharded model learns: parity cells through the public harness.

Each cell trains a checkpointed (or offloaded), sharded GPT beside a reference for three SGD steps and
compares losses, outputs, gathered gradients and parameters on every rank. Against an unsharded
reference on the global batch the tolerances are float32-tight (rtol 1e-5, atol 1e-6: the reductions
run in another order); against the same recipe without checkpointing they are zero (bitwise).
A failure means wrapping changed the numbers for that sharding recipe; the message has every rank's
report or traceback.
"""

from __future__ import annotations

import itertools

import pytest

import cells

pytestmark = pytest.mark.timeout(300)


def _assert_cell(pool, *args, **kwargs) -> None:
    for rank, (ok, report) in enumerate(pool.run(cells.parity_cell, *args, **kwargs)):
        assert ok, f"rank {rank}:\n{report}"


FSDP1_2RANK = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"]
FSDP1_4RANK = ["HYBRID_SHARD", "_HYBRID_SHARD_ZERO2"]
GRID = list(itertools.product([False, True], ["before", "after"], ["checkpoint", "offload"]))


def _grid_id(orig: bool, order: str, wrap: str) -> str:
    return f"orig{int(orig)}-{order}-{wrap}"


@pytest.mark.parametrize("strategy", FSDP1_2RANK)
@pytest.mark.parametrize("use_orig_params,order,wrap", GRID, ids=[_grid_id(*g) for g in GRID])
def test_fsdp1_matches_unsharded_reference(pool2, strategy, use_orig_params, order, wrap):
    """FSDP1 on 2 ranks, every strategy x use_orig_params x wrap order x wrapper kind."""
    _assert_cell(pool2, {"kind": "fsdp1", "sharding_strategy": strategy, "use_orig_params": use_orig_params,
                         "wrap_order": order}, wrap)


@pytest.mark.parametrize("strategy", FSDP1_4RANK)
@pytest.mark.parametrize("use_orig_params,order,wrap", GRID, ids=[_grid_id(*g) for g in GRID])
def test_fsdp1_hybrid_matches_unsharded_reference(pool4, strategy, use_orig_params, order, wrap):
    """FSDP1 hybrid strategies on 4 ranks (2x2 mesh), the same grid."""
    _assert_cell(pool4, {"kind": "fsdp1", "sharding_strategy": strategy, "use_orig_params": use_orig_params,
                         "wrap_order": order}, wrap)


@pytest.mark.parametrize("wrap", ["checkpoint", "offload"])
@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_matches_unsharded_reference(pool2, reshard, wrap):
    """FSDP2 fully_shard on every block and the root, in fp32, against the plain model."""
    _assert_cell(pool2, {"kind": "fsdp2", "reshard_after_forward": reshard}, wrap)


@pytest.mark.parametrize("wrap", ["checkpoint", "offload"])
@pytest.mark.parametrize("reshard", [True, False])
def test_fsdp2_bf16_mixed_precision_is_bitwise_equal_to_fsdp2_without_checkpointing(pool2, reshard, wrap):
    """MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): bitwise equal to the same run unwrapped."""
    _assert_cell(pool2, {"kind": "fsdp2", "reshard_after_forward": reshard, "param_dtype": "bf16",
                         "reduce_dtype": "fp32"}, wrap, {"reference": "sharded"})


@pytest.mark.parametrize("wrap", ["checkpoint", "offload"])
@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_matches_unsharded_reference(pool2, find_unused, wrap):
    """DDP with and without find_unused_parameters (no static_graph)."""
    _assert_cell(pool2, {"kind": "ddp", "find_unused_parameters": find_unused}, wrap)


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_parameter_shared_between_checkpointed_and_plain_module_gets_full_gradient(pool2, find_unused):
    """A weight used inside a checkpointed block and by an unwrapped module gets both contributions.
    (FSDP2 refuses such sharing across groups by design, so this is a DDP cell.)"""
    _assert_cell(pool2, {"kind": "ddp", "find_unused_parameters": find_unused}, "checkpoint", model_fn="shared")


@pytest.mark.parametrize("recipe", [{"kind": "ddp"}, {"kind": "fsdp1"}, {"kind": "fsdp1", "use_orig_params": True},
                                    {"kind": "fsdp2"}], ids=["ddp", "fsdp1", "fsdp1-orig", "fsdp2"])
def test_gradient_accumulation_without_sync_matches_reference(pool2, recipe):
    """Two micro-batches per step with no_sync / set_requires_gradient_sync(False) on the first."""
    _assert_cell(pool2, recipe, "checkpoint", {"micro_batches": 2})


@pytest.mark.parametrize("recipe", [{"kind": "ddp"}, {"kind": "fsdp1"}, {"kind": "fsdp2"}], ids=["ddp", "fsdp1", "fsdp2"])
def test_train_eval_train_cycle_matches_reference(pool2, recipe):
    """An eval forward under no_grad between steps gives the reference's outputs and disturbs nothing."""
    _assert_cell(pool2, recipe, "checkpoint", {"eval_between": True})


@pytest.mark.parametrize("recipe", [{"kind": "ddp"}, {"kind": "fsdp1"}, {"kind": "fsdp2"}], ids=["ddp", "fsdp1", "fsdp2"])
@pytest.mark.parametrize("wrap", ["checkpoint", "offload"])
def test_dropout_is_bitwise_equal_with_rng_preservation(pool2, recipe, wrap):
    """With dropout 0.1, checkpointing replays the forward's RNG: bitwise equal to the run without it."""
    _assert_cell(pool2, recipe, wrap, {"reference": "sharded"}, model={"dropout": 0.1})


def test_ddp_find_unused_with_reentrant_names_the_block_and_the_fix(pool2):
    """REENTRANT under DDP(find_unused_parameters=True) marks parameters ready twice (a PyTorch limit): the
    error names the block and the fix on every rank. Caught on the main of 2026-12-01: PyTorch's message
    alone, which names neither. Without find_unused_parameters the same wrapping trains bitwise."""
    for rank, message in enumerate(pool2.run(cells.failing_parity_cell, {"kind": "ddp", "find_unused_parameters": True},
                                             "reentrant")):
        assert "ready only once" in message and "(Block) uses CheckpointImpl.REENTRANT" in message, f"rank {rank}: {message}"
        assert "NO_REENTRANT" in message and "static_graph=True" in message
    _assert_cell(pool2, {"kind": "ddp"}, "reentrant", {"reference": "sharded"})


def test_harness_catches_lost_gradients(pool2):
    """The harness is able to fail: PyTorch's reentrant wrapper with frozen embeddings loses the blocks'
    gradients, and the report must say so."""
    results = pool2.run(cells.parity_cell, {"kind": "fsdp2"}, "torch-reentrant", model_fn="frozen-embedding")
    for ok, report in results:
        assert not ok and "grad:layers.0" in report, report


def test_dcp_round_trip_across_wrapping_layouts(pool2, tmp_path):
    """torch.distributed.checkpoint: state saved from a fully wrapped FSDP2 model loads, tensor for tensor,
    into a model wrapped differently, one never wrapped, and a plain unsharded one; keys carry no wrapper
    names. A failure means checkpoints written with ckpt_wrapper are tied to its wrapping layout."""
    for rank, problems in enumerate(pool2.run(cells.dcp_round_trip, str(tmp_path / "ckpt"))):
        assert problems == [], f"rank {rank}: {problems}"
