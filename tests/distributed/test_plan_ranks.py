"""The planner under torch.distributed: rank 0 plans, every rank applies the same plan, FSDP2 trains.

Different plans on different ranks would make FSDP2's collectives disagree and hang, so every rank must
return rank 0's plan, whatever its own model or arguments would have given. The tasks live in
``plan_cells.py`` and run on the module's 2-rank gloo pool; a failure message carries every rank's
traceback. The infeasible-budget test runs last: if a rank hangs, the pool is killed with it.
"""

from __future__ import annotations

import pytest

import plan_cells

pytestmark = pytest.mark.timeout(240)


def test_every_rank_gets_rank_0s_plan(pool2) -> None:
    """Planned under a 2-rank group, both ranks return the identical plan (JSON equal, timings included).

    A failure means ranks plan on their own and may choose differently (then FSDP hangs or diverges).
    """
    results = pool2.run(plan_cells.plan_per_rank, [0.6, 0.6], [0, 0])
    assert results[0]["json"] == results[1]["json"]


def test_rank_1_returns_rank_0s_plan_even_when_its_model_and_budget_differ(pool2) -> None:
    """Rank 1 builds a differently seeded model and asks for 0.9 of its memory; rank 0 asks for 0.5. Both
    return rank 0's plan: identical JSON, whose budget is rank 0's 0.5 of unwrapped.

    A failure means rank 1's own measurements or arguments leak into its plan: rank 0 does not decide.
    """
    results = pool2.run(plan_cells.plan_per_rank, [0.5, 0.9], [0, 1])
    assert results[0]["json"] == results[1]["json"]
    assert results[1]["budget_fraction_got"] == pytest.approx(0.5, abs=1e-3), results[1]


@pytest.mark.parametrize("which", ["planned", "mixed"])
def test_applied_plan_trains_under_fsdp2_bitwise_like_unwrapped(pool2, which) -> None:
    """The plan (broadcast from rank 0, or a hand-made mix of cheap+regions, sac:titan and full) applied
    before ``fully_shard`` on every block and the root: one training step finishes on both ranks without
    hanging, with the same loss and bitwise the same gathered gradients as the unwrapped sharded model.

    A failure or timeout means a strategy does not compose with FSDP2's class swap and hooks (or ranks
    applied different plans and a collective deadlocked).
    """
    results = pool2.run(plan_cells.plan_then_fsdp2_step, which, timeout=120)
    assert results[0]["json"] == results[1]["json"]
    for rank, result in enumerate(results):
        assert result["wrapped"], f"rank {rank}: the plan wrapped nothing: {result['strategies']}"
        assert result["loss_equal"], f"rank {rank}: loss differs"
        assert result["grads_differ"] == [], f"rank {rank}: gradients differ: {result['grads_differ']}"
    if which == "mixed":
        assert results[0]["strategies"] == plan_cells.MIXED_STRATEGIES


def test_peak_components_match_a_real_fsdp2_model_on_each_rank(pool2) -> None:
    """Planned for FSDP2 over the 2-rank group with AdamW, the predicted parameters and optimizer state per
    rank equal, byte for byte, the local shards and optimizer state of the model sharded as planned after a
    step; the gradients kept after backward equal the local gradient shards; and the plan's world size is
    the group's. The predicted step peak is printed beside the one MemTracker measures (not asserted: the
    model of FSDP2's all-gather and reduce-scatter buffers is approximate, see docs/planner.md).

    A failure means the per-rank budget divides the wrong things by the world size (or forgets FSDP2's
    padding of shards), so a limit that looks met is not, or the plan is needlessly tight.
    """
    results = pool2.run(plan_cells.peak_components_under_fsdp2, timeout=150)
    assert results[0]["json"] == results[1]["json"]
    for rank, r in enumerate(results):
        assert r["world"] == 2, r
        assert r["predicted"]["parameters"] == r["parameters"], (rank, r)
        assert r["predicted"]["optimizer state"] == r["optimizer_state"], (rank, r)
        assert r["static_gradients"] == r["gradients"], (rank, r)
        print(f"rank {rank}: predicted peak {r['predicted_peak']}, measured {r['measured_peak']}, "
              f"{r['predicted_peak'] / r['measured_peak'] - 1:+.2%}")


@pytest.mark.parametrize("kind, which", [("fsdp2", "gpt"), ("fsdp1", "gpt"), ("ddp", "gpt"), ("fsdp2", "wide"),
                                         ("ddp", "wide")])
def test_communication_counted_is_what_a_real_checkpointed_step_runs(pool2, kind, which) -> None:
    """The collectives ``Communication.of`` counts for the planned sharding are those a real sharded step
    runs on each rank, with every block checkpointed: the same kinds, calls and full-tensor bytes (FSDP's
    all-gathers and reduce-scatters with their padding; DDP's bucketed all-reduce, and its broadcast of
    buffers per dtype). Counted by a dispatch mode on the c10d ops of the third step. ``wide`` is 32 MiB of
    gradients in several DDP buckets, buffers of two dtypes, and a root without parameters.

    A failure means the predicted communication (and so the predicted step time under sharding) misses
    or invents collectives, or recompute changes them after all.
    """
    results = pool2.run(plan_cells.collectives_of_a_checkpointed_step, kind, which, timeout=120)
    for rank, r in enumerate(results):
        assert r["wrapped"] == r["blocks"] > 0, (rank, r)
        assert r["seen_calls"] == r["predicted_calls"], (rank, r)
        assert r["seen_bytes"] == r["predicted_bytes"], (rank, r)


def test_measured_communication_is_one_calibration_on_every_rank_and_in_the_step_time(pool2) -> None:
    """``measure_communication`` on the 2-rank group gives every rank the same constants, finite and
    non-negative for every term, with a positive per-byte cost for each collective; the plan for FSDP2
    made with it (rank 0's, on both ranks) adds exactly its modelled communication to the step time of
    the plan for no sharding. Measuring leaves each rank's global RNG where it was.

    A failure means ranks would model different step times, a constant is missing or meaningless, the
    measured communication does not reach the plan, or measuring shifts the user's next random draws.
    """
    from ckpt_wrapper import Plan
    from ckpt_wrapper.planner.communication import COLLECTIVES, TERMS

    results = pool2.run(plan_cells.measured_communication_in_a_plan, timeout=120)
    assert [r["rng_kept"] for r in results] == [True, True], "measuring changed the caller's global RNG"
    assert results[0]["calibration"] == results[1]["calibration"]
    assert results[0]["json"] == results[1]["json"]
    constants = results[0]["calibration"]["communication"]
    assert set(constants) == set(TERMS)
    for term, (per_call, per_byte) in constants.items():
        assert 0 <= per_call < 1 and 0 <= per_byte < 1e-6, (term, per_call, per_byte)
        if term in COLLECTIVES:
            assert per_byte > 0, (term, per_byte)
    sharded, alone = Plan.from_json(results[0]["json"]), Plan.from_json(results[0]["alone"])
    assert sharded.communication["world_size"] == 2 and sharded.communication["seconds"] > 0
    assert sharded.step_seconds == pytest.approx(alone.step_seconds + sharded.communication["seconds"], abs=1e-12)


@pytest.mark.parametrize("sharding", ["fsdp2", "ddp"])
def test_fit_with_sharding_predicts_the_sharded_step_it_timed(pool2, sharding) -> None:
    """``Calibration.fit(sharding=...)`` on both ranks leaves the model as it was, and the unwrapped step
    time of a plan made with it is the sharded step the fit timed (its source says how long): the FLOP rate
    fitted to the unsharded step, the communication scaled to the rest.

    A failure means the fit scales communication against a different count than ``plan`` models (the
    sharded step would be mispredicted), or the fit changes the model.
    """
    import re

    from ckpt_wrapper import Plan

    results = pool2.run(plan_cells.fit_with_sharding, sharding, timeout=150)
    assert results[0]["json"] == results[1]["json"]
    for rank, r in enumerate(results):
        assert r["unchanged"], f"rank {rank}: the fit changed the model"
    timed = re.search(rf"scaled x([0-9.]+) to a ([0-9.]+) ms {sharding} step", results[0]["source"])
    assert timed, results[0]["source"]
    plan = Plan.from_json(results[0]["json"])
    assert plan.communication["seconds"] > 0
    assert plan.step_seconds * 1e3 == pytest.approx(float(timed.group(2)), rel=1e-3)


@pytest.mark.timeout(90)
def test_infeasible_budget_raises_value_error_on_every_rank_without_hanging(pool2) -> None:
    """A budget no plan fits raises a ``ValueError`` saying the least reachable memory on every rank.

    A failure (a timeout) means rank 0 raised before the broadcast and left rank 1 waiting in
    ``broadcast_object_list`` forever: a job-wide hang instead of an error. Runs last: a hang kills the pool.
    """
    messages = pool2.run(plan_cells.plan_infeasible, timeout=20)
    for rank, message in enumerate(messages):
        assert "least activation memory reachable" in message, f"rank {rank}: {message}"


def test_fit_with_sharding_that_fails_on_one_rank_raises_on_every_rank_without_hanging(pool2) -> None:
    """A ``Calibration.fit(sharding=...)`` whose unsharded fit fails on rank 1 only raises a ``ValueError``
    on both ranks: rank 1 its own, rank 0 one naming rank 1, before either starts a collective.

    A failure (a timeout) means the healthy rank went on into ``measure_communication``'s collectives
    alone and waited there for the process group's timeout (30 minutes by default).
    """
    results = pool2.run(plan_cells.fit_with_sharding_failing_on_rank_1, timeout=60)
    assert results[1].startswith("ValueError: cannot fit the FLOP rate"), results
    assert results[0].startswith("ValueError: ") and "[1]" in results[0], results
