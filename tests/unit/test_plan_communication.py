"""What a sharded step communicates, as the planner counts it, and how it enters the predicted step time.

Checkpointing changes no collective (tests/distributed/test_plan_ranks.py counts a real step's), so
communication is one term of every plan's step time, never a reason to choose one plan over another. The
counts here are checked against sizes worked out by hand from the model's parameters; the measured
constants (``Calibration.measure_communication``) need a process group and are tested on two ranks.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import ckpt_wrapper
from ckpt_wrapper import Plan
from ckpt_wrapper.planner.communication import TERMS, Communication
from ckpt_wrapper.planner.cost import Calibration
from ckpt_wrapper.planner.memory import StaticMemory
from ckpt_wrapper.planner.profile import find_blocks
from ckpt_wrapper.testing.models import GPT, GPTConfig
from probes import single_thread  # noqa: F401  (a fixture, used through pytestmark)

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIG = GPTConfig(n_layer=3, d_model=32, n_head=4, seq_len=16, vocab_size=65)
CONSTANTS = {"all_gather": (1e-3, 1e-9), "reduce_scatter": (2e-3, 2e-9), "all_reduce": (3e-3, 3e-9),
             "broadcast": (4e-3, 4e-9), "copy": (1e-5, 1e-10), "fsdp_unit": (5e-3, 0.0)}


def _gpt() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    return GPT(CONFIG), torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_len),
                                      generator=torch.Generator().manual_seed(1))


def _calibration(**changes) -> Calibration:
    values = dict(seconds_per_flop=1e-11, seconds_per_byte=1e-10, seconds_per_op=1e-6, seconds_per_mode_op=1e-5,
                  communication=CONSTANTS)
    return Calibration(**{**values, **changes})


def _padded_bytes(params, world: int) -> int:
    """FSDP2's all-gather output: every parameter's dim 0 padded to a multiple of ``world``."""
    total = 0
    for p in params:
        rows = math.ceil(p.shape[0] / world) * world if p.dim() else world
        total += rows * (p.numel() // max(p.shape[0], 1) if p.dim() else 1) * p.element_size()
    return total


def _static(model: GPT, sharding: str, world: int) -> StaticMemory:
    return StaticMemory.of(model, find_blocks(model, None), sharding=sharding, world_size=world)


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_counts_a_gather_per_unit_in_forward_one_per_block_in_backward_and_a_reduce_scatter_each(world) -> None:
    """FSDP2 over ``world`` ranks: 1 + 2 x blocks all-gathers (the root stays gathered into backward) of the
    padded unsharded parameters, a reduce-scatter per unit of its padded gradients, 4 copies per block
    gather pair and 2 per reduce-scatter, one fixed cost per unit.

    A failure means the counts drift from what ``fully_shard`` runs (the distributed test counts a real step).
    """
    model, _ = _gpt()
    comm = Communication.of(_static(model, "fsdp2", world))
    block_params = [list(block.parameters()) for block in model.layers]
    root = [p for p in model.parameters() if all(p is not q for ps in block_params for q in ps)]
    gathered = _padded_bytes(root, world) + 2 * sum(_padded_bytes(ps, world) for ps in block_params)
    reduced = _padded_bytes(root, world) + sum(_padded_bytes(ps, world) for ps in block_params)
    units = 1 + CONFIG.n_layer
    assert comm.world_size == world
    assert comm.calls == {"all_gather": 1 + 2 * CONFIG.n_layer, "reduce_scatter": units, "all_reduce": 0,
                          "broadcast": 0, "copy": 2 * (1 + 2 * CONFIG.n_layer) + 2 * units, "fsdp_unit": units}
    assert comm.bytes["all_gather"] == gathered
    assert comm.bytes["reduce_scatter"] == reduced
    assert comm.bus_bytes("all_gather") == int(gathered * (world - 1) / world)


def test_a_unit_without_trainable_parameters_reduces_nothing() -> None:
    """Frozen blocks are still gathered (forward and backward) but make no gradient to reduce-scatter.

    A failure means frozen parts are charged a reduce-scatter FSDP never runs.
    """
    model, _ = _gpt()
    for p in model.layers[0].parameters():
        p.requires_grad_(False)
    comm = Communication.of(_static(model, "fsdp2", 2))
    assert comm.calls["all_gather"] == 1 + 2 * CONFIG.n_layer
    assert comm.calls["reduce_scatter"] == CONFIG.n_layer  # the root and the two trainable blocks


def test_fsdp1_gathers_as_fsdp2_without_its_copies() -> None:
    """FSDP1 (one flat parameter per unit, resharded after forward but the root's) runs the same collectives
    on its flat parameters; its copy-in and copy-out are views, not counted.

    A failure means FSDP1's flat-parameter sizes or call counts are wrong.
    """
    model, _ = _gpt()
    comm = Communication.of(_static(model, "fsdp1", 2))
    unit_bytes = [sum(p.numel() * 4 for p in block.parameters()) for block in model.layers]
    root_bytes = sum(p.numel() * 4 for p in model.parameters()) - sum(unit_bytes)
    padded = [math.ceil(b / 2) * 2 for b in [root_bytes] + unit_bytes]
    assert comm.calls["all_gather"] == 1 + 2 * CONFIG.n_layer and comm.calls["copy"] == 0
    assert comm.bytes["all_gather"] == padded[0] + 2 * sum(padded[1:])
    assert comm.bytes["reduce_scatter"] == sum(padded)


def test_ddp_all_reduces_every_gradient_in_buckets_and_broadcasts_buffers() -> None:
    """DDP: every gradient byte all-reduced, in buckets filled from the last parameter back, each closed
    once it holds its limit (1 MiB first, then 25 MiB); buffers broadcast in forward, one call per dtype;
    nothing at all on one rank or without sharding.

    A failure means DDP's traffic is miscounted, or communication is charged where there is none.
    """
    model, _ = _gpt()
    grads = sum(p.numel() * 4 for p in model.parameters())
    comm = Communication.of(_static(model, "ddp", 4), model)
    assert comm.calls["all_reduce"] == 1 and comm.bytes["all_reduce"] == grads  # < 1 MiB: one bucket
    assert comm.bus_bytes("all_reduce") == int(grads * 2 * 3 / 4)
    assert comm.calls["broadcast"] == 0  # the GPT has no buffers
    big = torch.nn.Module()
    big.layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(8))  # 8 x 4 MiB + 4 KiB
    big.register_buffer("scale", torch.ones(3))
    big.register_buffer("steps", torch.zeros((), dtype=torch.long))
    comm = Communication.of(_static(big, "ddp", 2), big)
    # from the back: the last bias and weight close the 1 MiB bucket; seven more pairs (28 MiB) pass 25 MiB
    assert comm.calls["all_reduce"] == 2
    assert (comm.calls["broadcast"], comm.bytes["broadcast"]) == (2, 3 * 4 + 8)
    assert Communication.of(_static(big, "ddp", 2)).calls["broadcast"] == 0  # no model: no buffers known
    for sharding, world in (("none", 4), ("fsdp2", 1), ("ddp", 1)):
        assert Communication.of(_static(model, sharding, world), model) == Communication.none()


def test_communication_seconds_adds_each_term_at_its_constants() -> None:
    """Seconds = calls x per call + bytes sent x per byte, per term; a collective without constants costs
    nothing, copies without constants cost ``seconds_per_byte``.

    A failure means the modelled communication is not the documented sum.
    """
    comm = Communication(world_size=2, calls={"all_gather": 3, "copy": 2, "fsdp_unit": 4},
                         bytes={"all_gather": 4000, "copy": 1000})
    expected = 3 * 1e-3 + 2000 * 1e-9 + 2 * 1e-5 + 1000 * 1e-10 + 4 * 5e-3
    assert _calibration().communication_seconds(comm) == pytest.approx(expected, abs=1e-9)
    bare = _calibration(communication={})
    assert bare.communication_seconds(comm) == pytest.approx(1000 * 1e-10, abs=1e-9)


@pytest.mark.parametrize("bad", [{"all_gather": (1e-3,)}, {"all_gather": (-1.0, 0.0)}, {"all_gather": (float("nan"), 0.0)},
                                 {"all_to_all": (1e-3, 1e-9)}, {"copy": "fast"}])
def test_calibration_refuses_malformed_communication_constants(bad) -> None:
    """A constant that is not a finite, non-negative (per call, per byte) pair of a known term is refused.

    A failure means a typo'd or negative constant silently models communication as free or negative.
    """
    with pytest.raises(ValueError, match="expected a collective of"):
        _calibration(communication=bad)


def test_measure_communication_refuses_without_a_process_group() -> None:
    """Outside torch.distributed there is nothing to measure: a ``ValueError`` says what is needed.

    A failure means it measures a meaningless single-rank figure, or fails with a raw distributed error.
    """
    with pytest.raises(ValueError, match="process group of 2 or more ranks"):
        _calibration().measure_communication()
    with pytest.raises(ValueError, match="repeats must be an int >= 1"):
        _calibration().measure_communication(repeats=0)


def test_a_sharded_plan_adds_its_communication_to_every_step_time_and_chooses_the_same() -> None:
    """Planned for FSDP2 on 4 ranks (no group: ``world_size`` given), the plan records what a step
    communicates and its seconds; unwrapped and predicted step time both grow by exactly those seconds
    over the plan for no sharding, and every block's choice and cost is the same. Twice, byte-identical JSON.

    A failure means communication is left out of the predicted time, counted differently for different
    strategies (checkpointing adds no collective), or makes planning nondeterministic.
    """
    model, batch = _gpt()
    options = dict(memory_budget=0.5, calibration=_calibration())
    alone = ckpt_wrapper.plan(model, batch, **options)
    sharded = ckpt_wrapper.plan(model, batch, sharding="fsdp2", world_size=4, **options)
    again = ckpt_wrapper.plan(model, batch, sharding="fsdp2", world_size=4, **options)
    assert sharded.to_json() == again.to_json()
    comm = Communication.of(_static(model, "fsdp2", 4))
    seconds = _calibration().communication_seconds(comm)
    assert seconds > 0
    assert sharded.communication == {"seconds": seconds, "sharding": "fsdp2", **comm.to_dict()}
    assert sharded.step_seconds == pytest.approx(alone.step_seconds + seconds, abs=1e-12)
    assert sharded.predicted_seconds == pytest.approx(alone.predicted_seconds + seconds, abs=1e-12)
    assert [(e.strategy, e.cost) for e in sharded.entries] == [(e.strategy, e.cost) for e in alone.entries]
    assert alone.communication is None
    assert "of which communication" in str(sharded) and "of which communication" not in str(alone)


def test_plan_json_keeps_communication_and_reads_plans_without_it() -> None:
    """A sharded plan's communication survives the JSON round trip; a plan written before it existed
    reads back with ``communication`` None.

    A failure means saved plans lose what their step time includes, or older plan files stop loading.
    """
    model, batch = _gpt()
    sharded = ckpt_wrapper.plan(model, batch, memory_budget=0.5, sharding="ddp", world_size=2,
                                calibration=_calibration())
    assert Plan.from_json(sharded.to_json()) == sharded
    assert set(sharded.communication["calls"]) == set(TERMS)
    alone = ckpt_wrapper.plan(model, batch, memory_budget=0.5)
    assert "communication" not in json.loads(alone.to_json())  # the calibration's constants aside
    assert Plan.from_json(alone.to_json()).communication is None


def test_fit_with_sharding_refuses_an_unknown_sharding_or_no_process_group() -> None:
    """``Calibration.fit(sharding=...)`` times a sharded step, so it needs a group; a misspelt sharding is
    named. Both are refused before anything runs.

    A failure means a fit silently skips the communication it was asked for, or fails deep in FSDP.
    """
    model, batch = _gpt()
    with pytest.raises(ValueError, match="sharding must be one of"):
        Calibration.fit(model, batch, repeats=1, sharding="fsdp3")
    with pytest.raises(ValueError, match="process group of 2 or more ranks"):
        Calibration.fit(model, batch, repeats=1, sharding="fsdp2")


def test_measured_compute_keeps_the_default_communication_until_measured() -> None:
    """``Calibration.measure`` cannot time collectives (no group), so a plan made with it still models
    communication, at the device's defaults.

    A failure means measuring compute silently turns a sharded plan's communication off.
    """
    measured = Calibration.measure("cpu", repeats=1)
    assert measured.communication == Calibration.default("cpu").communication
    assert set(measured.communication) == set(TERMS)


def test_fsdp1_pads_its_flat_parameter_in_elements_not_bytes() -> None:
    """FSDP1's flat parameter is padded to a multiple of the world size in elements: a unit of 25 fp32
    elements on 2 ranks gathers 26 elements (104 bytes), not 100 bytes (measured: a real FULL_SHARD step of
    this model gathers 104 bytes per block call and reduce-scatters 104 per block).

    A failure means an odd-sized unit's all-gathers, reduce-scatters and resident shard are undercounted.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 4, bias=False))  # 25 and 20 elements
    static = StaticMemory.of(model, find_blocks(model, None), sharding="fsdp1", world_size=2)
    assert static.resident_parameters == {"": 0, "0": 13 * 4, "1": 10 * 4}
    comm = Communication.of(static)
    assert comm.bytes["all_gather"] == 2 * (26 + 20) * 4
    assert comm.bytes["reduce_scatter"] == (26 + 20) * 4


def test_fsdp2_reduce_scatters_the_padded_shards_of_the_trainable_parameters_alone() -> None:
    """FSDP2 reduce-scatters only a unit's trainable parameters, each padded on its own dim 0: a unit of a
    trainable (3, 4) and a frozen (4, 4) parameter on 2 ranks reduce-scatters 2 x 2 x 4 fp32 = 64 bytes
    (a real FSDP2 step of this unit does), not a share of the unit's padded bytes by trainable fraction.

    A failure means a partly frozen unit's reduce-scatter (and its gradient shard) is mis-sized.
    """
    class Unit(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.t = torch.nn.Parameter(torch.randn(3, 4))
            self.f = torch.nn.Parameter(torch.randn(4, 4), requires_grad=False)

    model = torch.nn.Sequential(Unit(), Unit())
    static = StaticMemory.of(model, find_blocks(model, None), sharding="fsdp2", world_size=2)
    assert static.sharded_gradients == {"": 0, "0": 2 * 4 * 4, "1": 2 * 4 * 4}
    comm = Communication.of(static)
    assert comm.bytes["reduce_scatter"] == 2 * 64
    assert comm.bytes["all_gather"] == 2 * 2 * (4 + 4) * 4 * 4


def test_a_calibration_with_communication_constants_stays_hashable() -> None:
    """A ``Calibration`` is a frozen value and was hashable before it had communication constants; it still
    is (equal calibrations hash alike; the constants take part in equality, not the hash).

    A failure means ``hash(calibration)`` (a dict key, a set, a cache) raises ``TypeError``.
    """
    a, b = _calibration(), _calibration()
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    assert _calibration(communication={}) != a
    assert hash(Calibration.default("cpu")) == hash(Calibration.default("cpu"))


def test_a_plan_for_fsdp2_refuses_a_model_with_scalar_parameters() -> None:
    """``fully_shard`` cannot shard a 0-dim parameter, so a plan for FSDP2 of such a model describes a
    setup that cannot run: it is refused, naming the parameter and what would do.

    A failure means the planner predicts memory and communication for a sharding that then fails.
    """
    model, batch = _gpt()
    model.temperature = torch.nn.Parameter(torch.tensor(1.0))
    with pytest.raises(ValueError, match="0-dim parameters.*temperature"):
        ckpt_wrapper.plan(model, batch, memory_budget=0.5, sharding="fsdp2", world_size=2)
    assert ckpt_wrapper.plan(model, batch, memory_budget=0.5, sharding="ddp", world_size=2).communication


@pytest.mark.parametrize("bad", [None, [("all_gather", (1e-3, 1e-9))], {"all_gather": (True, False)}])
def test_calibration_refuses_communication_that_is_not_a_mapping_of_number_pairs(bad) -> None:
    """``None``, a list of pairs, or booleans for constants are refused with the same clear message kind.

    A failure means a wrong type surfaces as an AttributeError, or booleans pass as seconds.
    """
    with pytest.raises(ValueError, match="Calibration.communication"):
        _calibration(communication=bad)


def test_default_calibration_is_a_copy_its_callers_cannot_change_for_others() -> None:
    """Changing the communication constants of the calibration ``default`` returned leaves the built-in
    defaults as they were.

    A failure means one caller's edit silently changes every later plan's default cost model.
    """
    first = Calibration.default("cpu")
    first.communication["all_gather"] = (9.0, 9.0)
    assert Calibration.default("cpu").communication["all_gather"] != (9.0, 9.0)
